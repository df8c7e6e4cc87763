"""Hugging Face Hub files: ``hf://`` specs, cache look-ups, downloads and the Hub's own hashes.

huggingface_hub reads ``HF_ENDPOINT`` once, at import; sr1step passes ``endpoint=`` and ``cache_dir=`` on every
call so the environment at call time wins. Every huggingface_hub failure becomes one ``WeightsError`` line.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sr1step.errors import WeightsError, WeightsNotFoundError
from sr1step.weights.cache import HF_CACHE_HINT, Expectation, ensure_writable, hf_cache_dir
from sr1step.weights.progress import TransferProgress
from sr1step.weights.registry import REPO_RE, SHA256_RE, WEIGHT_SUFFIXES

logger = logging.getLogger(__name__)

GIT_SHA1_RE = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class HubSpec:
    """A parsed ``hf://owner/repo[/path/in/repo.ext][@revision]``."""

    repo: str
    filename: str | None
    revision: str | None


def parse_hf_spec(spec: str) -> HubSpec:
    if not spec.startswith("hf://"):
        raise WeightsError(f"{spec}: an hf:// spec must start with 'hf://'")
    # The revision follows the last '@' (branch names may contain '/', e.g. refs/pr/1).
    body, at, revision = spec[len("hf://") :].rpartition("@")
    if not at:
        body, revision = revision, ""
    elif not revision:
        raise WeightsError(f"{spec}: empty revision after '@'")
    parts = body.strip("/").split("/")
    repo = "/".join(parts[:2])
    if len(parts) < 2 or not REPO_RE.match(repo):
        raise WeightsError(f"{spec}: expected hf://OWNER/REPO[/FILE][@REVISION]")
    filename = "/".join(parts[2:]) or None
    if filename is not None and ".." in filename.split("/"):
        raise WeightsError(f"{spec}: '..' is not allowed in a repository path")
    return HubSpec(repo=repo, filename=filename, revision=revision or None)


def hf_endpoint() -> str | None:
    endpoint = os.environ.get("HF_ENDPOINT")
    return endpoint.rstrip("/") if endpoint else None


def transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP client's connection errors (httpx2 in huggingface_hub 2.x, httpx in 1.x): not OSErrors."""
    errors: list[type[BaseException]] = []
    for module_name in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError, AttributeError):
            errors.append(importlib.import_module(module_name).TransportError)
    return tuple(errors)


def describe_cause(exc: BaseException | None) -> str:
    from huggingface_hub.utils import HfHubHTTPError

    if exc is None:
        return "no answer"
    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        return f"HTTP {exc.response.status_code}"
    first_line = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {first_line}" if first_line else type(exc).__name__


def hub_error(exc: BaseException, what: str) -> WeightsError:
    """One clear line for a huggingface_hub failure."""
    from huggingface_hub.utils import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    endpoint = hf_endpoint() or "https://huggingface.co"
    if isinstance(exc, RepositoryNotFoundError):
        return WeightsNotFoundError(
            f"{what}: repository not found on {endpoint} (a private or gated repository needs HF_TOKEN)"
        )
    if isinstance(exc, RevisionNotFoundError):
        return WeightsNotFoundError(f"{what}: revision not found in the repository")
    if isinstance(exc, LocalEntryNotFoundError):
        return WeightsError(
            f"{what}: the Hub at {endpoint} could not be reached ({describe_cause(exc.__cause__)}) "
            "and the file is not cached"
        )
    if isinstance(exc, EntryNotFoundError):
        return WeightsNotFoundError(f"{what}: file not found in the repository")
    if isinstance(exc, HfHubHTTPError):
        return WeightsError(f"{what}: Hub request failed ({describe_cause(exc)})")
    if isinstance(exc, PermissionError):
        return WeightsError(
            f"{what}: cannot write to the Hugging Face cache {hf_cache_dir()}; {HF_CACHE_HINT}"
        )
    return WeightsError(f"{what}: download failed ({describe_cause(exc)})")


def hub_download(
    repo: str, filename: str, revision: str | None, *, progress: TransferProgress, force: bool = False
) -> Path:
    """Download one file into the HF cache (or find it there) and return its snapshot path."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import HfHubHTTPError

    what = f"hf://{repo}/{filename}" + (f"@{revision}" if revision else "")
    cache = hf_cache_dir()
    ensure_writable(cache, HF_CACHE_HINT)
    options: dict[str, Any] = {}
    if "tqdm_class" in inspect.signature(hf_hub_download).parameters:  # huggingface_hub releases since 2025
        options["tqdm_class"] = progress.tqdm_class(filename.rsplit("/", 1)[-1])
    try:
        with hub_progress_bars(progress.enabled or "tqdm_class" in options):
            path = hf_hub_download(
                repo,
                filename,
                revision=revision,
                cache_dir=cache,
                endpoint=hf_endpoint(),
                force_download=force,
                **options,
            )
    except (HfHubHTTPError, OSError, ValueError, *transport_errors()) as exc:
        raise hub_error(exc, what) from exc
    return Path(path)


def hub_snapshot(
    repo: str,
    what: str,
    *,
    allow_patterns: list[str],
    revision: str | None = None,
    repo_type: str = "model",
    offline: bool = False,
    progress: bool = True,
) -> Path:
    """The files of a repo matching ``allow_patterns``, downloaded into the HF cache (or found there with
    ``offline``); its snapshot folder. Failures are one ``WeightsError`` line about ``what`` (``__cause__`` keeps
    huggingface_hub's exception)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HfHubHTTPError

    cache = hf_cache_dir()
    if not offline:
        ensure_writable(cache, HF_CACHE_HINT)
    try:
        with hub_progress_bars(progress):
            path = snapshot_download(
                repo,
                repo_type=repo_type,
                revision=revision,
                allow_patterns=allow_patterns,
                cache_dir=cache,
                endpoint=hf_endpoint(),
                local_files_only=offline,
            )
    except (HfHubHTTPError, OSError, ValueError, *transport_errors()) as exc:
        raise hub_error(exc, what) from exc
    return Path(path)


def hub_cached(repo: str, filename: str, revision: str | None) -> Path | None:
    """The cached copy of a Hub file at a branch, tag or commit, found without any network request."""
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(repo, filename, cache_dir=hf_cache_dir(), revision=revision)
    return Path(hit) if isinstance(hit, str) and Path(hit).is_file() else None


def hub_commit_of(path: Path) -> str | None:
    """The commit of a snapshot path: ``<cache>/models--owner--name/snapshots/<commit>/<file>``."""
    for parent in path.parents:
        if parent.parent.name == "snapshots" and GIT_SHA1_RE.match(parent.name):
            return parent.name
    return None


def hub_expectation(
    path: Path, repo: str, filename: str, *, offline: bool, recorded: Mapping[str, Any] | None = None
) -> Expectation:
    """The Hub's own hash of a cached file: its blob name (LFS sha256, or the git sha1 of a small file).

    ``recorded``: the file's verification stamp, whose hash stands in for the Hub's when the cache keeps no
    blob names (no symlinks) and the Hub cannot be asked (offline).
    """
    real = path.resolve()
    if real != path.absolute() and real.parent.name == "blobs":
        if SHA256_RE.match(real.name):
            return Expectation("sha256", real.name, "hub-lfs-sha256")
        if GIT_SHA1_RE.match(real.name):
            return Expectation("git-sha1", real.name, "hub-git-sha1")
    # A cache without symlinks (Windows without developer mode) copies blobs: ask the Hub for the ETag.
    commit = hub_commit_of(path)
    if offline or commit is None:
        basis = str((recorded or {}).get("basis", ""))
        if basis in ("hub-lfs-sha256", "hub-git-sha1") and recorded.get("sha256"):
            return Expectation("sha256", str(recorded["sha256"]), basis)
        logger.warning("%s: the cache records no Hub hash for this file; its sha256 is taken as found", path)
        return Expectation("first-download", None, "hub-unverified")
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import HfHubHTTPError

    what = f"hf://{repo}/{filename}@{commit}"
    try:
        meta = get_hf_file_metadata(hf_hub_url(repo, filename, revision=commit, endpoint=hf_endpoint()))
    except (HfHubHTTPError, OSError, ValueError, *transport_errors()) as exc:
        raise hub_error(exc, what) from exc
    etag = (meta.etag or "").strip('"')
    if SHA256_RE.match(etag):
        return Expectation("sha256", etag, "hub-lfs-sha256")
    if GIT_SHA1_RE.match(etag):
        return Expectation("git-sha1", etag, "hub-git-sha1")
    raise WeightsError(f"{what}: the Hub gave no usable hash (ETag {meta.etag!r})")


def hub_removal_list(path: Path) -> list[Path]:
    """The snapshot entry and the blob it points to: both go on a mismatch, so the next call downloads."""
    real = path.resolve()
    return [path, real] if real != path.absolute() else [path]


def cached_snapshot_files(repo: str, revision: str | None) -> list[str] | None:
    """Files of the cached snapshot a branch, tag or commit points to (None when nothing is cached)."""
    folder = hf_cache_dir() / f"models--{repo.replace('/', '--')}"
    rev = revision or "main"
    commit: str | None = rev if GIT_SHA1_RE.match(rev) else None
    if commit is None:
        ref = folder / "refs" / rev
        commit = ref.read_text().strip() if ref.is_file() else None
    snapshot = folder / "snapshots" / commit if commit else None
    if snapshot is None or not snapshot.is_dir():
        return None
    return sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())


def pick_weights_file(files: list[str], where: str) -> str:
    """The one checkpoint in a repository listing (``model.safetensors`` by convention)."""
    candidates = [f for f in files if f.lower().endswith(WEIGHT_SUFFIXES)]
    for preferred in ("model.safetensors", "student/model.safetensors"):
        if preferred in candidates:
            return preferred
    safetensors = [f for f in candidates if f.lower().endswith(".safetensors")]
    if len(safetensors) == 1:
        return safetensors[0]
    if not safetensors and len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise WeightsNotFoundError(
            f"{where}: the repository holds no checkpoint file ({', '.join(WEIGHT_SUFFIXES)})"
        )
    listed = ", ".join((safetensors or candidates)[:8])
    raise WeightsError(f"{where}: several checkpoints ({listed}); name one: hf://OWNER/REPO/FILE")


def hub_file_for_spec(hub: HubSpec, spec: str, offline: bool) -> str:
    """The file an hf:// spec means: the one it names, else the repository's single checkpoint."""
    if hub.filename is not None:
        return hub.filename
    cached = cached_snapshot_files(hub.repo, hub.revision)
    if cached:
        with contextlib.suppress(WeightsError):
            return pick_weights_file(cached, spec)
    if offline:
        raise WeightsNotFoundError(
            f"{spec}: no cached snapshot holds a single checkpoint and offline mode is on; "
            "name the file (hf://OWNER/REPO/FILE) or download it while online"
        )
    from huggingface_hub import HfApi
    from huggingface_hub.utils import HfHubHTTPError

    try:
        files = HfApi(endpoint=hf_endpoint()).list_repo_files(hub.repo, revision=hub.revision)
    except (HfHubHTTPError, OSError, ValueError, *transport_errors()) as exc:
        raise hub_error(exc, spec) from exc
    return pick_weights_file(list(files), spec)


@contextlib.contextmanager
def hub_progress_bars(enabled: bool) -> Iterator[None]:
    """huggingface_hub draws its own bars (uploads; downloads on old versions): silenced when not ``enabled``."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    silence = not enabled and not are_progress_bars_disabled()
    if silence:
        disable_progress_bars()
    try:
        yield
    finally:
        if silence:
            enable_progress_bars()
