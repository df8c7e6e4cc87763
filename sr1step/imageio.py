"""Image files in and out of sr1step.

* ``read_image`` decodes a file into float32 planes in [0, 1] (colour replicated to 3 channels for the network,
  alpha separate) and keeps what is needed to write the result back faithfully: gray or colour, 8 or 16 bits,
  ICC profile and EXIF (with the Orientation tag reset, because the pixels are already rotated upright).
* ``write_image`` encodes float planes back to PNG, JPEG, WebP or TIFF, atomically (temp file + rename).

Pillow cannot hold 16-bit colour in any of its modes, so two things are done here by hand:

* Reading 16-bit colour PNG/TIFF: Pillow's own decoders (zlib/libtiff, filters, interlacing, predictors) are run
  twice with the sample byte order swapped in the unpacking step: one pass yields the high bytes, the other the
  low bytes. For 16-bit gray+alpha PNG a single pass with an 8-bit 4-byte unpacker yields all four bytes.
* Writing PNG and TIFF (all bit depths, so that 8- and 16-bit outputs share one tested path): PNG chunks are
  assembled here (adaptive row filters, zlib); TIFF strips are deflate-compressed here and the tag directory
  (including the EXIF sub-directories) is serialised by Pillow's ``ImageFileDirectory_v2``.
"""

from __future__ import annotations

import io
import os
import struct
import sys
import warnings
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
from PIL import Image, ImageCms, TiffImagePlugin, UnidentifiedImageError

from sr1step.errors import ConfigError, ImageReadError, ImageWriteError
from sr1step.fsio import atomic_path

__all__ = [
    "INPUT_EXTENSIONS",
    "MAX_INPUT_PIXELS",
    "OUTPUT_FORMATS",
    "PILLOW_FORMATS",
    "DecodedImage",
    "is_image_name",
    "normalize_format",
    "read_image",
    "upscale_alpha",
    "write_image",
]

# Extensions picked up from folders and globs (compared case-insensitively). Files named explicitly are read
# whatever their extension; the decoder then decides.
INPUT_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif")
OUTPUT_FORMATS: tuple[str, ...] = ("png", "jpg", "webp", "tiff")


def is_image_name(name: str) -> bool:
    """Whether folders and globs pick up a file of this name: an image extension, not hidden."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in INPUT_EXTENSIONS


# Largest accepted input: Pillow's own hard decompression-bomb limit (2 x its 89.5 MP warning threshold),
# about 13,377 x 13,377 px, e.g. a 16,000 x 11,000 panorama. Using exactly Pillow's limit means sr1step never
# has to change Pillow's process-wide setting; larger files are refused with an ImageReadError.
MAX_INPUT_PIXELS = 178_956_970

# Only these Pillow plugins are tried. This keeps e.g. EPS (which runs Ghostscript) away from untrusted files
# and gives one clear "not a supported image" error for everything else. The JPEG opener also yields the
# multi-picture JPEGs many cameras and phones write (format name "MPO").
PILLOW_FORMATS = ("PNG", "JPEG", "WEBP", "TIFF", "BMP", "GIF")

FORMAT_ALIASES = {"png": "png", "jpg": "jpg", "jpeg": "jpg", "webp": "webp", "tif": "tiff", "tiff": "tiff"}
CANONICAL_EXTENSION = {"png": ".png", "jpg": ".jpg", "webp": ".webp", "tiff": ".tiff"}
_WEBP_MAX_SIDE = 16383
_JPEG_MAX_SIDE = 65535

_EXIF_HEADER = b"Exif\x00\x00"
_TAG_ORIENTATION = 0x0112
_TAG_EXIF_IFD = 0x8769
_TAG_GPS_IFD = 0x8825
_TAG_PIXEL_X_DIMENSION = 0xA002
_TAG_PIXEL_Y_DIMENSION = 0xA003
# TIFF tags that describe how a file's own pixels are stored (or carry large foreign blobs). When a TIFF's
# first directory becomes EXIF for another file these would be stale or wrong, so they are left out.
_TIFF_LAYOUT_TAGS = frozenset(
    {254, 255, 256, 257, 258, 259, 262, 263, 266, 273, 277, 278, 279, 280, 281, 284, 290, 291, 292, 293}
    | {317, 320, 322, 323, 324, 325, 330, 338, 339, 340, 341, 347, 512, 513, 514, 515, 530, 531, 532}
    | {700, 33723, 34377, 34675, 37724}
)

# Rec. 601 luma, the weights Pillow uses for RGB -> L, so a gray input replicated to RGB comes back unchanged.
_LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)


# --------------------------------------------------------------------------------------------------------------
# Decoding


@dataclass(frozen=True, eq=False)
class DecodedImage:
    """An image ready for the network, plus what is needed to write the result back like the input.

    ``rgb`` is float32 (H, W, 3) in [0, 1], already turned upright by the EXIF orientation; gray images are
    replicated to 3 channels and flagged ``is_gray``. ``alpha`` is float32 (H, W) in [0, 1] when the file has
    transparency (an alpha channel, a palette with transparent entries or a transparent colour key), else None.
    ``exif`` is in Pillow's ``Image.Exif.tobytes()`` form (``Exif\\0\\0`` + TIFF structure) with Orientation
    1 or absent. ``notes`` are human-readable remarks about the decoding (first frame only, colour conversion).
    """

    path: Path
    rgb: np.ndarray
    alpha: np.ndarray | None
    is_gray: bool
    bit_depth: Literal[8, 16]
    icc_profile: bytes | None
    exif: bytes | None
    source_format: str
    notes: tuple[str, ...] = ()

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])


# What Pillow's plugins raise for truncated, corrupt or unsupported data.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, KeyError, struct.error, zlib.error)


def read_image(path: str | os.PathLike[str]) -> DecodedImage:
    """Decode an image file; any problem raises ``ImageReadError`` naming the file and the reason."""
    source = Path(path)
    _check_readable_file(source)
    try:
        return _decode(source)
    except ImageReadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageReadError(f"{source}: refused as a possible decompression bomb ({exc})") from exc
    except UnidentifiedImageError as exc:
        supported = ", ".join(PILLOW_FORMATS)
        raise ImageReadError(f"{source}: not an image in a supported format ({supported})") from exc
    except MemoryError as exc:
        raise ImageReadError(f"{source}: not enough memory to decode this image") from exc
    except _DECODE_ERRORS as exc:
        reason = str(exc).strip() or type(exc).__name__
        raise ImageReadError(
            f"{source}: cannot decode: corrupt, truncated or unsupported ({reason})"
        ) from exc


def _check_readable_file(source: Path) -> None:
    try:
        info = source.stat()
    except FileNotFoundError as exc:
        raise ImageReadError(f"{source}: no such file") from exc
    except OSError as exc:
        raise ImageReadError(f"{source}: cannot access file ({exc.strerror or exc})") from exc
    if source.is_dir():
        raise ImageReadError(f"{source}: is a folder, not an image file")
    if info.st_size == 0:
        raise ImageReadError(f"{source}: empty file (0 bytes)")
    if not os.access(source, os.R_OK):
        raise ImageReadError(f"{source}: cannot open file (permission denied)")


def _open(source: Path) -> Image.Image:
    # Pillow warns between its soft and hard limits; sr1step's limit is the hard one (see MAX_INPUT_PIXELS).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = Image.open(source, formats=PILLOW_FORMATS)
    width, height = image.size
    if width * height > MAX_INPUT_PIXELS:
        image.close()
        raise ImageReadError(
            f"{source}: {width}x{height} px is larger than the {MAX_INPUT_PIXELS:,} px limit "
            "(refused as a possible decompression bomb)"
        )
    if width == 0 or height == 0:
        image.close()
        raise ImageReadError(f"{source}: image has no pixels ({width}x{height})")
    return image


@dataclass
class _Planes:
    """Integer pixel planes as decoded: color (H, W) or (H, W, 3), alpha (H, W) or None.

    ``orientation`` is the EXIF orientation still to apply when the planes come from a separate decoding
    pass; None means "ask the main image after its load" (Pillow's TIFF loader already turns pixels
    upright and then drops the tag, other loaders leave both alone).
    """

    color: np.ndarray
    alpha: np.ndarray | None
    bit_depth: Literal[8, 16]
    alpha_premultiplied: bool = False
    orientation: int | None = None


def _decode(source: Path) -> DecodedImage:
    notes: list[str] = []
    with _open(source) as image:
        source_format = image.format or "unknown"
        frames = int(getattr(image, "n_frames", 1))
        if frames > 1:
            notes.append(f"has {frames} frames/pages; only the first is used")
            image.seek(0)
        rawmode = _tile_rawmode(image)
        icc_profile = image.info.get("icc_profile") or None
        planes, icc_profile = _decode_planes(source, image, rawmode, icc_profile, notes)
        exif_data = image.getexif()  # after decoding: PNG may keep eXIf after the pixel data
        orientation = planes.orientation
        if orientation is None:
            orientation = exif_data.get(_TAG_ORIENTATION, 1)
        exif = _exif_for_output(image, exif_data, notes)

    if orientation not in range(1, 9):
        notes.append(f"ignored invalid EXIF orientation {orientation!r}")
        orientation = 1
    color = _apply_orientation(planes.color, orientation)
    alpha = None if planes.alpha is None else _apply_orientation(planes.alpha, orientation)

    scale = np.float32(255 if planes.bit_depth == 8 else 65535)
    rgb = color.astype(np.float32) / scale
    alpha_f = None if alpha is None else alpha.astype(np.float32) / scale
    if planes.alpha_premultiplied and alpha_f is not None:
        rgb = _unpremultiply(rgb, alpha_f)
    is_gray = rgb.ndim == 2
    if is_gray:
        rgb = np.repeat(rgb[:, :, None], 3, axis=2)
    return DecodedImage(
        path=source,
        rgb=np.ascontiguousarray(rgb),
        alpha=None if alpha_f is None else np.ascontiguousarray(alpha_f),
        is_gray=is_gray,
        bit_depth=planes.bit_depth,
        icc_profile=icc_profile if _icc_valid(icc_profile) else None,
        exif=exif,
        source_format=source_format,
        notes=tuple(notes),
    )


def _tiff_tag(image: Image.Image, tag: int) -> tuple[int, ...]:
    """A TIFF tag's integer values, () when absent or not a TIFF."""
    tags = getattr(image, "tag_v2", None)
    if tags is None or tag not in tags:
        return ()
    value = tags[tag]
    values = value if isinstance(value, tuple) else (value,)
    return tuple(int(item) for item in values)


def _tile_rawmode(image: Image.Image) -> str:
    """The unpacker name Pillow will use for the pixel data (e.g. ``RGB;16B``), or '' when not applicable."""
    tiles = getattr(image, "tile", None) or []
    if not tiles:
        return ""
    args = tiles[0].args
    if isinstance(args, str):
        return args
    if isinstance(args, tuple) and args and isinstance(args[0], str):
        return args[0]
    return ""


def _decode_planes(
    source: Path, image: Image.Image, rawmode: str, icc_profile: bytes | None, notes: list[str]
) -> tuple[_Planes, bytes | None]:
    mode = image.mode
    transparency = image.info.get("transparency")
    tiff_bits = _tiff_tag(image, 258)
    sixteen_bit_colour = mode in ("RGB", "RGBA") and (
        (image.format == "PNG" and ";16" in rawmode)
        or (image.format == "TIFF" and (";16" in rawmode or 16 in tiff_bits))
    )

    if sixteen_bit_colour:
        return _decode_16bit_colour(source, image, rawmode), icc_profile
    if mode in ("1", "L"):
        gray = np.asarray(image.convert("L"))
        return _Planes(gray, _colour_key_alpha(gray, transparency, 255), 8), icc_profile
    if mode in ("LA", "La"):
        pixels = np.asarray(image.convert("LA"))
        return _Planes(pixels[:, :, 0], pixels[:, :, 1], 8), icc_profile
    if mode.startswith("I;16"):
        gray = np.asarray(image).astype(np.uint16)
        alpha = _colour_key_alpha(gray, transparency, 65535)
        if image.format == "TIFF" and tiff_bits and tiff_bits[0] < 16:
            # e.g. 12-bit scientific TIFF: Pillow keeps the values (0..4095), so rescale to the 16-bit range.
            notes.append(f"{tiff_bits[0]}-bit samples rescaled to 16 bits")
            top = (1 << tiff_bits[0]) - 1
            gray = np.rint(np.minimum(gray, top) * (65535 / top)).astype(np.uint16)
        return _Planes(gray, alpha, 16), icc_profile
    if mode == "I":
        values = np.asarray(image)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ImageReadError(
                f"{source}: 32-bit integer pixels outside 0..65535 are not supported (mode {mode})"
            )
        gray = values.astype(np.uint16)
        return _Planes(gray, _colour_key_alpha(gray, transparency, 65535), 16), icc_profile
    if mode in ("P", "PA"):
        has_alpha = (
            mode == "PA" or transparency is not None or (image.palette and image.palette.mode == "RGBA")
        )
        return _planes_8bit(image.convert("RGBA" if has_alpha else "RGB")), icc_profile
    if mode == "RGB":
        rgb = np.asarray(image)
        return _Planes(rgb, _colour_key_alpha(rgb, transparency, 255), 8), icc_profile
    if mode in ("RGBA", "RGBa", "RGBX", "YCbCr"):
        return _planes_8bit(image.convert("RGBA" if mode in ("RGBA", "RGBa") else "RGB")), icc_profile
    if mode == "CMYK":
        if ";16" in rawmode:
            notes.append("16-bit CMYK is decoded at 8 bits per channel")
        return _decode_cmyk(image, icc_profile, notes)
    raise ImageReadError(f"{source}: pixel mode {mode} is not supported")


def _planes_8bit(image: Image.Image) -> _Planes:
    pixels = np.asarray(image)
    if image.mode == "RGBA":
        return _Planes(pixels[:, :, :3], pixels[:, :, 3], 8)
    return _Planes(pixels, None, 8)


def _colour_key_alpha(pixels: np.ndarray, key: object, max_value: int) -> np.ndarray | None:
    """Alpha for PNG's tRNS colour key: the one colour (or gray level) that is fully transparent."""
    if key is None or isinstance(key, bytes):
        return None
    key_values = np.asarray(key, dtype=np.int64).reshape(-1)
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    if key_values.size != channels:
        return None
    matches = pixels == key_values[0] if pixels.ndim == 2 else np.all(pixels == key_values, axis=2)
    dtype = np.uint8 if max_value == 255 else np.uint16
    return np.where(matches, 0, max_value).astype(dtype)


def _decode_16bit_colour(source: Path, image: Image.Image, rawmode: str) -> _Planes:
    """Full 16-bit samples of a colour PNG/TIFF, which Pillow itself would cut to their high byte."""
    if image.format == "TIFF" and _tiff_tag(image, 284) not in ((), (1,)):
        # Pillow mis-decodes 16-bit planes stored one after another (PlanarConfiguration 2).
        raise ImageReadError(f"{source}: 16-bit TIFF with separate colour planes is not supported")
    codecs = {tile.codec_name for tile in image.tile}
    if not codecs <= {"zip", "raw", "libtiff"}:
        raise ImageReadError(f"{source}: 16-bit data stored with {sorted(codecs)} is not supported")
    base, _, order = rawmode.rpartition(";16")
    if rawmode == "LA;16B":
        # Gray+alpha PNG: 4 bytes per pixel, exactly what the 8-bit RGBA unpacker copies through unchanged.
        raw, orientation = _decode_with_rawmode(source, "RGBA")
        gray = raw[:, :, 0].astype(np.uint16) << 8 | raw[:, :, 1]
        alpha = raw[:, :, 2].astype(np.uint16) << 8 | raw[:, :, 3]
        return _Planes(gray, alpha, 16, orientation=orientation)
    if base not in ("RGB", "RGBA", "RGBX", "RGBa") or order not in ("B", "L", "N"):
        raise ImageReadError(f"{source}: 16-bit sample layout {rawmode} is not supported")
    if order == "N":
        order = "L" if sys.byteorder == "little" else "B"
    swapped = "L" if order == "B" else "B"
    # Premultiplied data is unpacked raw here and divided by alpha afterwards in float.
    unpack_base = "RGBA" if base == "RGBa" else base
    high, orientation = _decode_with_rawmode(source, f"{unpack_base};16{order}")
    low, _ = _decode_with_rawmode(source, f"{unpack_base};16{swapped}")
    pixels = high.astype(np.uint16) << 8 | low
    if image.mode == "RGBA":
        return _Planes(
            pixels[:, :, :3], pixels[:, :, 3], 16, alpha_premultiplied=base == "RGBa", orientation=orientation
        )
    alpha = _colour_key_alpha(pixels, image.info.get("transparency"), 65535)
    return _Planes(pixels, alpha, 16, orientation=orientation)


def _decode_with_rawmode(source: Path, rawmode: str) -> tuple[np.ndarray, int]:
    """Decode the first frame again with Pillow's decoder, but unpack the samples with ``rawmode``.

    Returns the pixels and the EXIF orientation still to be applied to them after Pillow's load.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(source, formats=PILLOW_FORMATS) as image:
            retiled = []
            for tile in image.tile:
                args = rawmode if isinstance(tile.args, str) else (rawmode, *tile.args[1:])
                retiled.append(tile._replace(args=args))
            image.tile = retiled
            image.load()
            return np.asarray(image).copy(), image.getexif().get(_TAG_ORIENTATION, 1)


def _decode_cmyk(
    image: Image.Image, icc_profile: bytes | None, notes: list[str]
) -> tuple[_Planes, bytes | None]:
    if icc_profile and _icc_colour_space(icc_profile) == b"CMYK":
        try:
            source_profile = ImageCms.ImageCmsProfile(io.BytesIO(icc_profile))
            srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
            converted = ImageCms.profileToProfile(image, source_profile, srgb, outputMode="RGB")
        except (ImageCms.PyCMSError, OSError, ValueError) as exc:
            notes.append(
                f"CMYK converted to RGB without colour management: embedded profile unusable ({exc})"
            )
        else:
            if converted is not None:  # None only for inPlace=True
                notes.append("CMYK converted to sRGB through its embedded ICC profile")
                return _Planes(np.asarray(converted), None, 8), srgb.tobytes()
    else:
        notes.append("CMYK converted to RGB without colour management (no CMYK ICC profile)")
    # The CMYK profile describes the CMYK numbers only; it must not be attached to the RGB result.
    return _Planes(np.asarray(image.convert("RGB")), None, 8), None


def _unpremultiply(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    safe = np.where(alpha > 0, alpha, 1.0)[:, :, None]
    return np.clip(np.where(alpha[:, :, None] > 0, rgb / safe, 0.0), 0.0, 1.0).astype(np.float32)


def _apply_orientation(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """Turn stored pixels upright for an EXIF orientation value (same result as ``ImageOps.exif_transpose``)."""
    if orientation == 2:  # mirrored left-right
        return pixels[:, ::-1]
    if orientation == 3:  # rotated 180
        return pixels[::-1, ::-1]
    if orientation == 4:  # mirrored top-bottom
        return pixels[::-1]
    transposed = pixels.swapaxes(0, 1)
    if orientation == 5:  # transpose
        return transposed
    if orientation == 6:  # needs 90 degrees clockwise
        return transposed[:, ::-1]
    if orientation == 7:  # transverse
        return transposed[::-1, ::-1]
    if orientation == 8:  # needs 90 degrees counter-clockwise
        return transposed[::-1]
    return pixels


def _icc_colour_space(icc_profile: bytes) -> bytes:
    return icc_profile[16:20]


def _icc_valid(icc_profile: bytes | None) -> bool:
    return icc_profile is not None and len(icc_profile) >= 128  # 128 bytes: the fixed ICC header


# --------------------------------------------------------------------------------------------------------------
# EXIF


def _exif_for_output(image: Image.Image, exif_data: Image.Exif, notes: list[str]) -> bytes | None:
    """EXIF to carry into the output, with Orientation 1; None when the file has none."""
    raw = image.info.get("exif")
    if isinstance(raw, bytes) and raw:
        raw = _with_exif_header(raw)
        # Edit in place where possible: re-serialising would move maker notes that use absolute offsets.
        patched = _patch_exif(raw, orientation=1)
        if patched is not None:
            return patched
    if len(exif_data) == 0:
        return None
    try:
        return _rebuild_exif(exif_data)
    except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
        notes.append(f"EXIF dropped: it could not be re-encoded ({exc})")
        return None


def _with_exif_header(data: bytes) -> bytes:
    if data.startswith(_EXIF_HEADER):
        return data
    return _EXIF_HEADER + data  # WebP and some PNG writers store the bare TIFF structure


def _rebuild_exif(exif_data: Image.Exif) -> bytes | None:
    """EXIF from tags Pillow parsed (TIFF first directory, legacy PNG text): metadata tags only, upright."""
    rebuilt = Image.Exif()
    for tag, value in exif_data.items():
        if tag in _TIFF_LAYOUT_TAGS:
            continue
        if tag in (_TAG_EXIF_IFD, _TAG_GPS_IFD):
            sub_directory = exif_data.get_ifd(tag)
            if sub_directory:
                rebuilt[tag] = dict(sub_directory)
            continue
        rebuilt[tag] = value
    if _TAG_ORIENTATION in rebuilt:
        rebuilt[_TAG_ORIENTATION] = 1
    if len(rebuilt) == 0:
        return None
    return rebuilt.tobytes()


def _patch_exif(
    exif: bytes, *, orientation: int | None = None, size: tuple[int, int] | None = None
) -> bytes | None:
    """Overwrite Orientation and/or PixelX/YDimension values inside EXIF bytes; None if the layout is unusable.

    Only single values stored inline are touched, so every other byte (maker notes included) stays as it was.
    """
    body = bytearray(exif[len(_EXIF_HEADER) :])
    if body[:4] == b"II*\x00":
        endian = "<"
    elif body[:4] == b"MM\x00*":
        endian = ">"
    else:
        return None

    def entries(offset: int) -> Iterable[tuple[int, int, int, int]]:
        (count,) = struct.unpack_from(endian + "H", body, offset)
        if offset + 2 + 12 * count > len(body):
            raise struct.error("directory runs past the end of the EXIF data")
        for index in range(count):
            position = offset + 2 + 12 * index
            tag, kind, n_values = struct.unpack_from(endian + "HHI", body, position)
            yield tag, kind, n_values, position + 8

    def put(value_offset: int, kind: int, n_values: int, value: int) -> bool:
        if n_values != 1:
            return False
        if kind == 3 and value <= 0xFFFF:  # SHORT
            struct.pack_into(endian + "H", body, value_offset, value)
            return True
        if kind == 4:  # LONG
            struct.pack_into(endian + "I", body, value_offset, value)
            return True
        return False

    try:
        (first_directory,) = struct.unpack_from(endian + "I", body, 4)
        exif_directory = None
        for tag, kind, n_values, value_offset in entries(first_directory):
            if (
                tag == _TAG_ORIENTATION
                and orientation is not None
                and not put(value_offset, kind, n_values, orientation)
            ):
                return None
            if tag == _TAG_EXIF_IFD and kind in (4, 13):
                (exif_directory,) = struct.unpack_from(endian + "I", body, value_offset)
        if size is not None and exif_directory is not None:
            width, height = size
            for tag, kind, n_values, value_offset in entries(exif_directory):
                if tag == _TAG_PIXEL_X_DIMENSION:
                    put(value_offset, kind, n_values, width)
                elif tag == _TAG_PIXEL_Y_DIMENSION:
                    put(value_offset, kind, n_values, height)
    except struct.error:
        return None
    return _EXIF_HEADER + bytes(body)


def _exif_for_size(exif: bytes, width: int, height: int, notes: list[str]) -> bytes:
    exif = _with_exif_header(exif)
    patched = _patch_exif(exif, size=(width, height))
    if patched is None:
        notes.append("EXIF kept unchanged: its layout could not be parsed to update the pixel dimensions")
        return exif
    return patched


# --------------------------------------------------------------------------------------------------------------
# Encoding


def normalize_format(name: str) -> str:
    """'png' | 'jpg' | 'webp' | 'tiff' from a format name or extension ('JPEG', '.tif', ...)."""
    key = name.lower().lstrip(".")
    if key not in FORMAT_ALIASES:
        choices = ", ".join(OUTPUT_FORMATS)
        raise ConfigError(f"unknown output format {name!r} (choose one of: {choices})")
    return FORMAT_ALIASES[key]


def write_image(
    path: str | os.PathLike[str],
    rgb: np.ndarray,
    *,
    alpha: np.ndarray | None = None,
    is_gray: bool = False,
    bit_depth: Literal[8, 16] = 8,
    fmt: str | None = None,
    quality: int = 95,
    icc_profile: bytes | None = None,
    exif: bytes | None = None,
) -> list[str]:
    """Write float planes in [0, 1] as an image file, atomically; returns notes about lossy choices made.

    ``rgb`` is (H, W, 3) (or (H, W) / (H, W, 1) with ``is_gray``); ``alpha`` is (H, W). ``fmt`` defaults to the
    file extension. Quantisation: clamp to [0, 1], scale by 255 or 65535, round half to even. 16 bits are kept
    for PNG and TIFF only. Gray output stores Rec. 601 luma. JPEG has no alpha: a fully opaque alpha is
    dropped, any other is composited over white (noted). An ICC profile whose colour space does not match the
    stored pixels (gray vs RGB) is left out (noted). EXIF PixelX/YDimension are updated to the output size.
    """
    target = Path(path)
    if fmt is None and target.suffix.lower().lstrip(".") not in FORMAT_ALIASES:
        raise ConfigError(f"{target}: cannot tell the output format from the extension; pass fmt")
    output_format = normalize_format(fmt if fmt is not None else target.suffix)
    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth!r}")
    if not 1 <= quality <= 100:
        raise ConfigError(f"quality must be between 1 and 100, got {quality}")
    color, alpha = _validated_planes(target, rgb, alpha, is_gray)
    notes: list[str] = []
    height, width = color.shape[:2]

    if bit_depth == 16 and output_format not in ("png", "tiff"):
        notes.append(f"{output_format.upper()} holds 8 bits per channel: 16-bit result written as 8-bit")
        bit_depth = 8
    if alpha is not None and output_format == "jpg":
        if _quantize(alpha, 8).min() < 255:
            notes.append("JPEG has no transparency: the image was composited over white")
            color = _composite_over_white(color, alpha)
        alpha = None
    if output_format == "webp" and max(width, height) > _WEBP_MAX_SIDE:
        raise ImageWriteError(
            f"{target}: {width}x{height} px is too large for WebP (at most {_WEBP_MAX_SIDE} px a side); "
            "choose png or tiff"
        )
    if output_format == "jpg" and max(width, height) > _JPEG_MAX_SIDE:
        raise ImageWriteError(
            f"{target}: {width}x{height} px is too large for JPEG (at most {_JPEG_MAX_SIDE} px a side)"
        )

    if color.ndim == 2 and alpha is not None and bit_depth == 16 and output_format == "tiff":
        # Valid TIFF, but Pillow (so sr1step itself) cannot open 16-bit gray+alpha TIFF: store RGBA instead.
        notes.append("16-bit gray with alpha is stored as RGBA in TIFF so that every reader can open it")
        color = np.repeat(color[:, :, None], 3, axis=2)
    stored_gray = color.ndim == 2 and output_format != "webp"  # WebP stores gray as RGB
    icc_profile = _compatible_icc(icc_profile, stored_gray, notes)
    if exif:
        exif = _exif_for_size(exif, width, height, notes)

    pixels = _quantize(color, bit_depth)
    if alpha is not None:
        pixels = np.concatenate(
            [pixels.reshape(height, width, -1), _quantize(alpha, bit_depth)[:, :, None]], 2
        )

    _make_parent_folder(target)
    try:
        with atomic_path(target) as temp_path:
            if output_format == "png":
                with open(temp_path, "wb") as handle:
                    _write_png(handle, pixels, icc_profile, exif)
            elif output_format == "tiff":
                with open(temp_path, "wb") as handle:
                    _write_tiff(handle, pixels, icc_profile, exif)
            else:
                _save_with_pillow(temp_path, pixels, output_format, quality, icc_profile, exif, notes)
    except ImageWriteError:
        raise
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ImageWriteError(f"{target}: cannot write image ({reason})") from exc
    return notes


def _validated_planes(
    target: Path, rgb: np.ndarray, alpha: np.ndarray | None, is_gray: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    color = np.asarray(rgb)
    if color.ndim == 3 and color.shape[2] == 1:
        color = color[:, :, 0]
    if color.ndim == 2 and not is_gray:
        raise ValueError("a 2-D image needs is_gray=True")
    if not (color.ndim == 2 or (color.ndim == 3 and color.shape[2] == 3)):
        raise ValueError(f"rgb must be (H, W, 3) or a gray (H, W) plane, got shape {color.shape}")
    if color.shape[0] == 0 or color.shape[1] == 0:
        raise ValueError(f"rgb has no pixels (shape {color.shape})")
    if is_gray and color.ndim == 3:
        color = np.tensordot(color.astype(np.float32, copy=False), _LUMA_WEIGHTS, axes=([2], [0]))
    if alpha is not None:
        alpha = np.asarray(alpha)
        if alpha.shape != color.shape[:2]:
            raise ValueError(f"alpha shape {alpha.shape} does not match the image {color.shape[:2]}")
    for name, plane in (("image", color), ("alpha", alpha)):
        if plane is not None and not np.isfinite(plane).all():
            raise ImageWriteError(f"{target}: the {name} contains NaN or infinite values; nothing written")
    return color, alpha


def _quantize(plane: np.ndarray, bit_depth: int) -> np.ndarray:
    top = 255 if bit_depth == 8 else 65535
    scaled = np.clip(plane.astype(np.float32, copy=False), 0.0, 1.0) * np.float32(top)
    return np.rint(scaled).astype(np.uint8 if bit_depth == 8 else np.uint16)


def _composite_over_white(color: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = np.clip(alpha.astype(np.float32), 0.0, 1.0)
    if color.ndim == 3:
        a = a[:, :, None]
    return color.astype(np.float32) * a + (1.0 - a)


def _compatible_icc(icc_profile: bytes | None, stored_gray: bool, notes: list[str]) -> bytes | None:
    if not icc_profile:
        return None
    if not _icc_valid(icc_profile):
        notes.append("ICC profile left out: it is too short to be a profile")
        return None
    space = _icc_colour_space(icc_profile)
    expected = b"GRAY" if stored_gray else b"RGB "
    if space != expected:
        kind = "gray" if stored_gray else "RGB"
        notes.append(
            f"ICC profile left out: it describes {space.decode('latin-1').strip()!r} data, not {kind}"
        )
        return None
    return icc_profile


def _make_parent_folder(target: Path) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise ImageWriteError(f"{target}: cannot create the output folder (a file is in the way)") from exc
    except OSError as exc:
        raise ImageWriteError(f"{target}: cannot create the output folder ({exc.strerror or exc})") from exc
    if not target.parent.is_dir():
        raise ImageWriteError(f"{target}: the output folder is not a folder")


def _save_with_pillow(
    temp_path: Path,
    pixels: np.ndarray,
    output_format: str,
    quality: int,
    icc_profile: bytes | None,
    exif: bytes | None,
    notes: list[str],
) -> None:
    image = Image.fromarray(pixels)
    options: dict[str, object] = {"quality": quality}
    if icc_profile:
        options["icc_profile"] = icc_profile
    if exif:
        options["exif"] = exif
    if output_format == "jpg":
        options["subsampling"] = 0  # 4:4:4: keep the colour detail the upscaler produced
        if exif and len(exif) > 65533:
            notes.append("EXIF left out: larger than the 64 KB a JPEG segment can hold")
            del options["exif"]
        image.save(temp_path, "JPEG", **options)
    else:
        image.save(temp_path, "WEBP", method=4, **options)


# PNG --------------------------------------------------------------------------------------------------------

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_COLOUR_TYPE = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> gray, gray+alpha, RGB, RGBA
_PNG_FILTER_BLOCK_BYTES = 1 << 20
_ZLIB_LEVEL = 6


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _write_png(handle: BinaryIO, pixels: np.ndarray, icc_profile: bytes | None, exif: bytes | None) -> None:
    height, width = pixels.shape[:2]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    depth = 16 if pixels.dtype == np.uint16 else 8
    bytes_per_pixel = channels * depth // 8
    rows = np.ascontiguousarray(pixels, dtype=">u2" if depth == 16 else np.uint8).view(np.uint8)
    rows = rows.reshape(height, width * bytes_per_pixel)

    handle.write(_PNG_SIGNATURE)
    header = struct.pack(">IIBBBBB", width, height, depth, _PNG_COLOUR_TYPE[channels], 0, 0, 0)
    handle.write(_png_chunk(b"IHDR", header))
    if icc_profile:
        handle.write(_png_chunk(b"iCCP", b"ICC profile\x00\x00" + zlib.compress(icc_profile, _ZLIB_LEVEL)))
    if exif:
        handle.write(
            _png_chunk(b"eXIf", exif[len(_EXIF_HEADER) :] if exif.startswith(_EXIF_HEADER) else exif)
        )

    compressor = zlib.compressobj(_ZLIB_LEVEL)
    block_rows = max(1, _PNG_FILTER_BLOCK_BYTES // rows.shape[1])
    previous = np.zeros((1, rows.shape[1]), dtype=np.uint8)
    for start in range(0, height, block_rows):
        block = rows[start : start + block_rows]
        above = np.concatenate([previous, block[:-1]])
        compressed = compressor.compress(_filter_png_rows(block, above, bytes_per_pixel).tobytes())
        if compressed:
            handle.write(_png_chunk(b"IDAT", compressed))
        previous = block[-1:]
    handle.write(_png_chunk(b"IDAT", compressor.flush()))
    handle.write(_png_chunk(b"IEND", b""))


def _filter_png_rows(rows: np.ndarray, above: np.ndarray, bytes_per_pixel: int) -> np.ndarray:
    """Apply the PNG filter that makes each row smallest (libpng's minimum-sum-of-absolute-values heuristic).

    Returns (n, 1 + row_bytes) uint8: filter type byte then filtered bytes, ready for zlib.
    """
    x = rows.astype(np.int16)
    b = above.astype(np.int16)
    a = np.zeros_like(x)
    a[:, bytes_per_pixel:] = x[:, :-bytes_per_pixel]
    c = np.zeros_like(b)
    c[:, bytes_per_pixel:] = b[:, :-bytes_per_pixel]
    # Paeth predictor: whichever of left, up, upper-left is closest to left + up - upper-left.
    distance_a = np.abs(b - c)
    distance_b = np.abs(a - c)
    distance_c = np.abs(a + b - 2 * c)
    paeth = np.where(
        (distance_a <= distance_b) & (distance_a <= distance_c), a, np.where(distance_b <= distance_c, b, c)
    )
    candidates = np.stack([x, x - a, x - b, x - ((a + b) >> 1), x - paeth]).astype(np.uint8)
    scores = np.abs(candidates.view(np.int8).astype(np.int32)).sum(axis=2)
    choice = scores.argmin(axis=0)
    chosen = candidates[choice, np.arange(rows.shape[0])]
    return np.concatenate([choice.astype(np.uint8)[:, None], chosen], axis=1)


# TIFF -------------------------------------------------------------------------------------------------------

_TIFF_STRIP_BYTES = 1 << 20
_TIFF_DEFLATE = 8
_TIFF_HORIZONTAL_PREDICTOR = 2


def _write_tiff(handle: BinaryIO, pixels: np.ndarray, icc_profile: bytes | None, exif: bytes | None) -> None:
    """Little-endian TIFF, deflate strips with horizontal differencing, unassociated alpha, ICC and EXIF."""
    height, width = pixels.shape[:2]
    samples = pixels if pixels.ndim == 3 else pixels[:, :, None]
    channels = samples.shape[2]
    depth = 16 if pixels.dtype == np.uint16 else 8
    row_bytes = width * channels * depth // 8
    rows_per_strip = max(1, _TIFF_STRIP_BYTES // row_bytes)

    # Predictor 2 stores each sample minus its left neighbour (same channel), wrapping modulo 2**depth.
    differences = samples.copy()
    differences[:, 1:] -= samples[:, :-1]
    stored = differences.astype("<u2" if depth == 16 else np.uint8)
    strips = [
        zlib.compress(stored[start : start + rows_per_strip].tobytes(), _ZLIB_LEVEL)
        for start in range(0, height, rows_per_strip)
    ]
    strip_offsets, position = [], 0
    for strip in strips:
        strip_offsets.append(position)
        position += len(strip)

    directory = TiffImagePlugin.ImageFileDirectory_v2(ifh=b"II*\x00\x00\x00\x00\x00")
    if exif:
        _merge_exif_into_tiff(directory, exif)
    directory[256] = width
    directory[257] = height
    directory[258] = (depth,) * channels  # BitsPerSample
    directory[259] = _TIFF_DEFLATE
    directory[262] = 2 if channels >= 3 else 1  # Photometric: RGB or min-is-black
    directory[277] = channels
    directory[278] = rows_per_strip
    directory[284] = 1  # PlanarConfiguration: interleaved
    directory[317] = _TIFF_HORIZONTAL_PREDICTOR
    directory[339] = (1,) * channels  # SampleFormat: unsigned integer
    if channels in (2, 4):
        directory[338] = 2  # ExtraSamples: unassociated (straight) alpha
    if icc_profile:
        directory[34675] = icc_profile
    # Pillow places the strip data right after the directory and adds that position to StripOffsets.
    directory[273] = tuple(strip_offsets)
    directory[279] = tuple(len(strip) for strip in strips)
    handle.write(b"II*\x00" + struct.pack("<I", 8))
    handle.write(directory.tobytes(8))
    for strip in strips:
        handle.write(strip)


def _merge_exif_into_tiff(directory: TiffImagePlugin.ImageFileDirectory_v2, exif: bytes) -> None:
    parsed = Image.Exif()
    parsed.load(exif)
    for tag, value in parsed.items():
        if tag in _TIFF_LAYOUT_TAGS:
            continue
        if tag in (_TAG_EXIF_IFD, _TAG_GPS_IFD):
            sub_directory = parsed.get_ifd(tag)
            if sub_directory:
                directory[tag] = dict(sub_directory)
            continue
        directory[tag] = value


# --------------------------------------------------------------------------------------------------------------
# Alpha


def upscale_alpha(alpha: np.ndarray, scale: int) -> np.ndarray:
    """Resize an alpha plane (H, W) in [0, 1] to (H*scale, W*scale) with Pillow's bicubic filter, clamped.

    Bicubic rather than Lanczos: after clamping, bicubic keeps a hard transparency edge monotone, while
    Lanczos' second lobe leaves faint halos (a few percent of opacity) on both sides of it. A constant plane
    (e.g. fully opaque) stays exactly constant.
    """
    plane = np.asarray(alpha, dtype=np.float32)
    if plane.ndim != 2:
        raise ValueError(f"alpha must be a 2-D plane, got shape {plane.shape}")
    if not isinstance(scale, (int, np.integer)) or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    height, width = plane.shape
    size = (width * int(scale), height * int(scale))
    low, high = float(plane.min()), float(plane.max())
    if low == high:
        return np.full((size[1], size[0]), min(max(low, 0.0), 1.0), dtype=np.float32)
    resized = Image.fromarray(np.ascontiguousarray(plane)).resize(size, Image.Resampling.BICUBIC)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)
