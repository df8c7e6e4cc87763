"""From ``NAME | PATH | hf://owner/repo[/file][@revision]`` to a local, verified file.

Resolution is cache-first: a cached file whose check is stamped is returned without any network request, so
``upscale`` works offline once its model is downloaded. ``offline=True`` (or ``HF_HUB_OFFLINE=1``) never
touches the network and names the exact missing file.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from sr1step.errors import ChecksumMismatchError, WeightsError, WeightsNotFoundError
from sr1step.weights.cache import (
    SR1STEP_CACHE_HINT,
    Expectation,
    cache_root,
    ensure_writable,
    env_flag,
    hf_cache_dir,
    read_stamp,
    verify_file,
)
from sr1step.weights.download import download_url, url_cache_path, url_expectation
from sr1step.weights.hub import (
    hub_cached,
    hub_commit_of,
    hub_download,
    hub_expectation,
    hub_file_for_spec,
    hub_removal_list,
    parse_hf_spec,
)
from sr1step.weights.progress import TransferProgress
from sr1step.weights.registry import (
    WEIGHT_SUFFIXES,
    HubSource,
    Source,
    WeightsEntry,
    inference_spec,
    load_registry,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolvedWeights:
    """A local, verified weights file."""

    path: Path
    entry: WeightsEntry | None  # None for a local path or an hf:// spec
    spec: str
    sha256: str
    source: str  # hf://repo/file@commit, the URL, or "local"
    size: int


@dataclass(frozen=True)
class VerifyResult:
    spec: str
    path: Path
    sha256: str
    basis: str  # registry-sha256 | hub-lfs-sha256 | hub-git-sha1 | first-download | hub-unverified


def resolve_model(
    spec: str,
    *,
    offline: bool = False,
    progress: bool = True,
    cache_dir: Path | None = None,
    registry: Mapping[str, WeightsEntry] | None = None,
    force_download: bool = False,
) -> ResolvedWeights:
    """A local, verified file for a registry name, a local path, or ``hf://owner/repo[/file][@revision]``.

    ``force_download`` fetches the file again (for a Hub branch: whatever the branch points to now).
    ``registry`` replaces the packaged registry (tests, private registries).
    """
    offline = offline or env_flag("HF_HUB_OFFLINE")
    if offline and force_download:
        raise WeightsError(f"{spec}: cannot force a download in offline mode")
    cache = cache_root(cache_dir)
    with TransferProgress(progress) as bars:
        if spec.startswith("hf://"):
            hub = parse_hf_spec(spec)
            filename = hub_file_for_spec(hub, spec, offline)
            source = HubSource(repo=hub.repo, filename=filename, revision=hub.revision)
            return _resolve_sources(spec, None, (source,), cache, bars, offline, force_download)
        entries = registry if registry is not None else load_registry()
        entry = entries.get(spec)
        if entry is not None:
            if not entry.available:
                raise WeightsNotFoundError(f"'{spec}' has no downloadable checkpoint: {entry.how_to_get}")
            return _resolve_sources(spec, entry, entry.sources, cache, bars, offline, force_download)
        return _resolve_local(spec, entries, cache, bars)


def _resolve_local(
    spec: str, entries: Mapping[str, WeightsEntry], cache: Path, bars: TransferProgress
) -> ResolvedWeights:
    path = Path(spec).expanduser()
    if path.is_file():
        sha256 = verify_file(path, Expectation("none", None, "local"), cache=cache, progress=bars)
        return ResolvedWeights(path, None, spec, sha256, "local", path.stat().st_size)
    if path.exists():
        raise WeightsError(f"{spec}: is a folder, not a checkpoint file")
    if os.sep in spec or "/" in spec or spec.lower().endswith(WEIGHT_SUFFIXES):
        raise WeightsNotFoundError(f"{spec}: no such file")
    raise WeightsNotFoundError(
        f"'{spec}' is neither a registry model name nor an existing file{_close(spec, entries)}"
    )


def _close(name: str, entries: Mapping[str, WeightsEntry]) -> str:
    close = difflib.get_close_matches(name, list(entries), n=3, cutoff=0.5)
    return f"; did you mean {', '.join(close)}?" if close else "; see `sr1step weights list`"


def _resolve_sources(
    spec: str,
    entry: WeightsEntry | None,
    sources: tuple[Source, ...],
    cache: Path,
    bars: TransferProgress,
    offline: bool,
    force: bool,
) -> ResolvedWeights:
    if not force:
        for source in sources:
            cached = cached_source_file(source, cache)
            if cached is not None:
                return _finish(spec, entry, source, cached, cache, bars, offline)
    if offline:
        first = sources[0]
        where = hf_cache_dir() if isinstance(first, HubSource) else url_cache_path(first, cache)
        raise WeightsNotFoundError(
            f"{spec}: {first.describe()} is not cached ({where}) and offline mode is on; "
            f"download it first with `sr1step weights download {spec}`"
        )
    for index, source in enumerate(sources):
        try:
            if isinstance(source, HubSource):
                path = hub_download(source.repo, source.filename, source.revision, progress=bars, force=force)
            else:
                path = url_cache_path(source, cache)
                download_url(source, path, cache=cache, progress=bars, force=force)
        except ChecksumMismatchError:
            raise
        except WeightsError as exc:
            if index == len(sources) - 1:
                raise
            logger.warning("%s; trying the next source", exc)
            continue
        return _finish(spec, entry, source, path, cache, bars, offline)
    raise WeightsError(f"{spec}: the registry entry lists no source")


def cached_source_file(source: Source, cache: Path) -> Path | None:
    """The cached file of one source (no network, no hashing)."""
    if isinstance(source, HubSource):
        return hub_cached(source.repo, source.filename, source.revision)
    path = url_cache_path(source, cache)
    return path if path.is_file() else None


def _finish(
    spec: str,
    entry: WeightsEntry | None,
    source: Source,
    path: Path,
    cache: Path,
    bars: TransferProgress,
    offline: bool,
    force_hash: bool = False,
) -> ResolvedWeights:
    if isinstance(source, HubSource):
        if source.sha256 is not None:
            expect = Expectation("sha256", source.sha256, "registry-sha256")
        else:
            recorded = read_stamp(cache, path)
            expect = hub_expectation(path, source.repo, source.filename, offline=offline, recorded=recorded)
        removal = hub_removal_list(path)
        commit = hub_commit_of(path)
        where = f"hf://{source.repo}/{source.filename}" + (f"@{commit}" if commit else "")
    else:
        expect, removal, where = url_expectation(source), [path], source.url
    sha256 = verify_file(
        path, expect, cache=cache, progress=bars, force=force_hash, remove_on_mismatch=removal
    )
    return ResolvedWeights(path, entry, spec, sha256, where, path.stat().st_size)


def cached_entry_path(entry: WeightsEntry, cache_dir: Path | None = None) -> Path | None:
    """The cached file of a registry entry, if any of its sources is cached (no network, no hashing)."""
    cache = cache_root(cache_dir)
    for source in entry.sources:
        hit = cached_source_file(source, cache)
        if hit is not None:
            return hit
    return None


def verify_cached(
    spec: str,
    *,
    cache_dir: Path | None = None,
    progress: bool = True,
    registry: Mapping[str, WeightsEntry] | None = None,
) -> VerifyResult:
    """Re-hash the cached file of ``spec`` (a registry name or an hf:// spec) against its expected hash.

    No network. A mismatch removes the file and raises ``ChecksumMismatchError``; an uncached spec raises
    ``WeightsNotFoundError``.
    """
    cache = cache_root(cache_dir)
    with TransferProgress(progress) as bars:
        if spec.startswith("hf://"):
            hub = parse_hf_spec(spec)
            filename = hub_file_for_spec(hub, spec, offline=True)
            entry = None
            sources: tuple[Source, ...] = (
                HubSource(repo=hub.repo, filename=filename, revision=hub.revision),
            )
        else:
            entries = registry if registry is not None else load_registry()
            entry = entries.get(spec)
            if entry is None:
                raise WeightsNotFoundError(f"'{spec}' is not a registry model name{_close(spec, entries)}")
            sources = entry.sources
        for source in sources:
            cached = cached_source_file(source, cache)
            if cached is not None:
                resolved = _finish(spec, entry, source, cached, cache, bars, offline=True, force_hash=True)
                stamp = read_stamp(cache, resolved.path) or {}
                return VerifyResult(spec, resolved.path, resolved.sha256, str(stamp.get("basis", "")))
    raise WeightsNotFoundError(f"'{spec}' is not cached; download it with `sr1step weights download {spec}`")


def converted_path(resolved: ResolvedWeights, *, cache_dir: Path | None = None) -> Path:
    """A pickle-free ``.safetensors`` for ``resolved``: the file itself, or a conversion made once.

    Other checkpoints (official ``.pth``) are converted with ``sr1step.checkpoints.convert_checkpoint`` to
    ``<cache>/converted/<sha256>.safetensors``: keyed by the source's sha256, so a changed source gets a new
    conversion. For a registry entry its inference settings (teacher steps, lq_mode, prior noise, ...) are
    written into the file, since an official ``.pth`` does not carry them, and a digest of those settings
    joins the name (``<sha256>.<digest>.safetensors``).
    """
    if resolved.path.suffix.lower() == ".safetensors":
        return resolved.path
    entry = resolved.entry
    inference = inference_spec(entry) if entry is not None and entry.arch == "resshift-unet" else None
    name = resolved.sha256
    if inference is not None:
        # Registry settings are baked into the file: a changed registry entry must not reuse a stale conversion.
        settings = json.dumps([entry.name, inference.to_dict()], sort_keys=True).encode()
        name += "." + hashlib.sha256(settings).hexdigest()[:12]
    target = cache_root(cache_dir) / "converted" / f"{name}.safetensors"
    if target.is_file():
        return target
    ensure_writable(target.parent, SR1STEP_CACHE_HINT)
    from sr1step.checkpoints import convert_checkpoint

    metadata = {"source_sha256": resolved.sha256}
    if entry is not None:
        metadata["registry_name"] = entry.name
    return convert_checkpoint(resolved.path, target, metadata=metadata, inference=inference)
