"""Resumable HTTP(S) downloads into the sr1step cache.

Bytes land in ``<file>.part``; a dropped connection is resumed with a ``Range`` request (within the same call,
and by any later call, since the ``.part`` stays). Only a complete file whose size and sha256 check out is
renamed into place, so a partial or corrupt download never becomes a cache entry. A file lock keeps two
processes from writing the same ``.part``.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from sr1step import __version__
from sr1step.errors import ChecksumMismatchError, WeightsError
from sr1step.weights.cache import (
    SR1STEP_CACHE_HINT,
    Expectation,
    cache_root,
    ensure_writable,
    hash_file,
    remove_files,
    verify_file,
    write_stamp,
)
from sr1step.weights.progress import TransferProgress
from sr1step.weights.registry import UrlSource

logger = logging.getLogger(__name__)

DOWNLOAD_ATTEMPTS = 4  # a dropped connection is resumed up to this many times within one call
_CHUNK = 1 << 20
_TIMEOUT_S = 60


class _Interrupted(Exception):
    """A transfer that stopped early; the bytes received so far stay in the .part file."""


def url_cache_path(source: UrlSource, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where a URL source lives once downloaded (keyed by the URL, so two entries naming it share one copy)."""
    key = hashlib.sha256(source.url.encode()).hexdigest()[:16]
    return cache_root(cache_dir) / "url" / key / source.filename


def url_expectation(source: UrlSource) -> Expectation:
    if source.sha256 is not None:
        return Expectation("sha256", source.sha256, "registry-sha256")
    return Expectation("first-download", None, "first-download")


def download_url(
    source: UrlSource, dest: Path, *, cache: Path, progress: TransferProgress, force: bool = False
) -> str:
    """Download ``source`` to ``dest`` through ``dest.part``; return the verified sha256.

    ``force``: download again even if ``dest`` exists (it is replaced only once the new copy checks out).
    """
    from filelock import FileLock

    ensure_writable(dest.parent, SR1STEP_CACHE_HINT)
    part = dest.with_name(dest.name + ".part")
    with FileLock(str(dest.with_name(dest.name + ".lock"))):
        if dest.is_file() and not force:  # another process finished it while this one waited for the lock
            return verify_file(dest, url_expectation(source), cache=cache, progress=progress)
        for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
            try:
                _fetch_into(source, part, progress)
                break
            except _Interrupted as exc:
                if attempt == DOWNLOAD_ATTEMPTS:
                    kept = part.stat().st_size if part.exists() else 0
                    raise WeightsError(
                        f"download of {source.filename} from {source.url} was interrupted {attempt} times "
                        f"({exc}); {kept} bytes are kept in {part}: run the command again to resume"
                    ) from exc
                logger.warning("%s: %s; resuming", source.filename, exc)
        size = part.stat().st_size
        if source.size is not None and size != source.size:
            remove_files([part])
            raise ChecksumMismatchError(
                f"{source.filename}: size mismatch (expected {source.size} bytes, got {size}); "
                "the file has been removed, download it again"
            )
        sha256, _ = hash_file(part, progress, label=dest.name)
        if source.sha256 is not None and sha256 != source.sha256:
            remove_files([part])
            raise ChecksumMismatchError(
                f"{source.filename}: sha256 mismatch (expected {source.sha256}, got {sha256}); "
                "the file has been removed, download it again"
            )
        os.replace(part, dest)
    write_stamp(cache, dest, sha256, url_expectation(source).basis)
    return sha256


def _fetch_into(source: UrlSource, part: Path, progress: TransferProgress) -> None:
    """One HTTP request appending to ``part`` from its current size; raises ``_Interrupted`` on a cut."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": f"sr1step/{__version__}", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(source.url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=_TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            # Nothing left to send from `offset`: the .part is complete, or holds something else.
            if _total_from_content_range(exc.headers.get("Content-Range")) == offset:
                return
            remove_files([part])
            raise _Interrupted(f"the server refused to resume at byte {offset}; starting over") from exc
        raise WeightsError(
            f"download of {source.filename} from {source.url} failed: HTTP {exc.code} {exc.reason}"
        ) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        host = urllib.parse.urlparse(source.url).netloc
        raise WeightsError(
            f"cannot reach {host} to download {source.filename}: {getattr(exc, 'reason', exc)}"
        ) from exc
    with response:
        content_type = response.headers.get("Content-Type", "")
        if content_type.startswith("text/html") and not source.filename.endswith((".html", ".htm")):
            raise WeightsError(
                f"download of {source.filename} from {source.url} returned an HTML page instead of the file "
                "(a login, quota or confirmation page)"
            )
        if offset and response.status != 206:
            offset = 0  # the server ignored Range: start over rather than append a second copy
        elif offset and _start_from_content_range(response.headers.get("Content-Range")) != offset:
            raise WeightsError(f"download of {source.filename}: the server did not resume at byte {offset}")
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None and length.isdigit() else source.size
        task = progress.task(f"download {source.filename}", total=total, completed=offset)
        received = offset
        with open(part, "ab" if offset else "wb") as handle:
            try:
                while chunk := response.read(_CHUNK):
                    handle.write(chunk)
                    received += len(chunk)
                    progress.advance(task, len(chunk))
            except (http.client.IncompleteRead, OSError) as exc:
                raise _Interrupted(f"connection lost after {received} of {total or '?'} bytes") from exc
    if total is not None and received < total:
        raise _Interrupted(f"connection closed after {received} of {total} bytes")


def _start_from_content_range(value: str | None) -> int | None:
    match = re.match(r"bytes (\d+)-\d+/(?:\d+|\*)", value or "")
    return int(match.group(1)) if match else None


def _total_from_content_range(value: str | None) -> int | None:
    match = re.match(r"bytes (?:\*|\d+-\d+)/(\d+)", value or "")
    return int(match.group(1)) if match else None
