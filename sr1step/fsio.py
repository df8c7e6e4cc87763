"""Atomic file writes: a temp file in the destination folder, fsync, then ``os.replace``.

A reader never sees a half-written output or checkpoint, and an interrupted write leaves the previous
file (if any) untouched.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _make_temp(target: Path) -> tuple[int, str]:
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    # mkstemp creates 0600; outputs get the usual permissions (0666 minus the umask).
    os.chmod(tmp_name, _default_mode())
    return fd, tmp_name


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO]:
    """Open a temp file next to ``path`` for writing; on success it replaces ``path`` in one step.

    On any exception the temp file is removed and ``path`` is left as it was.
    """
    target = Path(path)
    fd, tmp_name = _make_temp(target)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_write(path, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_write(path, "w") as handle:
        handle.write(text)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temp path next to ``path`` for writers that want a filename (PIL, torch.save, safetensors).

    The caller writes to the yielded path; on success it is renamed onto ``path``.
    """
    target = Path(path)
    fd, tmp_name = _make_temp(target)
    os.close(fd)
    try:
        yield Path(tmp_name)
        with open(tmp_name, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp_name, _default_mode())  # some writers (safetensors) recreate the file as 0600
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
