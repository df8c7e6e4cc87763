"""``sr1step bench``: speed and peak memory of the pipeline vs. the official-semantics reference path.

Both paths run in the same session on the same generated images:

* **ours**: the configured pipeline (tiles, overlap, batch, dtype, shared noise, cosine blend);
* **reference**: official SinSR/RSD semantics — uniform LR tiles of 512 with stride 448, one tile per forward,
  fp32 on CPU / fp16 on CUDA, independent noise per tile, box-average blending.

Each measurement runs in a fresh worker process so its peak memory is its own: CUDA peak allocated bytes
(``torch.cuda.max_memory_allocated``), or on CPU the peak resident set size above the level after model load.
Timings take the median of ``runs`` runs after ``warmup`` runs (CUDA synchronised). Report ratios, not seconds:
absolute times depend on the machine.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from sr1step.errors import Sr1stepError

REFERENCE_TILE, REFERENCE_OVERLAP = 512, 64  # stride 448, as the official scripts' defaults

# Random-weight architectures for benchmarking without downloads: the real x4 sizes, or the fixtures' small ones.
RANDOM_ARCHS: dict[str, tuple[dict, dict]] = {
    "full": (
        {},  # ResShiftUNet defaults are the released x4 configuration
        {"embed_dim": 3, "n_embed": 8192, "ddconfig": {"ch": 128, "ch_mult": [1, 2, 4], "num_res_blocks": 2}},
    ),
    "small": (
        {"model_channels": 32, "swin_embed_dim": 64},
        {"embed_dim": 3, "n_embed": 64, "ddconfig": {"ch": 32, "ch_mult": [1, 2, 4], "num_res_blocks": 1}},
    ),
}


@dataclass
class BenchSpec:
    size: int  # LR side in px (square image)
    path: str  # "ours" | "reference"
    model: str | None  # registry name / path, or None with ``random``
    random: str | None  # "full" | "small": random weights of that architecture
    noise_channels: int
    device: str
    dtype: str
    tile: int
    overlap: int
    tile_batch: int
    runs: int
    warmup: int
    offline: bool


@dataclass
class BenchResult:
    size: int
    path: str
    median_s: float
    runs: list[float]
    peak_mb: float
    memory_kind: str
    tiles: int
    device: str
    dtype: str
    tile: int


def _peak_rss_mb() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def _build_upscaler(spec: BenchSpec) -> Any:
    from sr1step.checkpoints import InferenceSpec
    from sr1step.models import ResShiftUNet, VQAutoencoder
    from sr1step.pipeline import TileSettings, Upscaler, resolve_device, resolve_dtype

    reference = spec.path == "reference"
    device = resolve_device(spec.device)
    if reference:
        dtype = "fp16" if device.type == "cuda" else "fp32"
        tiles = dict(
            tile=REFERENCE_TILE, overlap=REFERENCE_OVERLAP, tile_batch=1, blend="uniform", noise="per-tile"
        )
    else:
        dtype = spec.dtype
        tiles = dict(tile=spec.tile, overlap=spec.overlap, tile_batch=spec.tile_batch)
    if spec.random is None:
        return Upscaler.from_pretrained(
            spec.model, device=spec.device, dtype=dtype, offline=spec.offline, seed=0, **tiles
        )
    unet_cfg, vq_cfg = RANDOM_ARCHS[spec.random]
    torch.manual_seed(0)
    unet = ResShiftUNet(**unet_cfg, noise_channels=spec.noise_channels)
    vae = VQAutoencoder(**vq_cfg)
    family = "rsd" if spec.noise_channels else "sinsr"
    return Upscaler(
        unet,
        vae,
        InferenceSpec(family=family),
        device=device,
        dtype=resolve_dtype(dtype, device),
        tiles=TileSettings(**tiles),
        seed=0,
    )


def run_worker(spec: BenchSpec) -> BenchResult:
    """Measure one (size, path) in this process."""
    upscaler = _build_upscaler(spec)
    device = upscaler.device
    rng = np.random.default_rng(0)
    # a smooth image with some texture: content does not change the cost, but keep it image-like
    yy, xx = np.mgrid[0 : spec.size, 0 : spec.size] / spec.size
    image = np.stack([xx, yy, 0.5 + 0.5 * np.sin(20 * xx * yy)], axis=-1)
    image = np.clip(image + rng.normal(0, 0.02, image.shape), 0, 1)
    image = (image * 255).round().astype(np.uint8)

    def once() -> tuple[float, int]:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = upscaler.upscale_array(image, seed=0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, result.tiles

    baseline = _peak_rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(spec.warmup):
        once()
    timings, tiles = [], 0
    for _ in range(spec.runs):
        seconds, tiles = once()
        timings.append(seconds)
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated() / 2**20, "cuda_allocated"
    else:
        peak, kind = _peak_rss_mb() - baseline, "cpu_rss_above_model"
    return BenchResult(
        size=spec.size,
        path=spec.path,
        median_s=statistics.median(timings),
        runs=timings,
        peak_mb=peak,
        memory_kind=kind,
        tiles=tiles,
        device=str(device),
        dtype=str(upscaler.dtype).removeprefix("torch."),
        tile=upscaler.tiles.tile,
    )


def measure(spec: BenchSpec) -> BenchResult:
    """Run one measurement in a fresh worker process (its peak memory is then its own)."""
    env = dict(os.environ)
    proc = subprocess.run(
        [sys.executable, "-m", "sr1step.bench", json.dumps(asdict(spec))],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise Sr1stepError(
            f"bench worker for size {spec.size} ({spec.path}) failed: {lines[-1] if lines else '?'}"
        )
    return BenchResult(**json.loads(proc.stdout.strip().splitlines()[-1]))


def compare(results: list[BenchResult]) -> list[dict[str, Any]]:
    """Pair ours/reference per size: speed-up (reference time / ours) and memory ratio (ours / reference)."""
    rows = []
    for size in sorted({r.size for r in results}):
        ours = next((r for r in results if r.size == size and r.path == "ours"), None)
        ref = next((r for r in results if r.size == size and r.path == "reference"), None)
        row: dict[str, Any] = {"size": size}
        if ours:
            row.update(ours_median_s=ours.median_s, ours_peak_mb=ours.peak_mb, ours_tiles=ours.tiles)
        if ref:
            row.update(ref_median_s=ref.median_s, ref_peak_mb=ref.peak_mb, ref_tiles=ref.tiles)
        if ours and ref:
            row["speedup"] = ref.median_s / ours.median_s
            row["memory_ratio"] = ours.peak_mb / ref.peak_mb if ref.peak_mb > 0 else float("nan")
        rows.append(row)
    return rows


if __name__ == "__main__":  # worker entry: one measurement, JSON on the last stdout line
    result = run_worker(BenchSpec(**json.loads(sys.argv[1])))
    print(json.dumps(asdict(result)))
