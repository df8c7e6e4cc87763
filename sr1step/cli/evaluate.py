"""`sr1step eval`: upscale a test set with one or more models (or take existing SR images) and score them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from sr1step.cli._output import Output

if TYPE_CHECKING:
    from rich.table import Table

    from sr1step.eval.runner import EvalResult, UpscaleOptions


def results_table(results: list[EvalResult], metric_names: list[str], title: str) -> Table:
    """Models × metrics; the best value of each column in bold (lower is better for LPIPS/DISTS/NIQE/FID)."""
    from rich.table import Table
    from rich.text import Text

    from sr1step.eval.metrics import METRICS

    table = Table(title=title)
    table.add_column("model")
    for name in metric_names:
        table.add_column(f"{name.upper()} {'↓' if METRICS[name].lower_is_better else '↑'}", justify="right")

    best: dict[str, str | None] = {}
    for name in metric_names:
        spec = METRICS[name]
        values = [r.scores[name] for r in results if r.scores.get(name) is not None]
        chosen = (min if spec.lower_is_better else max)(values) if values else None
        # Compared at the printed precision, so a tie in the table is a tie in bold.
        best[name] = f"{chosen:.{spec.decimals}f}" if chosen is not None and len(results) > 1 else None

    for result in results:
        cells = []
        for name in metric_names:
            value = result.scores.get(name)
            text = "n/a" if value is None else f"{value:.{METRICS[name].decimals}f}"
            cells.append(Text(text, style="bold" if text == best[name] else ""))
        table.add_row(result.model, *cells)
    return table


def datasets_table() -> Table:
    from rich.table import Table

    from sr1step.eval.datasets import DATASETS

    table = Table(title="evaluation datasets (sr1step eval --dataset NAME)")
    table.add_column("name", no_wrap=True)
    for column in ("images", "sizes", "metrics", "source"):
        table.add_column(column)
    for spec in DATASETS.values():
        source = f"Hub {spec.hub.repo_id}" if spec.hub else "manual download"
        table.add_row(spec.name, str(spec.images), spec.sizes, ", ".join(spec.metrics), source)
    return table


def _folder_label(*folders: Path | None) -> str:
    """A results-folder name for local folders: the parent of the first given folder (…/mypairs/hr → mypairs)."""
    from sr1step.eval.runner import model_label

    folder = next(f for f in folders if f is not None).resolve()
    return model_label(folder.parent.name or folder.name)


def _run(
    *,
    dataset: str | None,
    models: list[str],
    sr_dirs: list[Path],
    lr_dir: Path | None,
    hr_dir: Path | None,
    metrics: str | None,
    out_root: Path,
    data_root: Path | None,
    name: str | None,
    offline: bool,
    upscale: UpscaleOptions,
    out: Output,
) -> None:
    from sr1step.eval.datasets import get_dataset, resolve_dataset
    from sr1step.eval.metrics import parse_metric_names
    from sr1step.eval.runner import Evaluator, model_label
    from sr1step.pairing import image_files

    if models and sr_dirs:
        raise typer.BadParameter("--model upscales, --sr-dir scores existing images: use one or the other")
    if not models and not sr_dirs:
        raise typer.BadParameter("give --model (upscale and score) or --sr-dir (score existing images)")
    if dataset is not None and (lr_dir is not None or hr_dir is not None):
        raise typer.BadParameter("--dataset brings its own LR/HR folders: drop --lr-dir/--hr-dir")
    if sr_dirs and lr_dir is not None:
        raise typer.BadParameter("--lr-dir is for --model runs; with --sr-dir give --hr-dir (or --dataset)")
    if models and dataset is None and lr_dir is None:
        raise typer.BadParameter("--model needs the LR images: --dataset NAME or --lr-dir DIR")

    # Everything that can be refused is refused before a dataset download or a model load.
    spec = get_dataset(dataset) if dataset is not None else None
    explicit_metrics = parse_metric_names(metrics) if metrics is not None else None
    run_labels = [model_label(m) for m in models] or [model_label(d.name) for d in sr_dirs]
    duplicates = sorted({x for x in run_labels if run_labels.count(x) > 1})
    if duplicates:
        raise typer.BadParameter(f"two runs would share the results folder <out>/<dataset>/{duplicates[0]}")

    if spec is not None:
        resolved = resolve_dataset(spec.name, data_root, offline=offline)
        lr_dir, hr_dir = resolved.lr_dir, resolved.hr_dir
        found = len(image_files(lr_dir))
        if found != spec.images:
            out.warn(f"{lr_dir} holds {found} images; the published {spec.name} set has {spec.images}")
    label = name or (spec.name if spec else _folder_label(hr_dir, lr_dir, *sr_dirs))
    if explicit_metrics is not None:
        metric_names = explicit_metrics
    elif spec is not None:
        metric_names = list(spec.metrics)
    else:
        metric_names = ["psnr", "ssim"] if hr_dir is not None else ["clipiqa", "musiq"]

    evaluator = Evaluator(
        metric_names,
        out_root=out_root,
        device=upscale.device,
        offline=offline,
        console=out.stderr if out.show_progress else None,
    )
    results = []
    if models:
        for model in models:
            results.append(
                evaluator.evaluate_model(
                    dataset=label, model_spec=model, lr_dir=lr_dir, hr_dir=hr_dir, options=upscale
                )
            )
    else:
        for sr_dir, run_label in zip(sr_dirs, run_labels, strict=True):
            results.append(
                evaluator.score_folder(dataset=label, model=run_label, sr_dir=sr_dir, hr_dir=hr_dir)
            )

    for result in results:
        out.info(f"{result.model}: {result.images} images → {result.out_dir}")
        for warning in result.summary["warnings"]:
            out.warn(f"{result.model}: {warning}")
        out.record(result.summary)
    out.result(results_table(results, metric_names, f"{label} ({results[0].images} images)"))


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def evaluate(
        dataset: Annotated[
            str | None,
            typer.Option(
                "--dataset",
                "-d",
                help="A registered test set (see --list-datasets); brings LR/HR and metrics.",
            ),
        ] = None,
        model: Annotated[
            list[str] | None,
            typer.Option(
                "--model", "-m", help="Model to upscale with (name, path or hf://…); repeat to compare."
            ),
        ] = None,
        sr_dir: Annotated[
            list[Path] | None,
            typer.Option(
                "--sr-dir", help="Score existing SR images in this folder instead; repeat to compare."
            ),
        ] = None,
        lr_dir: Annotated[
            Path | None, typer.Option("--lr-dir", help="LR images of a local test set.")
        ] = None,
        hr_dir: Annotated[
            Path | None,
            typer.Option("--hr-dir", help="Ground-truth images, paired by file name (extension ignored)."),
        ] = None,
        metrics: Annotated[
            str | None,
            typer.Option(
                "--metrics",
                help="Comma-separated: psnr,ssim,lpips,dists,niqe,musiq,maniqa,clipiqa,fid "
                "(default: the dataset's protocol; psnr,ssim for local paired folders, clipiqa,musiq without HR).",
            ),
        ] = None,
        out_dir: Annotated[
            Path, typer.Option("--out", "-o", help="Results folder: <out>/<dataset>/<model>/.")
        ] = Path("results"),
        data_root: Annotated[
            Path | None,
            typer.Option("--data-root", help="Folder holding the datasets (default: the sr1step cache)."),
        ] = None,
        name: Annotated[
            str | None, typer.Option("--name", help="Dataset label for the results folder (local folders).")
        ] = None,
        offline: Annotated[
            bool, typer.Option("--offline", help="Use cached models, datasets and metric weights only.")
        ] = False,
        scale: Annotated[int, typer.Option("--scale", "-x", help="Upscaling factor.")] = 4,
        vae: Annotated[
            str | None, typer.Option("--vae", help="Autoencoder when the model file does not name it.")
        ] = None,
        device: Annotated[str, typer.Option("--device", help="auto, cuda, cpu or mps.")] = "auto",
        dtype: Annotated[str, typer.Option("--dtype", help="auto, bf16, fp16 or fp32 (upscaling).")] = "auto",
        tile: Annotated[
            int | None, typer.Option("--tile", help="Tile size in LR pixels (0: whole image).")
        ] = None,
        overlap: Annotated[int | None, typer.Option("--overlap", help="Tile overlap in LR pixels.")] = None,
        seed: Annotated[
            int, typer.Option("--seed", help="Noise seed of the one-step models (RSD's default).")
        ] = 12345,
        list_datasets: Annotated[
            bool, typer.Option("--list-datasets", help="List the registered datasets and exit.")
        ] = False,
        json_mode: Annotated[
            bool, typer.Option("--json", help="One JSON summary per model on stdout.")
        ] = False,
        quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Errors only.")] = False,
    ) -> None:
        """Score super-resolution: upscale a test set with models (cached, resumable) or score existing images."""
        from sr1step.eval.runner import UpscaleOptions

        out = Output(quiet=quiet, json_mode=json_mode)
        if list_datasets:
            from dataclasses import asdict

            from sr1step.eval.datasets import DATASETS

            for spec in DATASETS.values():
                out.record(asdict(spec))
            out.result(datasets_table())
            return
        _run(
            dataset=dataset,
            models=model or [],
            sr_dirs=sr_dir or [],
            lr_dir=lr_dir,
            hr_dir=hr_dir,
            metrics=metrics,
            out_root=out_dir,
            data_root=data_root,
            name=name,
            offline=offline,
            upscale=UpscaleOptions(
                scale=scale,
                vae=vae,
                device=device,
                dtype=dtype,
                tile=tile,
                overlap=overlap,
                seed=seed,
                offline=offline,
            ),
            out=out,
        )
