"""`sr1step weights ...`: list, download, verify, locate, convert and publish model weights."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from rich.text import Text

    from sr1step.cli._output import Output
    from sr1step.weights import Source

weights_app = typer.Typer(
    help="List, download, verify, convert and publish model weights (registry: weights.toml).",
    no_args_is_help=True,
)

JsonOption = Annotated[
    bool, typer.Option("--json", help="One JSON record per result on stdout, nothing else.")
]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="Print errors only.")]


def _output(quiet: bool, json_mode: bool) -> Output:
    from sr1step.cli._output import Output

    return Output(quiet=quiet, json_mode=json_mode)


def _plain(text: str) -> Text:
    """A rich renderable that prints ``text`` verbatim (paths may contain [brackets])."""
    from rich.text import Text

    return Text(text)


def _short_source(source: Source) -> str:
    """Hub sources as hf://..., URLs as host/.../file: the table stays readable at 80 columns."""
    from urllib.parse import urlparse

    from sr1step.weights import HubSource

    if isinstance(source, HubSource):
        return source.describe()
    return f"{urlparse(source.url).netloc}/.../{source.filename}"


def _human_size(num_bytes: int | None, approx_mb: float | None) -> str:
    if num_bytes is not None:
        return f"{num_bytes / 1e6:.1f} MB"
    if approx_mb is not None:
        return f"~{approx_mb:.0f} MB"
    return "-"


@weights_app.command("list")
def list_models(json_mode: JsonOption = False, quiet: QuietOption = False) -> None:
    """The registry: name, scale, size, cached?, licence and source of every model (no network)."""
    from rich.table import Table

    from sr1step.weights import HubSource, cached_entry_path, load_registry, registry_file

    out = _output(quiet, json_mode)
    table = Table(title=f"models in {registry_file()}", title_justify="left")
    for column in ("name", "scale", "size", "cached", "license", "source"):
        table.add_column(column, overflow="fold")
    for entry in load_registry().values():
        cached = cached_entry_path(entry)
        size = (
            cached.stat().st_size
            if cached is not None
            else next((s.size for s in entry.sources if not isinstance(s, HubSource) and s.size), None)
        )
        source = entry.sources[0].describe() if entry.sources else None
        scale = f"x{entry.scale}" if entry.scale else "-"
        name = f"{entry.name} *" if entry.default_for_scale else entry.name
        cached_text = "yes" if cached is not None else ("no" if entry.available else "unavailable")
        short = _short_source(entry.sources[0]) if entry.sources else "not public"
        table.add_row(name, scale, _human_size(size, entry.approx_size_mb), cached_text, entry.license, short)
        out.record(
            {
                "name": entry.name,
                "scale": entry.scale,
                "arch": entry.arch,
                "role": entry.role,
                "size_bytes": size,
                "approx_size_mb": entry.approx_size_mb,
                "cached": cached is not None,
                "path": str(cached) if cached is not None else None,
                "available": entry.available,
                "default_for_scale": entry.default_for_scale,
                "license": entry.license,
                "source": source,
                "description": entry.description,
            }
        )
    table.caption = "* the default model for its scale (sr1step upscale -x N)"
    out.result(table)


@weights_app.command("download")
def download(
    names: Annotated[list[str], typer.Argument(help="Registry names or hf://owner/repo[/file][@rev] specs.")],
    force: Annotated[bool, typer.Option("--force", help="Download again even when cached.")] = False,
    json_mode: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Download and sha256-verify weights into the cache; prints each local path."""
    from sr1step.weights import resolve_model

    out = _output(quiet, json_mode)
    for name in names:
        resolved = resolve_model(name, progress=out.show_progress, force_download=force)
        out.record(
            {
                "name": name,
                "path": str(resolved.path),
                "sha256": resolved.sha256,
                "size_bytes": resolved.size,
                "source": resolved.source,
            }
        )
        out.result(_plain(f"{name}: {resolved.path}"))


@weights_app.command("verify")
def verify(
    names: Annotated[
        list[str] | None, typer.Argument(help="Registry names or hf:// specs (default: every cached model).")
    ] = None,
    json_mode: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Re-hash cached weights against their expected sha256; a corrupt file is removed (exit 1)."""
    from rich.table import Table

    from sr1step.errors import ChecksumMismatchError
    from sr1step.weights import cached_entry_path, load_registry, verify_cached

    out = _output(quiet, json_mode)
    specs = list(names or [e.name for e in load_registry().values() if cached_entry_path(e) is not None])
    if not specs:
        out.info("no cached weights to verify")
        return
    table = Table("name", "status", "checked against", "sha256", "path")
    failures: list[str] = []
    for spec in specs:
        try:
            result = verify_cached(spec, progress=out.show_progress)
        except ChecksumMismatchError as exc:
            failures.append(str(exc))
            out.record({"name": spec, "status": "mismatch", "error": str(exc)})
            table.add_row(spec, "[red]mismatch (removed)[/red]", "", "", "")
            continue
        out.record(
            {
                "name": spec,
                "status": "ok",
                "sha256": result.sha256,
                "basis": result.basis,
                "path": str(result.path),
            }
        )
        table.add_row(spec, "[green]ok[/green]", result.basis, result.sha256, str(result.path))
    out.result(table)
    if failures:
        raise ChecksumMismatchError(
            failures[0] if len(failures) == 1 else f"{len(failures)} files failed: " + "; ".join(failures)
        )


@weights_app.command("path")
def path(
    name: Annotated[str, typer.Argument(help="Registry name, hf:// spec or local file.")],
    offline: Annotated[
        bool, typer.Option("--offline", help="Never use the network: fail if the file is not cached.")
    ] = False,
    json_mode: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Print the local path of a model's weights (downloading them first unless --offline), for scripts."""
    from sr1step.weights import resolve_model

    out = _output(quiet, json_mode)
    resolved = resolve_model(name, offline=offline, progress=out.show_progress)
    out.record({"name": name, "path": str(resolved.path), "sha256": resolved.sha256})
    if not json_mode:
        # The path is the whole point of this command: printed even with --quiet, and never wrapped.
        typer.echo(str(resolved.path))


@weights_app.command("convert")
def convert(
    source: Annotated[
        str, typer.Argument(metavar="IN", help="Checkpoint file (.pth, ...) or registry name.")
    ],
    destination: Annotated[Path, typer.Argument(metavar="OUT", help="Output .safetensors file.")],
    json_mode: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Convert a checkpoint to a self-describing, pickle-free .safetensors (written atomically)."""
    from sr1step.errors import ConfigError
    from sr1step.weights import inference_spec, resolve_model

    out = _output(quiet, json_mode)
    if destination.suffix.lower() != ".safetensors":
        raise ConfigError(f"{destination}: the output must be a .safetensors file")
    resolved = resolve_model(source, progress=out.show_progress)
    if destination.resolve() == resolved.path.resolve():
        raise ConfigError(f"{destination}: the output would overwrite the input")
    from sr1step.checkpoints import convert_checkpoint

    entry = resolved.entry
    inference = inference_spec(entry) if entry is not None and entry.arch == "resshift-unet" else None
    metadata = {"source_sha256": resolved.sha256}
    if entry is not None:
        metadata["registry_name"] = entry.name
    written = convert_checkpoint(resolved.path, destination, metadata=metadata, inference=inference)
    out.record({"input": str(resolved.path), "output": str(written), "size_bytes": written.stat().st_size})
    out.result(_plain(f"{resolved.path} -> {written}"))


@weights_app.command("push")
def push(
    checkpoint: Annotated[
        Path, typer.Argument(metavar="PATH", help="The .safetensors checkpoint to publish.")
    ],
    repo: Annotated[str, typer.Option("--repo", help="Hub model repository USER/NAME (created if missing).")],
    private: Annotated[bool, typer.Option("--private", help="Create the repository as private.")] = False,
    revision: Annotated[
        str | None, typer.Option("--revision", help="Branch to commit to (created if missing; default main).")
    ] = None,
    license_id: Annotated[
        str | None,
        typer.Option(
            "--license", help="Hub licence id for the model card (default: file metadata, else other)."
        ),
    ] = None,
    message: Annotated[str | None, typer.Option("--message", "-m", help="Commit message.")] = None,
    json_mode: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Upload a checkpoint and a generated model card to the Hugging Face Hub (token: HF_TOKEN)."""
    from sr1step.weights import push_checkpoint

    out = _output(quiet, json_mode)
    result = push_checkpoint(
        checkpoint,
        repo,
        private=private,
        revision=revision,
        license_id=license_id,
        message=message,
        progress=out.show_progress,
    )
    out.record(
        {
            "repo": result.repo,
            "file": result.filename,
            "commit": result.commit,
            "commit_url": result.commit_url,
            "spec": result.spec,
            "sha256": result.sha256,
            "size_bytes": result.size,
            "private": result.private,
        }
    )
    out.result(_plain(f"pushed {result.filename} to {result.commit_url}\nuse it with: --model {result.spec}"))


def register(app: typer.Typer) -> None:
    app.add_typer(weights_app, name="weights")
