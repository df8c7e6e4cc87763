"""Command-line inputs and where their results go.

* ``collect_inputs`` expands files, folders (optionally recursive) and glob patterns into image files;
* ``plan_outputs`` gives each one an output path and format: sub-folders mirrored, names that never collide,
  never an input overwritten, results of an earlier run recognised and skipped.
"""

from __future__ import annotations

import glob
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sr1step.errors import ConfigError, ImageReadError
from sr1step.imageio import (
    CANONICAL_EXTENSION,
    FORMAT_ALIASES,
    INPUT_EXTENSIONS,
    is_image_name,
    normalize_format,
)

__all__ = ["InputFile", "OutputPlan", "collect_inputs", "plan_outputs"]


@dataclass(frozen=True)
class InputFile:
    """One input image. ``rel`` is its path below the folder or glob root it was found under (just the file
    name for a file named directly), so outputs can mirror sub-folders. ``explicit`` is True for a file named
    on the command line, False for one found by scanning a folder or expanding a glob."""

    path: Path
    rel: Path
    explicit: bool = True


@dataclass(frozen=True)
class OutputPlan:
    """Where one input's result goes. ``skip_reason`` is set when the input is not to be processed."""

    source: InputFile
    output: Path
    fmt: str
    skip_reason: str | None = None

    @property
    def skip(self) -> bool:
        return self.skip_reason is not None


def collect_inputs(inputs: Sequence[str | os.PathLike[str]], recursive: bool = False) -> list[InputFile]:
    """Expand files, folders and glob patterns into image files, in a stable order without duplicates.

    * A file is taken as is, whatever its extension.
    * A folder contributes the images directly inside it (with ``recursive``: in all sub-folders too;
      symlinked sub-folders are not followed).
    * A pattern with ``*``, ``?`` or ``[`` is expanded; ``**`` spans sub-folders only with ``recursive``.
    * From folders and patterns only files with an extension in ``INPUT_EXTENSIONS`` (any case) are taken,
      never hidden files or folders (names starting with '.', which includes sr1step's temp files).
    * Each argument's files are sorted by relative path; arguments keep their order; a file reached twice is
      kept once, at its first place. An input that does not exist, or matches no image, raises.
    """
    collected: list[InputFile] = []
    seen: set[str] = set()
    for item in inputs:
        text = os.fspath(item)
        for found in _expand_input(text, recursive):
            key = os.path.normcase(os.path.realpath(found.path))  # the same file, reached twice
            if key not in seen:
                seen.add(key)
                collected.append(found)
    return collected


def _expand_input(text: str, recursive: bool) -> list[InputFile]:
    path = Path(text)
    if path.is_file():
        return [InputFile(path=path, rel=Path(path.name), explicit=True)]
    if path.is_dir():
        return _scan_folder(path, recursive)
    if glob.has_magic(text):
        return _expand_glob(text, recursive)
    if path.exists():
        raise ImageReadError(f"{text}: not a regular file or folder")
    raise ImageReadError(f"{text}: no such file or folder")


def _scan_folder(folder: Path, recursive: bool) -> list[InputFile]:
    found: list[InputFile] = []
    has_sub_folders = False
    for current, sub_folders, names in os.walk(folder, onerror=None, followlinks=False):
        has_sub_folders = has_sub_folders or bool(sub_folders)
        sub_folders[:] = sorted(name for name in sub_folders if not name.startswith(".")) if recursive else []
        for name in names:
            file_path = Path(current) / name
            if is_image_name(name) and file_path.is_file():
                found.append(InputFile(path=file_path, rel=file_path.relative_to(folder), explicit=False))
    if not found:
        hint = " (use --recursive to include sub-folders)" if has_sub_folders and not recursive else ""
        extensions = ", ".join(INPUT_EXTENSIONS)
        raise ImageReadError(f"{folder}: folder contains no image files ({extensions}){hint}")
    return sorted(found, key=lambda item: item.rel.parts)


def _expand_glob(pattern: str, recursive: bool) -> list[InputFile]:
    root_parts: list[str] = []
    for part in Path(pattern).parts:
        if glob.has_magic(part):
            break
        root_parts.append(part)
    root = Path(*root_parts) if root_parts else Path(".")
    found = [
        InputFile(path=Path(match), rel=Path(match).relative_to(root), explicit=False)
        for match in glob.glob(pattern, recursive=recursive)
        if is_image_name(os.path.basename(match)) and os.path.isfile(match)
    ]
    if not found:
        raise ImageReadError(f"{pattern}: pattern matches no image files")
    return sorted(found, key=lambda item: item.rel.parts)


def _path_key(path: Path) -> str:
    """Identity of a path for collision and overwrite checks. Case-folded so that the checks also hold on
    case-insensitive file systems (macOS, Windows); on Linux this errs on the safe side."""
    return os.path.normcase(os.path.realpath(path)).casefold()


def _auto_format(path: Path) -> str:
    return FORMAT_ALIASES.get(path.suffix.lower().lstrip("."), "png")


def plan_outputs(
    inputs: Sequence[InputFile],
    out_dir: Path | None,
    *,
    suffix: str = "_x4",
    fmt: str = "auto",
    skip_existing: bool = False,
) -> list[OutputPlan]:
    """Decide each input's output path and format.

    * Name: ``{stem}{suffix}{ext}`` next to the input (``out_dir`` None) or at ``out_dir / rel.parent``, so
      same-named files from different sub-folders never meet.
    * ``fmt='auto'`` keeps the input's format and extension spelling for png/jpg/webp/tiff; other inputs
      (bmp, gif, ...) become png. An explicit format uses .png/.jpg/.webp/.tiff.
    * Inputs that would still share an output name: when all their extensions differ, each gets its source
      extension in the name (``a.png`` + ``a.jpg`` -> ``a_png_x4.png``, ``a_jpg_x4.png``); otherwise the later
      ones in input order get ``-2``, ``-3``, ... (``a_x4.png``, ``a_x4-2.png``). A renamed output never takes
      the path of an input.
    * An output that would be the input itself, or another file named explicitly as an input, is refused
      with ConfigError. A file found by a folder or pattern scan whose path is another input's output is an
      earlier result of sr1step (e.g. a second run over the same folder): it is skipped, not upscaled again.
    * ``skip_existing``: plans whose output file already exists are skipped.
    """
    output_format = None if fmt == "auto" else normalize_format(fmt)

    def output_for(item: InputFile, stem: str) -> tuple[Path, str]:
        source_format = _auto_format(item.path)
        chosen = output_format or source_format
        same_format = output_format is None and item.path.suffix.lower().lstrip(".") in FORMAT_ALIASES
        extension = item.path.suffix if same_format else CANONICAL_EXTENSION[chosen]
        folder = item.path.parent if out_dir is None else Path(out_dir) / item.rel.parent
        return folder / f"{stem}{suffix}{extension}", chosen

    base = [output_for(item, item.path.stem) for item in inputs]
    index_of_key = {_path_key(item.path): index for index, item in enumerate(inputs)}

    # Scanned files that are exactly another input's output are results of an earlier run.
    earlier_result_of: dict[int, int] = {}
    for index, (output, _) in enumerate(base):
        other = index_of_key.get(_path_key(output))
        if other is None:
            continue
        if other == index:
            raise ConfigError(
                f"{inputs[index].path}: the output would overwrite the input itself; "
                "use a non-empty --suffix, another --format or an output folder"
            )
        if inputs[other].explicit:
            raise ConfigError(
                f"{inputs[index].path}: its output {output} would overwrite the input {inputs[other].path}; "
                "change --suffix, --format or the output folder"
            )
        earlier_result_of[other] = index

    live = [index for index in range(len(inputs)) if index not in earlier_result_of]
    names = _resolve_collisions(inputs, live, base, output_for)

    plans: list[OutputPlan] = []
    for index, item in enumerate(inputs):
        if index in earlier_result_of:
            output, chosen = base[index]
            reason = f"is the output of {inputs[earlier_result_of[index]].path} from an earlier run"
            plans.append(OutputPlan(item, output, chosen, reason))
            continue
        output, chosen = names[index]
        reason = "output exists" if skip_existing and output.exists() else None
        plans.append(OutputPlan(item, output, chosen, reason))
    return plans


def _resolve_collisions(
    inputs: Sequence[InputFile],
    live: list[int],
    base: list[tuple[Path, str]],
    output_for: Callable[[InputFile, str], tuple[Path, str]],
) -> dict[int, tuple[Path, str]]:
    names = {index: base[index] for index in live}
    groups: dict[str, list[int]] = defaultdict(list)
    for index in live:
        groups[_path_key(names[index][0])].append(index)
    for members in groups.values():
        extensions = {inputs[index].path.suffix.lower() for index in members}
        if len(members) > 1 and len(extensions) == len(members):
            for index in members:
                item = inputs[index]
                names[index] = output_for(item, f"{item.path.stem}_{item.path.suffix.lower().lstrip('.')}")

    # Whatever still collides (same name and extension, or a tagged name that meets another one): number the
    # later ones. Input paths are reserved, so a renamed output can never land on an input.
    reserved = {_path_key(item.path) for item in inputs}
    taken: set[str] = set()
    for index in live:
        output, chosen = names[index]
        candidate, counter = output, 2
        while _path_key(candidate) in taken or (
            candidate != base[index][0] and _path_key(candidate) in reserved
        ):
            candidate = output.with_name(f"{output.stem}-{counter}{output.suffix}")
            counter += 1
        taken.add(_path_key(candidate))
        names[index] = (candidate, chosen)
    return names
