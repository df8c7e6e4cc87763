"""`sr1step upscale`: files, folders and globs through the one-step pipeline, with a report at the end."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from sr1step.cli._output import Output
from sr1step.errors import ConfigError, Sr1stepError


@dataclass
class BatchReport:
    done: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    megapixels: float = 0.0


def _collect(inputs: list[str], recursive: bool, report: BatchReport, out: Output) -> list:
    """Expand each argument on its own, so one missing file does not stop the others."""
    from sr1step.inputs import collect_inputs

    found, seen = [], set()
    for text in inputs:
        try:
            items = collect_inputs([text], recursive=recursive)
        except Sr1stepError as exc:
            report.failed.append({"input": text, "status": "failed", "error": str(exc)})
            out.error(str(exc))
            continue
        for item in items:
            key = item.path.resolve()
            if key not in seen:
                seen.add(key)
                found.append(item)
    return found


def register(app: typer.Typer) -> None:
    @app.command("upscale")
    def upscale(
        inputs: Annotated[
            list[str], typer.Argument(help="Image files, folders or glob patterns.", show_default=False)
        ],
        scale: Annotated[
            int, typer.Option("-x", "--scale", help="Upscaling factor: 4 or 2 (8 for ×8 YONOS-SR exports).")
        ] = 4,
        model: Annotated[
            str | None,
            typer.Option(
                "--model",
                "-m",
                help="Registry name, local file or hf://owner/repo[/file][@rev] (default: the best public one-step model for the scale).",
            ),
        ] = None,
        vae: Annotated[
            str | None, typer.Option(help="Autoencoder when the model does not name one (default: vq-f4).")
        ] = None,
        output: Annotated[
            Path | None, typer.Option("--output", "-o", help="Output folder (default: next to each input).")
        ] = None,
        suffix: Annotated[
            str | None, typer.Option(help="Appended to output names (default: _x4 / _x2).")
        ] = None,
        fmt: Annotated[str, typer.Option("--format", help="auto | png | jpg | webp | tiff")] = "auto",
        quality: Annotated[int, typer.Option(min=1, max=100, help="JPEG/WebP quality.")] = 95,
        recursive: Annotated[
            bool, typer.Option("--recursive", "-r", help="Descend into sub-folders (mirrored in the output).")
        ] = False,
        skip_existing: Annotated[bool, typer.Option(help="Skip inputs whose output already exists.")] = False,
        tile: Annotated[
            int | None,
            typer.Option(
                min=0,
                help="LR tile size in px (0 = whole image; default: the model's, 256 for ResShift models).",
            ),
        ] = None,
        overlap: Annotated[
            int | None, typer.Option(min=0, help="LR overlap between tiles in px (default: the model's, 32).")
        ] = None,
        tile_batch: Annotated[int, typer.Option(min=1, help="Tiles per network call.")] = 1,
        device: Annotated[str, typer.Option(help="auto | cuda | cpu | mps (or cuda:N)")] = "auto",
        dtype: Annotated[
            str, typer.Option(help="auto | bf16 | fp16 | fp32 (auto: bf16 on CUDA, fp32 on CPU)")
        ] = "auto",
        seed: Annotated[
            int | None, typer.Option(help="Random seed; the same seed gives the same output.")
        ] = None,
        steps: Annotated[
            int | None, typer.Option(min=1, help="Override the network evaluations (teacher models).")
        ] = None,
        no_quantize: Annotated[
            bool, typer.Option("--no-quantize", help="Decode without codebook quantization.")
        ] = False,
        offline: Annotated[
            bool, typer.Option(help="Use cached weights only; never touch the network.")
        ] = False,
        json_out: Annotated[
            bool, typer.Option("--json", help="One JSON record per input on stdout.")
        ] = False,
        quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only errors.")] = False,
    ) -> None:
        """Upscale images with a one-step diffusion SR model (tiled, any size)."""
        out = Output(quiet=quiet, json_mode=json_out)
        if scale not in (2, 4, 8):
            raise ConfigError(f"-x must be 4, 2 or 8, got {scale}")
        code = run_upscale(
            out,
            inputs,
            scale=scale,
            model=model,
            vae=vae,
            output=output,
            suffix=f"_x{scale}" if suffix is None else suffix,
            fmt=fmt,
            quality=quality,
            recursive=recursive,
            skip_existing=skip_existing,
            tile=tile,
            overlap=overlap,
            tile_batch=tile_batch,
            device=device,
            dtype=dtype,
            seed=seed,
            steps=steps,
            quantize=False if no_quantize else None,
            offline=offline,
        )
        if code:
            raise typer.Exit(code)


def run_upscale(
    out: Output,
    inputs: list[str],
    *,
    scale: int,
    model: str | None,
    vae: str | None,
    output: Path | None,
    suffix: str,
    fmt: str,
    quality: int,
    recursive: bool,
    skip_existing: bool,
    tile: int | None,
    overlap: int | None,
    tile_batch: int,
    device: str,
    dtype: str,
    seed: int | None,
    steps: int | None,
    quantize: bool | None,
    offline: bool,
) -> int:
    """The batch: plan outputs, load the model once, process each image, report. Returns the exit code."""
    import numpy as np
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from sr1step.imageio import read_image, upscale_alpha, write_image
    from sr1step.inputs import plan_outputs
    from sr1step.pipeline import TileSettings, Upscaler

    started = time.perf_counter()
    report = BatchReport()
    if tile is not None and overlap is not None:
        TileSettings(tile=tile, overlap=overlap, tile_batch=tile_batch)  # validate options before any loading
    items = _collect(inputs, recursive, report, out)
    plans = plan_outputs(items, output, suffix=suffix, fmt=fmt, skip_existing=skip_existing) if items else []
    todo = [p for p in plans if not p.skip]
    for plan in plans:
        if plan.skip:
            record = {
                "input": str(plan.source.path),
                "output": str(plan.output),
                "status": "skipped",
                "reason": plan.skip_reason,
            }
            report.skipped.append(record)
            out.record(record)
    upscaler = None
    if todo:
        upscaler = Upscaler.from_pretrained(
            model,
            scale=scale,
            vae=vae,
            device=device,
            dtype=dtype,
            tile=tile,
            overlap=overlap,
            tile_batch=tile_batch,
            seed=seed,
            steps=steps,
            quantize=quantize,
            offline=offline,
            progress=out.show_progress,
            warn=out.warn,
        )
        out.info(
            f"model: {upscaler.info.get('model')} ({upscaler.inference.family}, ×{scale}) on "
            f"{upscaler.device} {upscaler.info['dtype']}"
        )
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, disable=not out.show_progress, console=out.stderr, transient=True) as progress:
        images = progress.add_task("images", total=len(todo))
        tiles = progress.add_task("tiles", total=None)
        for plan in todo:
            source = plan.source.path
            progress.update(tiles, description=f"tiles of {source.name}", completed=0, total=None)
            image_started = time.perf_counter()
            try:
                decoded = read_image(source)
                result = upscaler.upscale_array(
                    decoded.rgb,
                    out_dtype=np.float32,
                    progress=lambda done, total: progress.update(tiles, completed=done, total=total),
                )
                alpha = upscale_alpha(decoded.alpha, scale) if decoded.alpha is not None else None
                plan.output.parent.mkdir(parents=True, exist_ok=True)
                notes = write_image(
                    plan.output,
                    result.image,
                    alpha=alpha,
                    is_gray=decoded.is_gray,
                    bit_depth=decoded.bit_depth,
                    fmt=plan.fmt,
                    quality=quality,
                    icc_profile=decoded.icc_profile,
                    exif=decoded.exif,
                )
            except Sr1stepError as exc:
                report.failed.append({"input": str(source), "status": "failed", "error": str(exc)})
                out.error(str(exc))
                out.record(report.failed[-1])
                progress.advance(images)
                continue
            except OSError as exc:  # e.g. the output folder cannot be created
                message = f"{plan.output}: cannot write ({exc.strerror or exc})"
                report.failed.append({"input": str(source), "status": "failed", "error": message})
                out.error(message)
                out.record(report.failed[-1])
                progress.advance(images)
                continue
            height, width = result.image.shape[:2]
            report.megapixels += width * height / 1e6
            record = {
                "input": str(source),
                "output": str(plan.output),
                "status": "ok",
                "width": decoded.width,
                "height": decoded.height,
                "out_width": width,
                "out_height": height,
                "bit_depth": decoded.bit_depth,
                "tiles": result.tiles,
                "tile": result.tile,
                "seconds": round(time.perf_counter() - image_started, 3),
                "notes": list(decoded.notes) + list(notes),
            }
            report.done.append(record)
            out.record(record)
            for note in record["notes"]:
                out.warn(f"{source}: {note}")
            progress.advance(images)
    elapsed = time.perf_counter() - started
    out.info(
        f"{len(report.done)} upscaled, {len(report.skipped)} skipped, {len(report.failed)} failed; "
        f"{report.megapixels:.2f} MP written in {elapsed:.1f} s"
    )
    if report.failed:
        out.stderr.print(f"[red]{len(report.failed)} failed:[/red]", highlight=False)
        for failure in report.failed:
            out.stderr.print(f"  {failure['error']}", highlight=False, markup=False)
        return 1
    return 0
