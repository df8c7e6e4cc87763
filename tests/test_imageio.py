"""Image I/O: decoding every supported layout exactly, writing with metadata, input expansion, output planning.

All images are generated here and written to tmp_path. Where sr1step writes or reads files by its own code
(PNG, TIFF, 16-bit colour), an independent codec checks the bytes: OpenCV (libpng/libtiff) and tifffile.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageCms, ImageOps

from sr1step.errors import ConfigError, ImageReadError, ImageWriteError
from sr1step.imageio import (
    MAX_INPUT_PIXELS,
    normalize_format,
    read_image,
    upscale_alpha,
    write_image,
)
from sr1step.inputs import InputFile, collect_inputs, plan_outputs


@pytest.fixture
def cv2() -> Any:
    """OpenCV (libpng, libtiff): an independent codec, installed with the eval extra (pyiqa)."""
    return pytest.importorskip("cv2")


@pytest.fixture
def tifffile() -> Any:
    """tifffile: an independent pure-Python TIFF codec, installed with the eval extra (pyiqa -> scikit-image)."""
    return pytest.importorskip("tifffile")


RNG_SEED = 1234


def random_pixels(shape: tuple[int, ...], bit_depth: int = 8, seed: int = RNG_SEED) -> np.ndarray:
    rng = np.random.default_rng(seed)
    top = 255 if bit_depth == 8 else 65535
    return rng.integers(0, top + 1, size=shape).astype(np.uint8 if bit_depth == 8 else np.uint16)


def as_int(plane: np.ndarray, bit_depth: int) -> np.ndarray:
    return np.rint(plane * (255 if bit_depth == 8 else 65535)).astype(np.int64)


def srgb_profile() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def gray_profile_bytes() -> bytes:
    """A syntactically minimal ICC header that declares GRAY data (enough for the colour-space check)."""
    header = bytearray(128)
    struct.pack_into(">I", header, 0, 128)
    header[12:16] = b"mntr"
    header[16:20] = b"GRAY"
    header[20:24] = b"XYZ "
    header[36:40] = b"acsp"
    return bytes(header) + struct.pack(">I", 0)


def cmyk_profile() -> bytes:
    """A small valid ICC v2 CMYK printer profile (lut16 A2B0 to Lab) mapping every ink to neutral gray.

    Colour-managed conversion through it turns pure cyan into gray, which a naive CMYK->RGB formula never does.
    """

    def s15(value: float) -> bytes:
        return struct.pack(">i", round(value * 65536))

    def text_description(text: str) -> bytes:
        ascii_text = text.encode() + b"\x00"
        return (
            b"desc\x00\x00\x00\x00"
            + struct.pack(">I", len(ascii_text))
            + ascii_text
            + struct.pack(">II", 0, 0)
            + struct.pack(">HB", 0, 0)
            + bytes(67)
        )

    clut = []
    for c in (0, 1):
        for m in (0, 1):
            for y in (0, 1):
                for k in (0, 1):
                    lightness = 100.0 * (1 - k) * (1 - 0.6 * max(c, m, y))
                    clut += [round(lightness / 100 * 0xFF00), 0x8000, 0x8000]
    lut = (
        b"mft2\x00\x00\x00\x00"
        + bytes([4, 3, 2, 0])
        + b"".join(s15(1.0 if row == col else 0.0) for row in range(3) for col in range(3))
        + struct.pack(">HH", 2, 2)
        + struct.pack(">8H", *([0, 65535] * 4))
        + struct.pack(f">{len(clut)}H", *clut)
        + struct.pack(">6H", *([0, 65535] * 3))
    )
    tags = [
        (b"desc", text_description("sr1step test CMYK")),
        (b"wtpt", b"XYZ \x00\x00\x00\x00" + s15(0.9642) + s15(1.0) + s15(0.8249)),
        (b"cprt", b"text\x00\x00\x00\x00no copyright\x00"),
        (b"A2B0", lut),
    ]
    table_size = 4 + 12 * len(tags)
    offset = 128 + table_size
    table, data = struct.pack(">I", len(tags)), b""
    for signature, body in tags:
        padded = body + bytes(-len(body) % 4)
        table += signature + struct.pack(">II", offset + len(data), len(body))
        data += padded
    header = bytearray(128)
    struct.pack_into(">I", header, 0, 128 + table_size + len(data))
    struct.pack_into(">I", header, 8, 0x02100000)
    header[12:16], header[16:20], header[20:24] = b"prtr", b"CMYK", b"Lab "
    struct.pack_into(">6H", header, 24, 2024, 1, 1, 0, 0, 0)
    header[36:40] = b"acsp"
    header[68:80] = s15(0.9642) + s15(1.0) + s15(0.8249)
    return bytes(header) + table + data


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def interlaced_png_16bit(pixels: np.ndarray) -> bytes:
    """An Adam7-interlaced 16-bit PNG built from the specification, with filter 0 on every row."""
    height, width, channels = pixels.shape
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    passes = [
        (0, 0, 8, 8),
        (4, 0, 8, 8),
        (0, 4, 4, 8),
        (2, 0, 4, 4),
        (0, 2, 2, 4),
        (1, 0, 2, 2),
        (0, 1, 1, 2),
    ]
    raw = b""
    for x0, y0, dx, dy in passes:
        sub_image = pixels[y0::dy, x0::dx]
        if sub_image.size == 0:
            continue
        for row in sub_image.astype(">u2"):
            raw += b"\x00" + row.tobytes()
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 1)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(raw))
        + png_chunk(b"IEND", b"")
    )


def cv2_read_rgb_order(cv2: Any, path: Path) -> np.ndarray:
    """OpenCV's decoding with channels in RGB(A) order and always a channel axis."""
    pixels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert pixels is not None, f"OpenCV could not read {path}"
    if pixels.ndim == 2:
        return pixels[:, :, None]
    if pixels.shape[2] == 3:
        return pixels[:, :, ::-1]
    return np.concatenate([pixels[:, :, 2::-1], pixels[:, :, 3:]], axis=2)


# ----------------------------------------------------------------------------------------------------------
# Reading: 8-bit layouts


def test_read_rgb_png_exact_values(tmp_path: Path) -> None:
    pixels = random_pixels((7, 9, 3))
    Image.fromarray(pixels).save(tmp_path / "a.png")
    image = read_image(tmp_path / "a.png")
    assert image.rgb.dtype == np.float32 and image.rgb.shape == (7, 9, 3)
    assert np.array_equal(image.rgb, pixels.astype(np.float32) / np.float32(255))
    assert (image.alpha, image.is_gray, image.bit_depth, image.source_format) == (None, False, 8, "PNG")
    assert (image.width, image.height) == (9, 7)


def test_read_rgba_and_la(tmp_path: Path) -> None:
    rgba = random_pixels((5, 6, 4))
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    image = read_image(tmp_path / "rgba.png")
    assert np.array_equal(as_int(image.rgb, 8), rgba[:, :, :3])
    assert image.alpha is not None and np.array_equal(as_int(image.alpha, 8), rgba[:, :, 3])

    la = random_pixels((5, 6, 2), seed=2)
    Image.fromarray(la).save(tmp_path / "la.png")
    image = read_image(tmp_path / "la.png")
    assert image.is_gray and image.rgb.shape == (5, 6, 3)
    assert np.array_equal(as_int(image.rgb, 8), np.repeat(la[:, :, :1], 3, axis=2))
    assert image.alpha is not None and np.array_equal(as_int(image.alpha, 8), la[:, :, 1])


def test_read_gray_and_bilevel(tmp_path: Path) -> None:
    gray = random_pixels((4, 5))
    Image.fromarray(gray).save(tmp_path / "l.png")
    image = read_image(tmp_path / "l.png")
    assert image.is_gray and image.alpha is None and image.bit_depth == 8
    assert all(np.array_equal(as_int(image.rgb[:, :, c], 8), gray) for c in range(3))

    Image.fromarray(gray > 127).save(tmp_path / "bits.png")
    image = read_image(tmp_path / "bits.png")
    assert image.is_gray and np.array_equal(as_int(image.rgb[:, :, 0], 8), np.where(gray > 127, 255, 0))


def test_read_palette_with_and_without_transparency(tmp_path: Path) -> None:
    indices = np.array([[0, 1, 2], [2, 1, 0]], dtype=np.uint8)
    palette = [255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9)
    image = Image.fromarray(indices, mode="P")
    image.putpalette(palette)
    image.save(tmp_path / "p.png")
    image.save(tmp_path / "p_trns.png", transparency=1)
    image.save(tmp_path / "p_trns.gif", transparency=1)

    opaque = read_image(tmp_path / "p.png")
    assert opaque.alpha is None and not opaque.is_gray
    assert np.array_equal(as_int(opaque.rgb[0, 0], 8), [255, 0, 0])
    assert np.array_equal(as_int(opaque.rgb[0, 2], 8), [0, 0, 255])
    for name in ("p_trns.png", "p_trns.gif"):
        decoded = read_image(tmp_path / name)
        assert decoded.alpha is not None
        assert np.array_equal(as_int(decoded.alpha, 8), np.where(indices == 1, 0, 255)), name


def test_read_colour_key_transparency(tmp_path: Path) -> None:
    rgb = np.zeros((2, 3, 3), dtype=np.uint8)
    rgb[0, 1] = (1, 2, 3)
    Image.fromarray(rgb).save(tmp_path / "key.png", transparency=(1, 2, 3))
    image = read_image(tmp_path / "key.png")
    assert image.alpha is not None
    assert np.array_equal(as_int(image.alpha, 8), [[255, 0, 255], [255, 255, 255]])

    gray = np.array([[5, 6], [6, 5]], dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "gray_key.png", transparency=5)
    image = read_image(tmp_path / "gray_key.png")
    assert image.is_gray and image.alpha is not None
    assert np.array_equal(as_int(image.alpha, 8), [[0, 255], [255, 0]])


def test_read_cmyk_without_profile_uses_plain_conversion(tmp_path: Path) -> None:
    cmyk = random_pixels((4, 4, 4))
    Image.fromarray(cmyk, mode="CMYK").save(tmp_path / "c.tiff")
    image = read_image(tmp_path / "c.tiff")
    expected = np.asarray(Image.fromarray(cmyk, mode="CMYK").convert("RGB"))
    assert np.array_equal(as_int(image.rgb, 8), expected)
    assert image.icc_profile is None and not image.is_gray
    assert any("CMYK" in note for note in image.notes)


def test_read_cmyk_with_profile_is_colour_managed_to_srgb(tmp_path: Path) -> None:
    cyan = np.zeros((4, 4, 4), dtype=np.uint8)
    cyan[:, :, 0] = 255
    Image.fromarray(cyan, mode="CMYK").save(tmp_path / "cyan.jpg", icc_profile=cmyk_profile(), quality=100)
    image = read_image(tmp_path / "cyan.jpg")
    pixel = as_int(image.rgb[2, 2], 8)
    # The profile maps every ink to neutral gray at L*=40; plain conversion would give cyan (0, 255, 255).
    assert np.ptp(pixel) <= 3 and 80 < pixel[0] < 120, pixel
    assert image.icc_profile is not None and image.icc_profile[16:20] == b"RGB "
    assert any("ICC" in note for note in image.notes)


def test_read_cmyk_with_a_non_cmyk_profile_drops_it(tmp_path: Path) -> None:
    cmyk = random_pixels((3, 3, 4))
    Image.fromarray(cmyk, mode="CMYK").save(tmp_path / "bad.tiff", icc_profile=srgb_profile())
    image = read_image(tmp_path / "bad.tiff")
    assert image.icc_profile is None  # an sRGB profile cannot describe CMYK numbers, nor be kept for RGB
    assert np.array_equal(as_int(image.rgb, 8), np.asarray(Image.fromarray(cmyk, mode="CMYK").convert("RGB")))


def test_read_animated_gif_takes_first_frame_with_note(tmp_path: Path) -> None:
    frames = [Image.new("P", (4, 3), color) for color in (1, 2, 3)]
    for frame in frames:
        frame.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 756)
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    image = read_image(tmp_path / "anim.gif")
    assert np.array_equal(as_int(image.rgb[0, 0], 8), [255, 0, 0])
    assert any("3 frames" in note for note in image.notes)


# ----------------------------------------------------------------------------------------------------------
# Reading: 16-bit


def test_read_16bit_gray_png_and_tiff_exact(tmp_path: Path) -> None:
    gray = random_pixels((6, 7), bit_depth=16)
    Image.fromarray(gray).save(tmp_path / "g16.png")
    Image.fromarray(gray).save(tmp_path / "g16.tiff")
    for name in ("g16.png", "g16.tiff"):
        image = read_image(tmp_path / name)
        assert image.is_gray and image.bit_depth == 16, name
        assert np.array_equal(as_int(image.rgb[:, :, 1], 16), gray), name


@pytest.mark.parametrize("channels", [3, 4])
def test_read_16bit_colour_png_written_by_libpng_exact(tmp_path: Path, channels: int, cv2: Any) -> None:
    pixels = random_pixels((11, 13, channels), bit_depth=16)
    bgr = pixels[:, :, [2, 1, 0, 3][:channels]]
    assert cv2.imwrite(str(tmp_path / "c16.png"), bgr)
    image = read_image(tmp_path / "c16.png")
    assert image.bit_depth == 16 and not image.is_gray
    assert np.array_equal(as_int(image.rgb, 16), pixels[:, :, :3])
    if channels == 4:
        assert image.alpha is not None and np.array_equal(as_int(image.alpha, 16), pixels[:, :, 3])


@pytest.mark.parametrize("channels", [2, 3, 4])
def test_read_16bit_interlaced_png_exact(tmp_path: Path, channels: int) -> None:
    pixels = random_pixels((10, 9, channels), bit_depth=16, seed=channels)
    (tmp_path / "adam7.png").write_bytes(interlaced_png_16bit(pixels))
    image = read_image(tmp_path / "adam7.png")
    assert image.bit_depth == 16
    color = pixels[:, :, :1] if channels == 2 else pixels[:, :, :3]
    assert np.array_equal(as_int(image.rgb, 16), np.broadcast_to(color, (10, 9, 3)))
    assert image.is_gray == (channels == 2)
    if channels in (2, 4):
        assert image.alpha is not None and np.array_equal(as_int(image.alpha, 16), pixels[:, :, -1])


def test_read_16bit_rgb_tiff_from_several_writers_exact(tmp_path: Path, cv2: Any, tifffile: Any) -> None:
    pixels = random_pixels((9, 12, 3), bit_depth=16)
    assert cv2.imwrite(str(tmp_path / "lzw.tif"), pixels[:, :, ::-1])  # OpenCV writes LZW
    tifffile.imwrite(tmp_path / "big_endian.tif", pixels, byteorder=">", photometric="rgb")
    tifffile.imwrite(tmp_path / "deflate.tif", pixels, photometric="rgb", compression="zlib", predictor=True)
    for name in ("lzw.tif", "big_endian.tif", "deflate.tif"):
        image = read_image(tmp_path / name)
        assert image.bit_depth == 16 and image.source_format == "TIFF", name
        assert np.array_equal(as_int(image.rgb, 16), pixels), name


def test_read_16bit_tiff_alpha_straight_and_premultiplied(tmp_path: Path, tifffile: Any) -> None:
    color = random_pixels((5, 6, 3), bit_depth=16)
    alpha = np.full((5, 6), 32768, dtype=np.uint16)
    alpha[0, 0] = 0
    straight = np.concatenate([color, alpha[:, :, None]], axis=2)
    tifffile.imwrite(tmp_path / "straight.tif", straight, photometric="rgb", extrasamples=["unassalpha"])
    image = read_image(tmp_path / "straight.tif")
    assert np.array_equal(as_int(image.rgb, 16), color)
    assert image.alpha is not None and np.array_equal(as_int(image.alpha, 16), alpha)

    premultiplied = straight.copy()
    premultiplied[:, :, :3] = np.rint(color.astype(np.float64) * alpha[:, :, None] / 65535).astype(np.uint16)
    tifffile.imwrite(
        tmp_path / "premultiplied.tif", premultiplied, photometric="rgb", extrasamples=["assocalpha"]
    )
    image = read_image(tmp_path / "premultiplied.tif")
    visible = alpha > 0
    # Undoing the premultiplication by ~0.5 loses at most about one step of the 16-bit scale, times two.
    assert np.abs(as_int(image.rgb, 16) - color)[visible].max() <= 3
    assert np.array_equal(as_int(image.rgb[0, 0], 16), [0, 0, 0])


def gray_12bit_tiff(values: np.ndarray) -> bytes:
    """An uncompressed 12-bit gray TIFF assembled from the TIFF 6.0 specification (MSB-first packed rows)."""
    height, width = values.shape
    rows = b""
    for row in values:
        bits = "".join(f"{int(value):012b}" for value in row)
        bits += "0" * (-len(bits) % 8)
        rows += int(bits, 2).to_bytes(len(bits) // 8, "big")
    entries = [(256, 3, width), (257, 3, height), (258, 3, 12), (259, 3, 1), (262, 3, 1)]
    entries += [(273, 4, 0), (277, 3, 1), (278, 3, height), (279, 4, len(rows))]
    data_offset = 8 + 2 + 12 * len(entries) + 4
    directory = struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        value = data_offset if tag == 273 else value
        packed = struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)
        directory += struct.pack("<HHI", tag, kind, 1) + packed
    return b"II*\x00" + struct.pack("<I", 8) + directory + struct.pack("<I", 0) + rows


def test_read_12bit_tiff_is_rescaled_to_16_bits(tmp_path: Path) -> None:
    values = random_pixels((5, 7), bit_depth=16) >> 4
    values[0, 0] = 4095
    (tmp_path / "g12.tif").write_bytes(gray_12bit_tiff(values))
    image = read_image(tmp_path / "g12.tif")
    assert image.bit_depth == 16 and image.is_gray
    assert image.rgb[0, 0, 0] == 1.0  # full scale stays full scale
    assert np.abs(image.rgb[:, :, 0] * 4095 - values).max() < 0.05
    assert any("12-bit" in note for note in image.notes)


def test_read_16bit_planar_tiff_is_refused_not_misread(tmp_path: Path, tifffile: Any) -> None:
    planes = random_pixels((3, 4, 5), bit_depth=16)
    tifffile.imwrite(tmp_path / "planar.tif", planes, photometric="rgb", planarconfig="separate")
    with pytest.raises(ImageReadError, match="planar.tif: 16-bit TIFF with separate colour planes"):
        read_image(tmp_path / "planar.tif")


# ----------------------------------------------------------------------------------------------------------
# EXIF orientation, ICC, EXIF


def upright_reference() -> np.ndarray:
    """A 3x5 image whose every pixel is distinct, so any wrong flip or rotation is visible."""
    return random_pixels((3, 5, 3), seed=7)


# How a camera stores an upright picture for each EXIF orientation (the inverse of what a viewer applies),
# written from the EXIF definitions of where row 0 / column 0 of the stored image belong.
STORED_FOR_ORIENTATION = {
    1: lambda u: u,
    2: lambda u: u[:, ::-1],  # row 0 top, column 0 right
    3: lambda u: u[::-1, ::-1],  # row 0 bottom, column 0 right
    4: lambda u: u[::-1],  # row 0 bottom, column 0 left
    5: lambda u: u.transpose(1, 0, 2),  # row 0 left, column 0 top
    6: lambda u: np.rot90(u, 1),  # row 0 right, column 0 top (viewer turns it 90 degrees clockwise)
    7: lambda u: np.rot90(u, 1)[:, ::-1],  # row 0 right, column 0 bottom
    8: lambda u: np.rot90(u, -1),  # row 0 left, column 0 bottom (viewer turns it counter-clockwise)
}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_turns_pixels_upright(tmp_path: Path, orientation: int) -> None:
    upright = upright_reference()
    stored = np.ascontiguousarray(STORED_FOR_ORIENTATION[orientation](upright))
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = "sr1step-test"
    path = tmp_path / f"o{orientation}.png"
    Image.fromarray(stored).save(path, exif=exif.tobytes())

    image = read_image(path)
    assert np.array_equal(as_int(image.rgb, 8), upright)
    with Image.open(path) as reference:  # Pillow's exif_transpose agrees
        assert np.array_equal(np.asarray(ImageOps.exif_transpose(reference)), upright)
    kept = Image.Exif()
    kept.load(image.exif)
    assert kept[0x0112] == 1 and kept[0x010F] == "sr1step-test"


@pytest.mark.parametrize("orientation", [3, 5, 6, 8])
def test_exif_orientation_in_jpeg_tiff_and_webp(tmp_path: Path, orientation: int) -> None:
    upright = random_pixels((16, 24, 3), seed=orientation)
    stored = np.ascontiguousarray(STORED_FOR_ORIENTATION[orientation](upright))
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(tmp_path / "o.jpg", exif=exif.tobytes(), quality=90)
    Image.fromarray(stored).save(tmp_path / "o.tiff", exif=exif.tobytes())
    Image.fromarray(stored).save(tmp_path / "o.webp", exif=exif.tobytes(), lossless=True)
    for name in ("o.tiff", "o.webp"):  # lossless: exact
        assert np.array_equal(as_int(read_image(tmp_path / name).rgb, 8), upright), name
    image = read_image(tmp_path / "o.jpg")
    with Image.open(tmp_path / "o.jpg") as reference:
        expected = np.asarray(ImageOps.exif_transpose(reference))
    assert expected.shape == upright.shape and np.array_equal(as_int(image.rgb, 8), expected)


@pytest.mark.parametrize("fmt", ["png", "tiff"])
def test_16bit_alpha_image_is_rotated_once_with_its_alpha(tmp_path: Path, fmt: str) -> None:
    pixels = random_pixels((4, 6, 4), bit_depth=16)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / f"r.{fmt}"
    write_image(
        path, pixels[:, :, :3] / 65535, alpha=pixels[:, :, 3] / 65535, bit_depth=16, exif=exif.tobytes()
    )
    image = read_image(path)
    upright = np.rot90(pixels, -1)  # orientation 6: turn 90 degrees clockwise
    assert np.array_equal(as_int(image.rgb, 16), upright[:, :, :3])
    assert image.alpha is not None and np.array_equal(as_int(image.alpha, 16), upright[:, :, 3])


def big_endian_exif(orientation: int) -> bytes:
    """EXIF as Canon/Nikon cameras write it (Motorola byte order), with a maker-note-like blob that must
    survive byte for byte: IFD0 = Make (ASCII, stored out of line) + Orientation (SHORT, inline)."""
    make = b"BigEndianCam\x00"
    entries = struct.pack(">HHI", 0x010F, 2, len(make)) + struct.pack(">I", 8 + 2 + 2 * 12 + 4)
    entries += struct.pack(">HHI", 0x0112, 3, 1) + struct.pack(">HH", orientation, 0)
    body = b"MM\x00*" + struct.pack(">I", 8) + struct.pack(">H", 2) + entries + struct.pack(">I", 0) + make
    return b"Exif\x00\x00" + body + b"MAKERNOTE\x01\x02\x03"


def test_big_endian_exif_orientation_is_applied_and_reset_in_place(tmp_path: Path) -> None:
    stored = random_pixels((4, 6, 3))
    exif = big_endian_exif(6)
    Image.fromarray(stored).save(tmp_path / "cam.png", exif=exif)
    image = read_image(tmp_path / "cam.png")
    assert np.array_equal(as_int(image.rgb, 8), np.rot90(stored, -1))
    assert image.exif is not None and len(image.exif) == len(exif)
    changed = [index for index, (a, b) in enumerate(zip(image.exif, exif, strict=True)) if a != b]
    assert len(changed) == 1 and image.exif[changed[0]] == 1  # only the orientation value byte
    parsed = Image.Exif()
    parsed.load(image.exif)
    assert parsed[0x0112] == 1 and parsed[0x010F] == "BigEndianCam"


def test_tiff_source_exif_keeps_metadata_but_not_pixel_layout_tags(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x010F] = "tiff-make"
    exif[0x0112] = 3
    Image.fromarray(random_pixels((3, 4, 3))).save(tmp_path / "t.tiff", exif=exif.tobytes())
    image = read_image(tmp_path / "t.tiff")
    assert image.exif is not None
    parsed = Image.Exif()
    parsed.load(image.exif)
    assert parsed[0x010F] == "tiff-make" and parsed.get(0x0112, 1) == 1
    assert not {256, 257, 258, 259, 273, 279} & set(parsed)  # the TIFF's own strip layout is not carried


def metadata_exif(width: int, height: int) -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "sr1step-make"
    exif[0x0112] = 1
    exif_ifd = exif.get_ifd(0x8769)
    exif_ifd[0xA002] = width
    exif_ifd[0xA003] = height
    exif_ifd[0x9003] = "2024:01:02 03:04:05"
    return exif.tobytes()


@pytest.mark.parametrize("fmt", ["png", "jpg", "webp", "tiff"])
def test_icc_profile_and_exif_are_kept(tmp_path: Path, fmt: str) -> None:
    profile = srgb_profile()
    rgb = random_pixels((8, 10, 3)).astype(np.float32) / 255
    notes = write_image(tmp_path / f"out.{fmt}", rgb, icc_profile=profile, exif=metadata_exif(2, 3))
    assert notes == []
    with Image.open(tmp_path / f"out.{fmt}") as written:
        assert written.info.get("icc_profile") == profile
        exif = written.getexif()
        assert exif[0x010F] == "sr1step-make"
        exif_ifd = exif.get_ifd(0x8769)
        assert exif_ifd[0x9003] == "2024:01:02 03:04:05"
        # The pixel dimensions are updated to the written image.
        assert (exif_ifd[0xA002], exif_ifd[0xA003]) == (10, 8)
    again = read_image(tmp_path / f"out.{fmt}")
    assert again.icc_profile == profile and again.exif is not None


def test_jpeg_metadata_survives_read_then_write(tmp_path: Path) -> None:
    profile = srgb_profile()
    exif = Image.Exif()
    exif[0x0112] = 8
    exif[0x0110] = "phone"
    stored = random_pixels((6, 4, 3))
    Image.fromarray(stored).save(tmp_path / "in.jpg", icc_profile=profile, exif=exif.tobytes())
    image = read_image(tmp_path / "in.jpg")
    assert image.rgb.shape[:2] == (4, 6)  # turned by orientation 8
    write_image(tmp_path / "out.png", image.rgb, icc_profile=image.icc_profile, exif=image.exif)
    with Image.open(tmp_path / "out.png") as written:
        assert written.info["icc_profile"] == profile
        assert written.getexif()[0x0110] == "phone"
        assert written.getexif()[0x0112] == 1  # pixels are upright: viewers must not turn them again


def test_icc_profile_of_the_wrong_colour_space_is_left_out(tmp_path: Path) -> None:
    rgb = np.full((3, 3, 3), 0.5, dtype=np.float32)
    notes = write_image(tmp_path / "o.png", rgb, icc_profile=gray_profile_bytes())
    assert any("ICC profile left out" in note for note in notes)
    with Image.open(tmp_path / "o.png") as written:
        assert "icc_profile" not in written.info
    notes = write_image(tmp_path / "g.png", rgb, is_gray=True, icc_profile=gray_profile_bytes())
    assert notes == []
    with Image.open(tmp_path / "g.png") as written:
        assert written.mode == "L" and written.info["icc_profile"] == gray_profile_bytes()


# ----------------------------------------------------------------------------------------------------------
# Writing


@pytest.mark.parametrize("fmt", ["png", "tiff"])
@pytest.mark.parametrize("bit_depth", [8, 16])
@pytest.mark.parametrize("layout", ["gray", "gray+alpha", "rgb", "rgba"])
def test_lossless_write_round_trip_exact_and_independently_decodable(
    tmp_path: Path, fmt: str, bit_depth: int, layout: str, cv2: Any, tifffile: Any
) -> None:
    top = 255 if bit_depth == 8 else 65535
    channels = {"gray": 1, "gray+alpha": 2, "rgb": 3, "rgba": 4}[layout]
    pixels = random_pixels((37, 29, channels), bit_depth=bit_depth, seed=channels * bit_depth)
    is_gray = channels <= 2
    color = pixels[:, :, :1] if is_gray else pixels[:, :, :3]
    alpha = pixels[:, :, -1] if channels in (2, 4) else None
    path = tmp_path / f"out.{fmt}"
    notes = write_image(
        path,
        np.broadcast_to(color, (37, 29, 3)).astype(np.float32) / top,
        alpha=None if alpha is None else alpha.astype(np.float32) / top,
        is_gray=is_gray,
        bit_depth=bit_depth,
    )
    stored_as_rgba = fmt == "tiff" and layout == "gray+alpha" and bit_depth == 16
    assert bool(notes) == stored_as_rgba

    image = read_image(path)
    assert image.bit_depth == bit_depth
    assert image.is_gray == (is_gray and not stored_as_rgba)
    assert np.array_equal(as_int(image.rgb, bit_depth), np.broadcast_to(color, (37, 29, 3)))
    if alpha is None:
        assert image.alpha is None
    else:
        assert image.alpha is not None and np.array_equal(as_int(image.alpha, bit_depth), alpha)

    # Independent decoders see the same numbers.
    if fmt == "png" or layout != "gray+alpha":  # libtiff via OpenCV drops a gray image's alpha
        decoded = cv2_read_rgb_order(cv2, path)
        expected = pixels
        if channels == 2 and decoded.shape[2] == 4:  # OpenCV expands gray+alpha PNG to BGRA
            decoded = decoded[:, :, [0, 3]]
        if stored_as_rgba:
            expected = np.concatenate([np.repeat(pixels[:, :, :1], 3, axis=2), pixels[:, :, 1:]], axis=2)
        if fmt == "tiff" and layout == "rgba" and bit_depth == 8:
            # OpenCV reads 8-bit RGBA TIFF through libtiff's RGBA interface, which premultiplies colour by an
            # alpha it recognises as straight (unassociated): proof the ExtraSamples tag says so.
            premultiplied = np.rint(pixels[:, :, :3] * (pixels[:, :, 3:] / 255.0))
            assert np.abs(decoded[:, :, :3] - premultiplied).max() <= 1
            expected = np.concatenate([decoded[:, :, :3], pixels[:, :, 3:]], axis=2)
        assert decoded.dtype == pixels.dtype and np.array_equal(decoded, expected)
    if fmt == "tiff":
        decoded = tifffile.imread(path)
        if stored_as_rgba:
            decoded = decoded[:, :, [0, 3]]
        assert np.array_equal(decoded.reshape(pixels.shape), pixels)


def test_png_writer_handles_large_smooth_images(tmp_path: Path, cv2: Any) -> None:
    # Several filter blocks, and rows where every PNG filter type wins somewhere.
    y, x = np.mgrid[0:300, 0:700]
    smooth = np.stack([x * 90 + y, y * 200, (x * y) % 65536], axis=2).astype(np.uint16)
    write_image(tmp_path / "big.png", smooth / 65535, bit_depth=16)
    assert np.array_equal(cv2_read_rgb_order(cv2, tmp_path / "big.png"), smooth)


def test_quantisation_rounds_half_to_even_and_clamps(tmp_path: Path) -> None:
    values = np.array([[-0.5, 2.5 / 255, 3.5 / 255, 0.5, 1.0, 7.0]], dtype=np.float32)
    rgb = np.repeat(values[:, :, None], 3, axis=2)
    write_image(tmp_path / "q.png", rgb)
    stored = np.asarray(Image.open(tmp_path / "q.png"))[0, :, 0]
    expected = np.rint(np.clip(values[0], 0, 1) * np.float32(255)).astype(np.uint8)
    assert np.array_equal(stored, expected)
    assert list(stored[:3]) == [0, 2, 4]  # 2.5 -> 2 and 3.5 -> 4: half to even


def test_gray_output_is_luma_of_the_colour_planes(tmp_path: Path) -> None:
    rgb = np.zeros((1, 2, 3), dtype=np.float32)
    rgb[0, 0] = (1.0, 0.0, 0.0)
    rgb[0, 1] = (0.2, 0.2, 0.2)
    write_image(tmp_path / "g.png", rgb, is_gray=True)
    with Image.open(tmp_path / "g.png") as written:
        assert written.mode == "L"
        assert list(np.asarray(written)[0]) == [76, 51]  # 0.299 * 255 and 0.2 * 255, rounded


def test_jpeg_with_transparency_is_composited_over_white(tmp_path: Path) -> None:
    rgb = np.zeros((8, 8, 3), dtype=np.float32)
    alpha = np.ones((8, 8), dtype=np.float32)
    alpha[:, :4] = 0.0
    notes = write_image(tmp_path / "a.jpg", rgb, alpha=alpha, quality=100)
    assert any("white" in note for note in notes)
    with Image.open(tmp_path / "a.jpg") as written:
        assert written.mode == "RGB"
        pixels = np.asarray(written).astype(int)
    assert pixels[:, :2].min() >= 250 and pixels[:, 6:].max() <= 5

    notes = write_image(tmp_path / "opaque.jpg", rgb, alpha=np.ones((8, 8), dtype=np.float32))
    assert notes == []  # an all-opaque alpha loses nothing


def test_webp_keeps_alpha_and_jpeg_16bit_is_noted(tmp_path: Path) -> None:
    rgb = np.full((6, 6, 3), 0.25, dtype=np.float32)
    alpha = np.zeros((6, 6), dtype=np.float32)
    alpha[3:] = 1.0
    write_image(tmp_path / "a.webp", rgb, alpha=alpha, quality=100)
    image = read_image(tmp_path / "a.webp")
    assert image.alpha is not None and image.alpha[0, 0] == 0.0 and image.alpha[5, 5] == 1.0
    notes = write_image(tmp_path / "b.jpg", rgb, bit_depth=16)
    assert any("8 bits" in note for note in notes)
    assert read_image(tmp_path / "b.jpg").bit_depth == 8


def test_write_rejects_nan_and_unknown_format(tmp_path: Path) -> None:
    rgb = np.zeros((2, 2, 3), dtype=np.float32)
    rgb[0, 0, 0] = np.nan
    with pytest.raises(ImageWriteError, match="NaN"):
        write_image(tmp_path / "n.png", rgb)
    assert not (tmp_path / "n.png").exists()
    with pytest.raises(ConfigError, match="extension"):
        write_image(tmp_path / "n.xyz", np.zeros((2, 2, 3), dtype=np.float32))
    with pytest.raises(ConfigError, match="unknown output format"):
        write_image(tmp_path / "n.png", np.zeros((2, 2, 3), dtype=np.float32), fmt="heic")
    assert normalize_format("JPEG") == "jpg" and normalize_format(".tif") == "tiff"


def test_write_into_a_path_under_a_file_fails_with_its_name(tmp_path: Path) -> None:
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    target = blocker / "sub" / "out.png"
    with pytest.raises(ImageWriteError) as raised:
        write_image(target, np.zeros((2, 2, 3), dtype=np.float32))
    assert str(target) in str(raised.value) and "\n" not in str(raised.value)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores folder permissions")
def test_write_into_a_read_only_folder_fails_with_its_name(tmp_path: Path) -> None:
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(ImageWriteError, match="locked"):
            write_image(folder / "out.png", np.zeros((2, 2, 3), dtype=np.float32))
    finally:
        folder.chmod(0o700)


def test_write_creates_missing_output_folders(tmp_path: Path) -> None:
    write_image(tmp_path / "a" / "b" / "out.tiff", np.zeros((2, 2, 3), dtype=np.float32))
    assert read_image(tmp_path / "a" / "b" / "out.tiff").rgb.shape == (2, 2, 3)


def test_failed_write_leaves_no_temp_file_and_keeps_old_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sr1step.imageio as imageio_module

    target = tmp_path / "out.png"
    target.write_bytes(b"previous result")

    def failing_writer(handle, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        handle.write(b"\x89PNG half written")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(imageio_module, "_write_png", failing_writer)
    with pytest.raises(ImageWriteError, match="No space left on device"):
        write_image(target, np.zeros((2, 2, 3), dtype=np.float32))
    assert target.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


# ----------------------------------------------------------------------------------------------------------
# Read errors


def test_read_errors_name_the_file_and_the_reason(tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    Image.fromarray(random_pixels((64, 64, 3))).save(good)
    data = good.read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "corrupt.png").write_bytes(data[:60] + bytes(len(data) - 60))
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.png").write_text("this is not an image\n")
    Image.fromarray(random_pixels((4, 4, 3))).save(tmp_path / "image.ppm")
    Image.fromarray(random_pixels((64, 64, 3))).save(tmp_path / "good.jpg")
    jpeg = (tmp_path / "good.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (tmp_path / "folder.png").mkdir()

    cases = {
        "truncated.png": "cannot decode",
        "corrupt.png": "cannot decode",
        "truncated.jpg": "cannot decode",
        "empty.png": "empty file",
        "notes.png": "not an image in a supported format",
        "image.ppm": "not an image in a supported format",
        "missing.png": "no such file",
        "folder.png": "is a folder",
    }
    for name, reason in cases.items():
        with pytest.raises(ImageReadError) as raised:
            read_image(tmp_path / name)
        message = str(raised.value)
        assert str(tmp_path / name) in message and reason in message, message
        assert "\n" not in message


def test_oversized_image_is_refused_before_decoding(tmp_path: Path) -> None:
    side = int(MAX_INPUT_PIXELS**0.5) + 10
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    (tmp_path / "bomb.png").write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b""))
        + png_chunk(b"IEND", b"")
    )
    with pytest.raises(ImageReadError, match="decompression bomb") as raised:
        read_image(tmp_path / "bomb.png")
    assert "bomb.png" in str(raised.value)


# ----------------------------------------------------------------------------------------------------------
# Alpha upscaling


def test_upscale_alpha_shape_range_and_constant_planes() -> None:
    step = np.zeros((6, 8), dtype=np.float32)
    step[:, 4:] = 1.0
    unclamped = np.asarray(Image.fromarray(step).resize((32, 24), Image.Resampling.BICUBIC))
    assert unclamped.min() < -0.05 and unclamped.max() > 1.05  # bicubic overshoots at the edge...
    up = upscale_alpha(step, 4)
    assert up.shape == (24, 32) and up.dtype == np.float32
    assert up.min() == 0.0 and up.max() == 1.0  # ...which is clamped away
    assert np.all(up[:, :12] == 0.0) and np.all(up[:, 20:] == 1.0)  # no halo on either side
    assert np.all(np.diff(up, axis=1) >= 0.0)  # the edge stays monotone
    assert 0.0 < up[0, 15] < 1.0  # and soft: a classical resampler, not nearest neighbour

    opaque = upscale_alpha(np.ones((3, 5), dtype=np.float32), 2)
    assert opaque.shape == (6, 10) and np.all(opaque == 1.0)
    with pytest.raises(ValueError):
        upscale_alpha(step, 0)
    with pytest.raises(ValueError):
        upscale_alpha(np.zeros((2, 2, 1), dtype=np.float32), 2)


# ----------------------------------------------------------------------------------------------------------
# Input expansion


def touch_image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (2, 2)).save(path, format="PNG")
    return path


@pytest.fixture
def photo_tree(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    for rel in ("b.png", "a.JPG", "c.webp", "sub/a.png", "sub/deeper/d.tif", ".hidden/e.png"):
        touch_image(root / rel)
    (root / "readme.txt").write_text("not an image")
    (root / ".a.png.x1y2.tmp").write_bytes(b"partial")
    (root / ".secret.png").write_bytes(b"hidden")
    return root


def rels(items: list[InputFile]) -> list[str]:
    return [item.rel.as_posix() for item in items]


def test_collect_folder_flat_and_recursive(photo_tree: Path) -> None:
    flat = collect_inputs([str(photo_tree)])
    assert rels(flat) == ["a.JPG", "b.png", "c.webp"]
    assert all(not item.explicit for item in flat)
    deep = collect_inputs([str(photo_tree)], recursive=True)
    assert rels(deep) == ["a.JPG", "b.png", "c.webp", "sub/a.png", "sub/deeper/d.tif"]


def test_collect_globs(photo_tree: Path) -> None:
    assert rels(collect_inputs([str(photo_tree / "*.png")])) == ["b.png"]
    found = collect_inputs([str(photo_tree / "**" / "*.png")], recursive=True)
    assert rels(found) == ["b.png", "sub/a.png"]
    assert rels(collect_inputs([str(photo_tree / "sub" / "?.png")])) == ["a.png"]


def test_collect_explicit_files_deduplicates_and_keeps_order(photo_tree: Path) -> None:
    found = collect_inputs([str(photo_tree / "c.webp"), str(photo_tree), str(photo_tree / "b.png")])
    assert rels(found) == ["c.webp", "a.JPG", "b.png"]
    assert found[0].explicit and not found[1].explicit
    # Names that differ only in case are different files on Linux: both are kept, and their outputs are
    # kept apart as if the file system ignored case.
    touch_image(photo_tree / "B.png")
    case_variants = collect_inputs([str(photo_tree / "*.png")])
    if len(case_variants) == 2:  # case-sensitive file system
        outputs = [plan.output.name for plan in plan_outputs(case_variants, None)]
        assert outputs == ["B_x4.png", "b_x4-2.png"]
    # A file named directly is taken whatever its extension (the reader decides).
    assert rels(collect_inputs([str(photo_tree / "readme.txt")])) == ["readme.txt"]


def test_collect_errors_name_the_input(photo_tree: Path, tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="missing.png: no such file"):
        collect_inputs([str(tmp_path / "missing.png")])
    with pytest.raises(ImageReadError, match=r"\*\.bmp: pattern matches no image files"):
        collect_inputs([str(photo_tree / "*.bmp")])
    (tmp_path / "empty" / "inner").mkdir(parents=True)
    touch_image(tmp_path / "empty" / "inner" / "x.png")
    with pytest.raises(ImageReadError, match="contains no image files.*--recursive"):
        collect_inputs([str(tmp_path / "empty")])
    assert rels(collect_inputs([str(tmp_path / "empty")], recursive=True)) == ["inner/x.png"]


# ----------------------------------------------------------------------------------------------------------
# Output planning


def test_plan_next_to_inputs_and_auto_format(tmp_path: Path) -> None:
    names = ["a.png", "b.JPEG", "c.bmp", "d.gif", "e.tif", "f.webp"]
    inputs = [InputFile(touch_image(tmp_path / name), Path(name)) for name in names]
    plans = plan_outputs(inputs, None)
    assert [plan.output.name for plan in plans] == [
        "a_x4.png",
        "b_x4.JPEG",
        "c_x4.png",
        "d_x4.png",
        "e_x4.tif",
        "f_x4.webp",
    ]
    assert [plan.fmt for plan in plans] == ["png", "jpg", "png", "png", "tiff", "webp"]
    assert all(plan.output.parent == tmp_path and not plan.skip for plan in plans)
    jpeg_plans = plan_outputs(inputs[:2], None, fmt="jpeg", suffix="_x2")
    assert [plan.output.name for plan in jpeg_plans] == ["a_x2.jpg", "b_x2.jpg"]
    with pytest.raises(ConfigError, match="unknown output format"):
        plan_outputs(inputs, None, fmt="gif")


def test_plan_mirrors_sub_folders_so_same_names_do_not_collide(photo_tree: Path, tmp_path: Path) -> None:
    inputs = collect_inputs([str(photo_tree)], recursive=True)
    out = tmp_path / "out"
    outputs = {plan.source.rel.as_posix(): plan.output for plan in plan_outputs(inputs, out, fmt="png")}
    assert outputs["a.JPG"] == out / "a_x4.png"
    assert outputs["sub/a.png"] == out / "sub" / "a_x4.png"
    assert outputs["sub/deeper/d.tif"] == out / "sub" / "deeper" / "d_x4.png"


def test_plan_collisions_get_distinct_readable_names(tmp_path: Path) -> None:
    same_stem = [InputFile(touch_image(tmp_path / name), Path(name)) for name in ("a.png", "a.jpg")]
    plans = plan_outputs(same_stem, None, fmt="png")
    assert [plan.output.name for plan in plans] == ["a_png_x4.png", "a_jpg_x4.png"]

    first = touch_image(tmp_path / "x" / "a.png")
    second = touch_image(tmp_path / "y" / "a.png")
    explicit = [InputFile(first, Path("a.png")), InputFile(second, Path("a.png"))]
    plans = plan_outputs(explicit, tmp_path / "out")
    assert [plan.output.name for plan in plans] == ["a_x4.png", "a_x4-2.png"]
    assert plan_outputs(explicit, tmp_path / "out") == plans  # deterministic


def test_plan_never_overwrites_an_input(tmp_path: Path) -> None:
    source = InputFile(touch_image(tmp_path / "a.png"), Path("a.png"))
    with pytest.raises(ConfigError, match="overwrite the input itself"):
        plan_outputs([source], None, suffix="")
    # Same name but another format is a different file, so it is allowed.
    assert plan_outputs([source], None, suffix="", fmt="jpg")[0].output.name == "a.jpg"
    other = InputFile(touch_image(tmp_path / "a_x4.png"), Path("a_x4.png"))  # named explicitly
    with pytest.raises(ConfigError, match="would overwrite the input"):
        plan_outputs([source, other], None)


def test_plan_second_run_over_a_folder_skips_earlier_results(tmp_path: Path) -> None:
    touch_image(tmp_path / "a.png")
    touch_image(tmp_path / "a_x4.png")  # written by a first run
    plans = plan_outputs(collect_inputs([str(tmp_path)]), None)
    by_name = {plan.source.path.name: plan for plan in plans}
    assert by_name["a.png"].output == tmp_path / "a_x4.png" and not by_name["a.png"].skip
    assert by_name["a_x4.png"].skip and "earlier run" in (by_name["a_x4.png"].skip_reason or "")


def test_plan_skip_existing(tmp_path: Path) -> None:
    inputs = [InputFile(touch_image(tmp_path / name), Path(name)) for name in ("a.png", "b.png")]
    out = tmp_path / "out"
    touch_image(out / "a_x4.png")
    plans = plan_outputs(inputs, out, skip_existing=True)
    assert [(plan.output.name, plan.skip_reason) for plan in plans] == [
        ("a_x4.png", "output exists"),
        ("b_x4.png", None),
    ]
    assert not any(plan.skip for plan in plan_outputs(inputs, out))
