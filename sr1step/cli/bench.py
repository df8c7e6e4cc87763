"""`sr1step bench`: time and memory of the pipeline against the official-semantics reference path."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from sr1step.cli._output import Output
from sr1step.errors import ConfigError


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--sizes must be comma-separated integers, got {text!r}") from None
    if not sizes or any(s < 1 for s in sizes):
        raise ConfigError(f"--sizes must be positive integers, got {text!r}")
    return sizes


def register(app: typer.Typer) -> None:
    @app.command("bench")
    def bench(
        model: Annotated[
            str | None, typer.Option("--model", "-m", help="Registry name, path or hf:// spec.")
        ] = None,
        random: Annotated[
            str | None,
            typer.Option(
                "--random",
                help="Benchmark random weights of an architecture instead: 'full' (real x4 size) or 'small'.",
            ),
        ] = None,
        noise_channels: Annotated[
            int, typer.Option(help="Student noise planes of the random model (1 = RSD).")
        ] = 1,
        sizes: Annotated[
            str, typer.Option(help="Square LR input sizes in px, comma-separated.")
        ] = "256,1024",
        runs: Annotated[
            int, typer.Option(min=1, help="Timed runs per measurement (the median is reported).")
        ] = 3,
        warmup: Annotated[int, typer.Option(min=0, help="Untimed warm-up runs.")] = 1,
        device: Annotated[str, typer.Option(help="auto | cuda | cpu | mps")] = "auto",
        dtype: Annotated[
            str, typer.Option(help="auto | bf16 | fp16 | fp32 (ours; the reference is fp16/fp32)")
        ] = "auto",
        tile: Annotated[int, typer.Option(help="Our LR tile size (0 = whole image).")] = 256,
        overlap: Annotated[int, typer.Option(help="Our LR tile overlap.")] = 32,
        tile_batch: Annotated[int, typer.Option(help="Our tiles per forward.")] = 1,
        reference: Annotated[
            bool, typer.Option(help="Also measure the official-semantics reference path.")
        ] = True,
        offline: Annotated[bool, typer.Option(help="Use cached weights only.")] = False,
        json_out: Annotated[bool, typer.Option("--json", help="One JSON record per size on stdout.")] = False,
        quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
    ) -> None:
        """Time the pipeline (warm-up, median of runs, peak memory) and print ratios vs. the reference path."""
        from rich.progress import Progress

        from sr1step.bench import RANDOM_ARCHS, BenchSpec, compare, measure

        out = Output(quiet=quiet, json_mode=json_out)
        if (model is None) == (random is None):
            raise ConfigError("give exactly one of --model or --random (e.g. --random small)")
        if random is not None and random not in RANDOM_ARCHS:
            raise ConfigError(f"--random must be one of {', '.join(RANDOM_ARCHS)}, got {random!r}")
        paths = ["ours", "reference"] if reference else ["ours"]
        specs = [
            BenchSpec(
                size=size,
                path=path,
                model=model,
                random=random,
                noise_channels=noise_channels,
                device=device,
                dtype=dtype,
                tile=tile,
                overlap=overlap,
                tile_batch=tile_batch,
                runs=runs,
                warmup=warmup,
                offline=offline,
            )
            for size in _sizes(sizes)
            for path in paths
        ]
        results, rows = [], []
        with Progress(disable=not out.show_progress, transient=True) as progress:
            task = progress.add_task("benchmarking", total=len(specs))
            for spec in specs:
                progress.update(task, description=f"{spec.path} {spec.size}²")
                results.append(measure(spec))
                progress.advance(task)
                if spec.path == paths[-1]:  # a size is complete: report it now (long runs can be cut short)
                    (row,) = compare([r for r in results if r.size == spec.size])
                    rows.append(row)
                    out.record(row)
        table = Table(
            title=f"sr1step bench ({results[0].device}, ours {results[0].dtype}; memory: {results[0].memory_kind})"
        )
        for column in (
            "LR size",
            "ours s",
            "ref s",
            "speed-up",
            "ours MB",
            "ref MB",
            "memory ratio",
            "tiles",
        ):
            table.add_column(column, justify="right")
        for row in rows:
            table.add_row(
                f"{row['size']}²",
                f"{row.get('ours_median_s', float('nan')):.3f}",
                f"{row.get('ref_median_s', float('nan')):.3f}" if "ref_median_s" in row else "-",
                f"{row['speedup']:.2f}×" if "speedup" in row else "-",
                f"{row.get('ours_peak_mb', float('nan')):.0f}",
                f"{row['ref_peak_mb']:.0f}" if "ref_peak_mb" in row else "-",
                f"{row['memory_ratio']:.2f}" if "memory_ratio" in row else "-",
                str(row.get("ours_tiles", "-")),
            )
        out.result(table)
