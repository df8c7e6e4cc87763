"""Evaluation as the one-step SR papers did it: their metrics, their test sets, and runs that upscale and score.

* ``metrics``: PSNR/SSIM on BT.601 Y (own code) and the pyiqa-backed learned metrics with the papers' options.
* ``datasets``: the registered test sets, their protocols and where they come from.
* ``runner``: pairing, cached and resumable upscaling, scoring, ``per_image.csv`` and ``summary.json``.
"""

from sr1step.eval.datasets import DATASETS, DatasetSpec, ResolvedDataset, resolve_dataset
from sr1step.eval.metrics import METRICS, MetricSpec, create_metrics, parse_metric_names, psnr_y, ssim_y
from sr1step.eval.runner import EvalResult, Evaluator, UpscaleOptions, pair_by_name, read_rgb8

__all__ = [
    "DATASETS",
    "METRICS",
    "DatasetSpec",
    "EvalResult",
    "Evaluator",
    "MetricSpec",
    "ResolvedDataset",
    "UpscaleOptions",
    "create_metrics",
    "pair_by_name",
    "parse_metric_names",
    "psnr_y",
    "read_rgb8",
    "resolve_dataset",
    "ssim_y",
]
