"""Evaluation runs: pair images by name, upscale LR sets with a model (cached, resumable), score, write results.

Layout of one run, ``<out>/<dataset>/<model>/``:

* ``sr/<name>.png`` — the model's outputs (model runs only). Each file is written atomically, so a file that
  exists is complete and a re-run upscales only what is missing. ``run.json`` records the model and settings
  that made them; a re-run with other settings is refused rather than mixing outputs.
* ``per_image.csv`` — one row per image, one column per per-image metric.
* ``summary.json`` — means, FID, metric settings, versions, model sha256 / seed / tiling.

Images are scored from the saved 8-bit files, as the papers did.
"""

from __future__ import annotations

import csv
import io
import json
import math
import platform
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from sr1step.errors import ConfigError, DatasetError, ImageReadError, Sr1stepError
from sr1step.eval.metrics import METRICS, ImageMetric, SetMetric, create_metrics, resolve_device
from sr1step.fsio import atomic_path, atomic_write_text
from sr1step.imageio import PILLOW_FORMATS
from sr1step.pairing import (
    Pair,
    check_size,
    check_sizes,
    index_by_stem,
    name_list,
    pair_by_name,
)

# PIL modes that are 8 bits per channel; they convert to RGB the way OpenCV's IMREAD_COLOR reads them
# (alpha dropped, gray and palette expanded).
_EIGHT_BIT_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "La"})


def read_rgb8(path: Path) -> np.ndarray:
    """An image file as an H×W×3 uint8 RGB array (writable copy); the format is sniffed from the content."""
    try:
        with Image.open(path, formats=PILLOW_FORMATS) as image:
            if image.mode not in _EIGHT_BIT_MODES:
                raise ImageReadError(
                    f"{path}: mode {image.mode} is not an 8-bit image; metrics score 8-bit files"
                )
            return np.array(image.convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise ImageReadError(f"{path}: cannot decode image ({exc})") from exc


def model_label(model_spec: str) -> str:
    """A folder name for a model: registry names as they are, files by their stem, hf:// by repo (and file)."""
    from sr1step.weights.hub import parse_hf_spec
    from sr1step.weights.registry import WEIGHT_SUFFIXES

    text = model_spec.rstrip("/")
    if text.startswith("hf://"):
        hub = parse_hf_spec(text)
        files = hub.filename.split("/") if hub.filename else []
        label = "--".join([*hub.repo.split("/"), *(Path(part).stem for part in files)])
    elif "/" in text or "\\" in text or Path(text).suffix in WEIGHT_SUFFIXES:
        label = Path(text).stem
    else:
        label = text
    label = re.sub(r"[^A-Za-z0-9._+-]+", "-", label).strip("-.")
    if not label:
        raise ConfigError(f"cannot name a results folder after model '{model_spec}'")
    return label


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    import sr1step

    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {
        "sr1step": sr1step.__version__,
        "torch": torch.__version__,
        "pyiqa": installed("pyiqa"),
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


@dataclass(frozen=True)
class UpscaleOptions:
    """What ``Upscaler.from_pretrained`` gets; None leaves the pipeline's default."""

    scale: int = 4
    vae: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    tile: int | None = None
    overlap: int | None = None
    seed: int | None = None
    offline: bool = False

    def pipeline_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "scale": self.scale,
            "vae": self.vae,
            "device": self.device,
            "dtype": self.dtype,
        }
        kwargs |= {
            k: v
            for k, v in (("tile", self.tile), ("overlap", self.overlap), ("seed", self.seed))
            if v is not None
        }
        return kwargs | {"offline": self.offline, "progress": False}

    def output_settings(self) -> dict[str, Any]:
        """The settings that change the output pixels (device excluded); a cached run must match them."""
        return {"scale": self.scale, "vae": self.vae, "dtype": self.dtype, "tile": self.tile,
                "overlap": self.overlap, "seed": self.seed}  # fmt: skip


# Upscaler.info entries that must match the run.json of cached outputs before more are added to them.
_OUTPUT_INFO_KEYS = ("sha256", "vae_sha256", "dtype")

UpscalerFactory = Callable[..., Any]
"""``factory(model_spec, **UpscaleOptions.pipeline_kwargs())`` → object with ``__call__(PIL) -> PIL`` and ``.info``."""


def _pipeline_factory(model_spec: str, **kwargs: Any) -> Any:
    from sr1step.pipeline import Upscaler

    return Upscaler.from_pretrained(model_spec, **kwargs)


@dataclass
class EvalResult:
    dataset: str
    model: str
    out_dir: Path
    images: int
    scores: dict[str, float | None]  # mean per metric (None when a value was not finite)
    summary: dict[str, Any] = field(repr=False)


@dataclass(frozen=True)
class _Item:
    name: str
    sr: Path
    hr: Path | None


class Evaluator:
    """Scores SR images with a fixed list of metrics; metrics are built on first use and shared across runs."""

    def __init__(
        self,
        metric_names: Sequence[str],
        *,
        out_root: Path = Path("results"),
        device: str = "auto",
        offline: bool = False,
        console: Any = None,  # a rich Console for progress bars; None: silent
    ) -> None:
        self.metric_names = list(metric_names)
        self.out_root = out_root
        self.device = device
        self.offline = offline
        self.console = console
        self._metrics: dict[str, ImageMetric | SetMetric] = {}

    # -- public entry points -----------------------------------------------------------------------------

    def score_folder(
        self,
        *,
        dataset: str,
        model: str,
        sr_dir: Path,
        hr_dir: Path | None,
    ) -> EvalResult:
        """Score existing SR images (paired by name with ``hr_dir`` when given)."""
        self._check_reference(hr_dir)
        items = [_Item(*item) for item in _named_images(sr_dir, hr_dir, "SR")]
        return self._score(dataset, model, items, {"sr_dir": sr_dir, "hr_dir": hr_dir}, None)

    def evaluate_model(
        self,
        *,
        dataset: str,
        model_spec: str,
        lr_dir: Path,
        hr_dir: Path | None,
        options: UpscaleOptions,
        upscaler_factory: UpscalerFactory | None = None,
    ) -> EvalResult:
        """Upscale every LR image with the model into ``<out>/<dataset>/<model>/sr/`` (missing ones only), then score."""
        self._check_reference(hr_dir)
        lr_items = _named_images(lr_dir, hr_dir, "LR", scale=options.scale)

        label = model_label(model_spec)
        run_dir = self.out_root / dataset / label
        sr_dir = run_dir / "sr"
        info = self._upscale_missing(
            model_spec, [(name, lr) for name, lr, _ in lr_items], sr_dir, run_dir / "run.json", options,
            upscaler_factory or _pipeline_factory,
        )  # fmt: skip
        items = [_Item(name, sr_dir / f"{name}.png", hr) for name, _, hr in lr_items]
        where = {"lr_dir": lr_dir, "hr_dir": hr_dir, "sr_dir": sr_dir}
        return self._score(dataset, label, items, where, info)

    # -- upscaling -----------------------------------------------------------------------------------------

    def _upscale_missing(
        self,
        model_spec: str,
        lr_files: list[tuple[str, Path]],
        sr_dir: Path,
        record_path: Path,
        options: UpscaleOptions,
        factory: UpscalerFactory,
    ) -> dict[str, Any]:
        requested = {"model": model_spec, **options.output_settings()}
        record = _read_record(record_path)
        if record is not None and record.get("requested") != requested:
            raise DatasetError(
                f"{sr_dir} holds outputs made with other settings ({_settings_diff(record.get('requested'), requested)}); "
                f"use another --out or delete {sr_dir.parent}"
            )
        missing = [(name, lr) for name, lr in lr_files if not (sr_dir / f"{name}.png").is_file()]
        if not missing and record is not None:
            return dict(record["info"])

        upscaler = factory(model_spec, **options.pipeline_kwargs())
        info = dict(upscaler.info)
        if record is not None:
            # What the options cannot tell: the file behind the name, the dtype "auto" became on this device.
            changed = [k for k in _OUTPUT_INFO_KEYS if k in info and record["info"].get(k) != info[k]]
            if changed:
                raise DatasetError(
                    f"{sr_dir} holds outputs of another model or precision ("
                    + ", ".join(f"{k}: {record['info'].get(k)} → {info[k]}" for k in changed)
                    + f"); use another --out or delete {sr_dir.parent}"
                )
        sr_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(
            record_path, json.dumps({"requested": requested, "info": info}, indent=2, default=str) + "\n"
        )
        with self._progress() as progress:
            task = progress.add_task(f"upscaling ({model_label(model_spec)})", total=len(missing))
            for name, lr_path in missing:
                lr = read_rgb8(lr_path)
                sr = upscaler(Image.fromarray(lr))
                expected = (lr.shape[1] * options.scale, lr.shape[0] * options.scale)
                if sr.size != expected:
                    raise Sr1stepError(
                        f"upscaling {lr_path} gave {sr.size[0]}×{sr.size[1]}, expected {expected[0]}×{expected[1]}"
                    )
                with atomic_path(sr_dir / f"{name}.png") as tmp:
                    sr.save(tmp, format="PNG")
                progress.advance(task)
        return info

    # -- scoring -------------------------------------------------------------------------------------------

    def _check_reference(self, hr_dir: Path | None) -> None:
        if hr_dir is None:
            needing = [n for n in self.metric_names if METRICS[n].needs_reference]
            if needing:
                raise ConfigError(
                    f"metric(s) {', '.join(needing)} need ground truth (HR images) and there is none here"
                )

    def _load_metrics(self) -> dict[str, ImageMetric | SetMetric]:
        missing = [name for name in self.metric_names if name not in self._metrics]
        if missing:
            log = sys.stderr if self.console is not None else None
            self._metrics |= create_metrics(missing, device=self.device, offline=self.offline, log=log)
        return {name: self._metrics[name] for name in self.metric_names}

    def _progress(self) -> Any:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        return Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            console=self.console, disable=self.console is None,
        )  # fmt: skip

    def _score(
        self,
        dataset: str,
        model: str,
        items: list[_Item],
        where: dict[str, Any],
        model_info: dict[str, Any] | None,
    ) -> EvalResult:
        metrics = self._load_metrics()
        image_metrics = {n: m for n, m in metrics.items() if isinstance(m, ImageMetric)}
        set_metrics = {n: m for n, m in metrics.items() if isinstance(m, SetMetric)}

        rows: list[dict[str, Any]] = []
        with self._progress() as progress:
            task = progress.add_task(f"scoring ({model})", total=len(items))
            for item in items:
                sr = read_rgb8(item.sr)
                hr = read_rgb8(item.hr) if item.hr is not None else None
                if hr is not None:  # checked from the headers already; this guards files changed since
                    sizes = (sr.shape[1], sr.shape[0]), (hr.shape[1], hr.shape[0])
                    check_size(Pair(item.name, item.sr, item.hr), *sizes, "SR", "HR")
                row: dict[str, Any] = {
                    "image": item.name,
                    "sr": str(item.sr),
                    "hr": str(item.hr) if item.hr else "",
                }
                for name, metric in image_metrics.items():
                    row[name] = _run_metric(name, item.name, metric, sr, hr)
                rows.append(row)
                progress.advance(task)

        scores: dict[str, float | None] = {}
        installed = versions()
        warnings = _version_warnings(self.metric_names, installed["pyiqa"])
        for name in image_metrics:
            values = [row[name] for row in rows]
            bad = [row["image"] for row in rows if not math.isfinite(row[name])]
            if bad:
                warnings.append(f"{name} is not finite for {len(bad)} image(s): {name_list(bad)}")
            scores[name] = float(np.mean(values)) if not bad else None
        for name, metric in set_metrics.items():
            value = _run_metric(name, "the image set", metric, [i.sr for i in items], [i.hr for i in items])
            if not math.isfinite(value):
                warnings.append(f"{name} is not finite")
            scores[name] = value if math.isfinite(value) else None

        out_dir = self.out_root / dataset / model
        out_dir.mkdir(parents=True, exist_ok=True)
        summary = {
            "dataset": dataset,
            "model": model,
            "images": len(items),
            "metrics": {name: scores[name] for name in self.metric_names},
            "lower_is_better": [n for n in self.metric_names if METRICS[n].lower_is_better],
            "metric_settings": {n: METRICS[n].settings() for n in self.metric_names},
            "paths": {k: str(Path(v).resolve()) if v is not None else None for k, v in where.items()},
            "model_info": model_info,
            "device": resolve_device(self.device),
            "versions": installed,
            "warnings": warnings,
            "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        atomic_write_text(out_dir / "per_image.csv", _csv_text(rows, list(image_metrics)))
        atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
        return EvalResult(dataset, model, out_dir, len(items), scores, summary)


def _named_images(
    folder: Path, hr_dir: Path | None, role: str, scale: int = 1
) -> list[tuple[str, Path, Path | None]]:
    """(name, image, HR partner) for each image of ``folder``: paired by name with ``hr_dir`` and size-checked
    (HR = ``scale`` × the image), or with no partner when there is no ground truth."""
    if hr_dir is None:
        return [(stem, path, None) for stem, path in sorted(index_by_stem(folder, role).items())]
    pairs = pair_by_name(folder, hr_dir, role, "HR")
    check_sizes(pairs, role, "HR", scale=scale)
    return [(pair.name, pair.left, pair.right) for pair in pairs]


def _version_warnings(metric_names: Sequence[str], pyiqa_version: str | None) -> list[str]:
    """Known ways the installed pyiqa departs from the version the papers used (reference §0.4)."""
    if "maniqa" not in metric_names or pyiqa_version is None:
        return []
    major_minor_patch = tuple(int(part) for part in re.findall(r"\d+", pyiqa_version)[:3])
    if major_minor_patch < (0, 1, 12):
        return []
    return [
        f"maniqa: pyiqa {pyiqa_version} takes its 20 crops on a uniform grid; OSEDiff/RSD used pyiqa 0.1.10/0.1.11 "
        "(seed-123 random crops), so MANIQA differs from their tables in the 3rd-4th decimal"
    ]


def _run_metric(name: str, subject: str, metric: Callable[..., float], *inputs: Any) -> float:
    try:
        return float(metric(*inputs))
    except Sr1stepError:
        raise
    except Exception as exc:  # a metric failing on one input: name the input instead of a bare traceback
        raise Sr1stepError(f"metric {name} failed on {subject}: {type(exc).__name__}: {exc}") from exc


def _csv_text(rows: list[dict[str, Any]], metric_names: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["image", "sr", "hr", *metric_names])
    for row in rows:
        writer.writerow([row["image"], row["sr"], row["hr"], *(repr(row[n]) for n in metric_names)])
    return buffer.getvalue()


def _read_record(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetError(
            f"{path} is not readable JSON ({exc}); delete it and its sr/ folder to start over"
        ) from exc
    if not isinstance(record, dict) or "requested" not in record or "info" not in record:
        raise DatasetError(f"{path} is not an sr1step run record; delete it and its sr/ folder to start over")
    return record


def _settings_diff(old: Any, new: dict[str, Any]) -> str:
    if not isinstance(old, dict):
        return "unknown settings"
    changed = [f"{k}: {old.get(k)!r} → {new[k]!r}" for k in new if old.get(k) != new[k]]
    return ", ".join(changed) or "unknown settings"
