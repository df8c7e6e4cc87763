"""Publishing a checkpoint to the Hugging Face Hub with a generated model card."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sr1step import __version__
from sr1step.errors import CheckpointError, WeightsError, WeightsNotFoundError
from sr1step.weights.cache import hash_file
from sr1step.weights.hub import describe_cause, hf_endpoint, hub_progress_bars, transport_errors
from sr1step.weights.progress import TransferProgress
from sr1step.weights.registry import REPO_RE

_MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit


@dataclass(frozen=True)
class PushResult:
    repo: str
    filename: str
    commit: str
    commit_url: str
    spec: str  # hf://repo/file@commit, ready for `--model`
    sha256: str
    size: int
    private: bool


def read_safetensors_metadata(path: Path) -> tuple[dict[str, str], int]:
    """The ``__metadata__`` string map and the tensor count of a safetensors file, from its header only."""
    try:
        with open(path, "rb") as handle:
            header_len = int.from_bytes(handle.read(8), "little")
            if not 2 <= header_len <= _MAX_HEADER_BYTES:
                raise ValueError(f"implausible header length {header_len}")
            header = json.loads(handle.read(header_len))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    return {str(k): str(v) for k, v in metadata.items()}, len(header)


def model_card(
    repo: str, filename: str, sha256: str, size: int, metadata: Mapping[str, str], license_id: str
) -> str:
    """The README.md pushed with a checkpoint: Hub front matter, the file's facts and its metadata."""
    scale = _scale_of(metadata)
    lines = [
        "---",
        f"license: {license_id}",
        "library_name: sr1step",
        "pipeline_tag: image-to-image",
        "tags:",
        "- super-resolution",
        "- sr1step",
        "---",
        "",
        f"# {repo.split('/')[-1]}",
        "",
        f"One-step diffusion super-resolution checkpoint for sr1step, published with `sr1step weights push` "
        f"(sr1step {__version__}).",
        "",
        "| file | size (bytes) | sha256 |",
        "| --- | --- | --- |",
        f"| `{filename}` | {size} | `{sha256}` |",
        "",
        "## Usage",
        "",
        "```bash",
        f"sr1step upscale INPUT.png {f'-x {scale} ' if scale else ''}--model hf://{repo}/{filename}",
        "```",
        "",
    ]
    if metadata:
        lines += ["## Checkpoint metadata", "", "| key | value |", "| --- | --- |"]
        for key in sorted(metadata):
            value = metadata[key].replace("|", "\\|").replace("\n", " ")
            lines.append(f"| `{key}` | `{value}` |")
        lines.append("")
    if license_id == "other":
        lines += ["Licence: that of the model this checkpoint was trained or distilled from.", ""]
    return "\n".join(lines)


def _scale_of(metadata: Mapping[str, str]) -> str | None:
    if metadata.get("scale", "").isdigit():
        return metadata["scale"]
    try:
        scale = json.loads(metadata.get("inference", "{}")).get("scale")
    except (ValueError, AttributeError):
        return None
    return str(scale) if isinstance(scale, int) else None


def push_checkpoint(
    path: Path,
    repo: str,
    *,
    private: bool = False,
    revision: str | None = None,
    license_id: str | None = None,
    message: str | None = None,
    progress: bool = True,
) -> PushResult:
    """Upload a ``.safetensors`` checkpoint plus a generated README.md to a Hub model repository.

    Creates the repository (and the branch ``revision``) when missing; one commit carries both files. The
    token comes from ``HF_TOKEN`` or ``hf auth login``; the endpoint from ``HF_ENDPOINT``.
    """
    if not REPO_RE.match(repo):
        raise WeightsError(f"--repo {repo!r}: expected USER/NAME")
    if not path.is_file():
        raise WeightsNotFoundError(f"{path}: no such file")
    if path.suffix.lower() != ".safetensors":
        raise WeightsError(
            f"{path}: only .safetensors checkpoints are pushed; convert it first with "
            f"`sr1step weights convert {path} {path.with_suffix('.safetensors')}`"
        )
    metadata, _ = read_safetensors_metadata(path)
    with TransferProgress(progress) as bars:
        sha256, _ = hash_file(path, bars)
    size = path.stat().st_size
    license_id = license_id or metadata.get("license") or "other"
    card = model_card(repo, path.name, sha256, size, metadata, license_id)

    from huggingface_hub import HfApi
    from huggingface_hub.utils import HfHubHTTPError, LocalTokenNotFoundError

    api = HfApi(endpoint=hf_endpoint())
    what = f"push to {repo}"
    try:
        with hub_progress_bars(progress):
            info = _upload(api, path, repo, card, private=private, revision=revision, message=message)
    except LocalTokenNotFoundError as exc:
        raise WeightsError(f"{what}: no Hugging Face token; set HF_TOKEN or run `hf auth login`") from exc
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        hint = " (HF_TOKEN needs write access)" if status in (401, 403) else ""
        raise WeightsError(f"{what}: Hub request failed ({describe_cause(exc)}){hint}") from exc
    except (OSError, ValueError, RuntimeError, *transport_errors()) as exc:
        raise WeightsError(f"{what}: {describe_cause(exc)}") from exc
    return PushResult(
        repo=repo,
        filename=path.name,
        commit=info.oid,
        commit_url=info.commit_url,
        spec=f"hf://{repo}/{path.name}@{info.oid}",
        sha256=sha256,
        size=size,
        private=private,
    )


def _upload(
    api: Any, path: Path, repo: str, card: str, *, private: bool, revision: str | None, message: str | None
) -> Any:
    """Create the repository (and branch) if needed, then one commit with the checkpoint and its card."""
    from huggingface_hub import CommitOperationAdd

    api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
    if revision and revision != "main":
        api.create_branch(repo, branch=revision, exist_ok=True)
    return api.create_commit(
        repo,
        operations=[
            CommitOperationAdd(path_in_repo=path.name, path_or_fileobj=str(path)),
            CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode("utf-8")),
        ],
        commit_message=message or f"Upload {path.name} with sr1step {__version__}",
        revision=revision,
    )
