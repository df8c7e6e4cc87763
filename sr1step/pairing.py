"""Pairing the images of two folders by file name, with one-line errors (eval sets, paired training data,
distillation validation sets). The extension is not part of the name: ``x.jpg`` pairs with ``x.png``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from sr1step.errors import DatasetError, ImageReadError
from sr1step.imageio import PILLOW_FORMATS, is_image_name

_EXIF_ORIENTATION = 0x0112

SizeReader = Callable[[Path], tuple[int, int]]


def image_files(folder: Path) -> list[Path]:
    """The image files directly in ``folder`` (by extension; hidden files skipped), sorted by name."""
    return sorted(entry for entry in folder.iterdir() if is_image_name(entry.name) and entry.is_file())


def stored_size(path: Path) -> tuple[int, int]:
    """(width, height) of the pixels as stored, from the header."""
    try:
        with Image.open(path, formats=PILLOW_FORMATS) as image:
            return image.size
    except (UnidentifiedImageError, OSError) as exc:
        raise ImageReadError(f"{path}: cannot decode image ({exc})") from exc


def upright_size(path: Path) -> tuple[int, int]:
    """(width, height) after the EXIF orientation (what :func:`sr1step.imageio.read_image` returns)."""
    try:
        with Image.open(path, formats=PILLOW_FORMATS) as image:
            width, height = image.size
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except (UnidentifiedImageError, OSError) as exc:
        raise ImageReadError(f"{path}: cannot decode image ({exc})") from exc
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def index_by_stem(folder: Path, role: str) -> dict[str, Path]:
    """The images of a folder by file name without extension; duplicates and empty folders are errors."""
    if not folder.is_dir():
        raise DatasetError(f"{role} folder {folder} does not exist")
    index: dict[str, Path] = {}
    for path in image_files(folder):
        if path.stem in index:
            raise DatasetError(
                f"{role} folder {folder} has two images named '{path.stem}': {index[path.stem].name}, {path.name}"
            )
        index[path.stem] = path
    if not index:
        raise DatasetError(f"{role} folder {folder} holds no images")
    return index


def name_list(stems: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(stems[:limit])
    return shown + (f", … ({len(stems) - limit} more)" if len(stems) > limit else "")


@dataclass(frozen=True)
class Pair:
    name: str  # file name without extension: the pairing key
    left: Path
    right: Path


def pair_by_name(left_dir: Path, right_dir: Path, left_role: str, right_role: str) -> list[Pair]:
    """Pair the images of two folders by file name; every image must have its partner."""
    left, right = index_by_stem(left_dir, left_role), index_by_stem(right_dir, right_role)
    missing = sorted(set(right) - set(left))
    if missing:
        raise DatasetError(
            f"{len(missing)} {right_role} image(s) in {right_dir} have no {left_role} image in {left_dir}: "
            f"{name_list(missing)}"
        )
    extra = sorted(set(left) - set(right))
    if extra:
        raise DatasetError(
            f"{len(extra)} {left_role} image(s) in {left_dir} have no {right_role} image in {right_dir}: "
            f"{name_list(extra)}"
        )
    return [Pair(stem, left[stem], right[stem]) for stem in sorted(left)]


def check_size(
    pair: Pair, left: tuple[int, int], right: tuple[int, int], left_role: str, right_role: str, scale: int = 1
) -> None:
    (lw, lh), (rw, rh) = left, right
    if (lw * scale, lh * scale) != (rw, rh):
        expected = (
            "" if scale == 1 else f" (expected {scale}× the {left_role} size: {lw * scale}×{lh * scale})"
        )
        raise DatasetError(
            f"size mismatch for '{pair.name}': {left_role} {pair.left} is {lw}×{lh}, "
            f"{right_role} {pair.right} is {rw}×{rh}{expected}"
        )


def check_sizes(
    pairs: Sequence[Pair], left_role: str, right_role: str, scale: int = 1, size_of: SizeReader = stored_size
) -> None:
    """Every right image must be ``scale`` × its left partner (1: the same size); read from headers only."""
    for pair in pairs:
        check_size(pair, size_of(pair.left), size_of(pair.right), left_role, right_role, scale)
