"""Cache locations and sha256 verification with stamps.

* ``cache_root()``: the sr1step cache (``SR1STEP_CACHE``, default ``<user cache dir>/sr1step``) holding URL
  downloads (``url/``), verification stamps (``verified/``) and converted checkpoints (``converted/``).
* ``hf_cache_dir()``: the Hugging Face hub cache, read from the environment at call time (huggingface_hub
  itself reads it once, at import).
* ``verify_file()``: checks a file against what it must hash to and stamps the result (path, size, mtime), so a
  500 MB checkpoint is hashed once, not on every run. A mismatch removes the file and raises.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sr1step.errors import ChecksumMismatchError, WeightsError
from sr1step.fsio import atomic_write_text
from sr1step.weights.progress import TransferProgress

logger = logging.getLogger(__name__)

CACHE_ENV = "SR1STEP_CACHE"
SR1STEP_CACHE_HINT = f"set {CACHE_ENV} to a writable folder"
HF_CACHE_HINT = "set HF_HUB_CACHE (or HF_HOME) to a writable folder"
_CHUNK = 1 << 20
_HASH_PROGRESS_MIN_BYTES = 32 << 20


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The sr1step cache: ``cache_dir``, else ``SR1STEP_CACHE``, else ``<user cache dir>/sr1step``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else _user_cache_dir() / "sr1step"


def _user_cache_dir() -> Path:
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else huggingface_hub's default."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def ensure_writable(folder: Path, hint: str) -> None:
    """Create ``folder`` and prove a file can be written there, or raise one clear line."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise WeightsError(f"cache folder {folder} is not writable ({exc.strerror or exc}); {hint}") from exc


def remove_files(paths: list[Path]) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def hash_file(
    path: Path, progress: TransferProgress, git_sha1: bool = False, label: str | None = None
) -> tuple[str, str | None]:
    """sha256 of a file, plus its git blob sha1 (the Hub ETag of a non-LFS file) when asked."""
    size = path.stat().st_size
    sha256 = hashlib.sha256()
    sha1 = hashlib.sha1(f"blob {size}\0".encode()) if git_sha1 else None
    big = size >= _HASH_PROGRESS_MIN_BYTES
    task = progress.task(f"verify {label or path.name}", total=size) if big else None
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            sha256.update(chunk)
            if sha1 is not None:
                sha1.update(chunk)
            progress.advance(task, len(chunk))
    return sha256.hexdigest(), sha1.hexdigest() if sha1 is not None else None


# Stamps live in <cache>/verified/<hash of the real path>.json: one mechanism for files in the sr1step cache,
# in the HF cache (which must not be written into) and local files.


def _stamp_path(cache: Path, path: Path) -> Path:
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32]
    return cache / "verified" / f"{key}.json"


def read_stamp(cache: Path, path: Path) -> dict[str, Any] | None:
    """The recorded check of ``path``, current or not (``stamp_is_current`` tells)."""
    try:
        stamp = json.loads(_stamp_path(cache, path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) and stamp.get("path") == str(path.resolve()) else None


def stamp_is_current(stamp: Mapping[str, Any] | None, path: Path) -> bool:
    if stamp is None:
        return False
    stat = path.stat()
    return stamp.get("size") == stat.st_size and stamp.get("mtime_ns") == stat.st_mtime_ns


def write_stamp(cache: Path, path: Path, sha256: str, basis: str) -> None:
    stat = path.stat()
    stamp = {
        "path": str(path.resolve()),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "sha256": sha256,
        "basis": basis,
    }
    target = _stamp_path(cache, path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(target, json.dumps(stamp, indent=1))
    except OSError as exc:
        # The file itself was verified; without a stamp the next run hashes it again (a read-only cache).
        logger.warning("could not record the check of %s (%s)", path, exc.strerror or exc)


@dataclass(frozen=True)
class Expectation:
    """What a file must hash to.

    kind: ``sha256`` (a registry pin or the Hub's LFS sha256), ``git-sha1`` (a small, non-LFS Hub file),
    ``first-download`` (an unpinned file: the first recorded hash is the reference), ``none`` (a local file).
    basis: the label recorded in the stamp.
    """

    kind: str
    value: str | None = None
    basis: str = ""


def verify_file(
    path: Path,
    expect: Expectation,
    *,
    cache: Path,
    progress: TransferProgress,
    force: bool = False,
    remove_on_mismatch: list[Path] | None = None,
) -> str:
    """Return the verified sha256 of ``path``; on a mismatch remove the file(s) and raise.

    A current stamp (same size and mtime) that agrees with ``expect`` skips the hashing unless ``force``.
    """
    stamp = read_stamp(cache, path)
    if (
        not force
        and stamp_is_current(stamp, path)
        and (expect.kind != "sha256" or stamp["sha256"] == expect.value)
    ):
        return str(stamp["sha256"])
    sha256, git_sha1 = hash_file(path, progress, git_sha1=expect.kind == "git-sha1")
    if expect.kind == "sha256":
        expected, actual = expect.value, sha256
    elif expect.kind == "git-sha1":
        expected, actual = expect.value, git_sha1
    elif expect.kind == "first-download" and stamp is not None:
        expected, actual = stamp.get("sha256"), sha256
    else:
        expected = actual = sha256
    if actual != expected:
        remove_files(remove_on_mismatch if remove_on_mismatch is not None else [path])
        kind = "git sha1" if expect.kind == "git-sha1" else "sha256"
        raise ChecksumMismatchError(
            f"{path.name}: {kind} mismatch (expected {expected}, got {actual}); "
            "the file has been removed, download it again"
        )
    write_stamp(cache, path, sha256, expect.basis or expect.kind)
    return sha256
