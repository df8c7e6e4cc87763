"""Image-quality metrics with the settings the one-step SR papers used.

PSNR and SSIM are computed here (NumPy only), exactly as pyiqa computes them with
``test_y_channel=True, color_space='ycbcr'`` (BT.601 studio-swing luma, no border crop); see
``shared/reference/evaluation.md`` §4.1-4.2. The learned metrics (LPIPS-alex, DISTS, NIQE, MUSIQ-KonIQ,
MANIQA-PIPAL, plain CLIPIQA, FID) run through pyiqa (the ``sr1step[eval]`` extra), created lazily with the
papers' options. Every metric takes 8-bit RGB arrays, i.e. images as they were saved to disk.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np

from sr1step.errors import ConfigError, WeightsError, WeightsNotFoundError

MetricKind = Literal["fr", "nr", "set"]
"""fr: per image, needs the HR image; nr: per image, SR only; set: one value for the SR folder vs the HR folder."""


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: MetricKind
    lower_is_better: bool
    decimals: int  # reporting precision of the published tables
    description: str
    pyiqa_name: str | None = None  # None: implemented in this module
    pyiqa_options: dict[str, Any] = field(default_factory=dict)

    @property
    def needs_reference(self) -> bool:
        return self.kind in ("fr", "set")

    def settings(self) -> dict[str, Any]:
        """What summary.json records about how this metric was computed."""
        if self.pyiqa_name is None:
            return {"implementation": "sr1step", "description": self.description}
        return {"implementation": "pyiqa", "pyiqa_name": self.pyiqa_name, "options": dict(self.pyiqa_options)}


# Options are pinned explicitly (they equal pyiqa's defaults today) so a changed default cannot move the numbers.
METRICS: dict[str, MetricSpec] = {
    spec.name: spec
    for spec in (
        MetricSpec("psnr", "fr", False, 2, "PSNR on BT.601 Y (float, no rounding), no border crop, eps 1e-8"),
        MetricSpec(
            "ssim", "fr", False, 4, "SSIM on BT.601 Y rounded to 0-255 integers, 11x11 Gaussian (1.5), valid"
        ),
        MetricSpec("lpips", "fr", True, 4, "LPIPS v0.1, AlexNet", "lpips", {"net": "alex", "version": "0.1"}),
        MetricSpec("dists", "fr", True, 4, "DISTS (VGG16)", "dists"),
        MetricSpec(
            "niqe", "nr", True, 4, "NIQE (YIQ luma)", "niqe",
            {"test_y_channel": True, "color_space": "yiq", "version": "original"},
        ),
        MetricSpec("musiq", "nr", False, 3, "MUSIQ, KonIQ-10k head", "musiq", {"pretrained": "koniq10k"}),
        MetricSpec("maniqa", "nr", False, 4, "MANIQA trained on PIPAL", "maniqa-pipal", {"train_dataset": "pipal"}),
        MetricSpec(
            "clipiqa", "nr", False, 4, "CLIPIQA (plain, RN50, no positional embedding)", "clipiqa",
            {"model_type": "clipiqa", "backbone": "RN50", "pos_embedding": False},
        ),
        MetricSpec("fid", "set", True, 2, "FID, SR folder vs HR folder, clean mode", "fid", {"dims": 2048}),
    )
}  # fmt: skip

# Names people know from pyiqa, mapped to ours.
METRIC_ALIASES = {"maniqa-pipal": "maniqa", "lpips-alex": "lpips"}


def parse_metric_names(text: str | Sequence[str]) -> list[str]:
    """``"psnr,ssim"`` (or a list) → validated canonical names in the given order, duplicates dropped."""
    raw = text.split(",") if isinstance(text, str) else list(text)
    names: list[str] = []
    for item in raw:
        key = item.strip().lower()
        if not key:
            continue
        key = METRIC_ALIASES.get(key, key)
        if key not in METRICS:
            raise ConfigError(f"unknown metric '{item.strip()}'; known metrics: {', '.join(METRICS)}")
        if key not in names:
            names.append(key)
    if not names:
        raise ConfigError(f"no metric given in '{text}'")
    return names


# ---------------------------------------------------------------------------------------------------------
# PSNR / SSIM (reference §4.1, §4.2)

# BT.601 studio-swing luma of RGB in [0, 1], in 0-255 units: 65.481 R + 128.553 G + 24.966 B + 16.
_LUMA_WEIGHTS = np.array([65.481, 128.553, 24.966], dtype=np.float64)


def _check_rgb8(image: np.ndarray, what: str) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{what} must be an H×W×3 uint8 array, got {image.dtype} {image.shape}")


def luma_bt601(rgb8: np.ndarray) -> np.ndarray:
    """Y of an 8-bit RGB image in 0-255 units (float64, not rounded; range 16..235)."""
    _check_rgb8(rgb8, "image")
    return (rgb8.astype(np.float64) / 255.0) @ _LUMA_WEIGHTS + 16.0


def _check_pair(sr: np.ndarray, hr: np.ndarray) -> None:
    _check_rgb8(sr, "SR image")
    _check_rgb8(hr, "HR image")
    if sr.shape != hr.shape:
        raise ValueError(f"SR and HR shapes differ: {sr.shape} vs {hr.shape}")


def psnr_y(sr: np.ndarray, hr: np.ndarray) -> float:
    """PSNR in dB on float Y in [0, 1]; eps 1e-8 caps identical images at 80 dB (as pyiqa)."""
    _check_pair(sr, hr)
    diff = (luma_bt601(sr) - luma_bt601(hr)) / 255.0
    mse = float(np.mean(diff * diff))
    return 10.0 * float(np.log10(1.0 / (mse + 1e-8)))


def _gaussian_window() -> np.ndarray:
    """MATLAB ``fspecial('gaussian', 11, 1.5)``, generated in float64 and stored as float32 like pyiqa's window
    (the float32 rounding moves SSIM by ~1e-7; keeping it reproduces pyiqa's values to ~1e-10)."""
    offsets = np.arange(-5.0, 6.0)
    window = np.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2.0 * 1.5**2))
    window[window < np.finfo(np.float64).eps * window.max()] = 0.0
    return (window / window.sum()).astype(np.float32).astype(np.float64)


SSIM_WINDOW = _gaussian_window()


def _filter_valid(planes: np.ndarray) -> np.ndarray:
    """'valid' 2-D filtering of (N, H, W) planes with the SSIM window, through the FFT (float64).

    A circular convolution of size H×W equals the linear one wherever the window does not wrap around, which
    is exactly the valid region (rows and columns from size-1 on).
    """
    height, width = planes.shape[-2:]
    size = SSIM_WINDOW.shape[0]
    kernel = np.fft.rfft2(
        SSIM_WINDOW[::-1, ::-1], s=(height, width)
    )  # flipped: correlation, as MATLAB filter2
    filtered = np.fft.irfft2(np.fft.rfft2(planes) * kernel, s=(height, width))
    return filtered[..., size - 1 :, size - 1 :]


def ssim_y(sr: np.ndarray, hr: np.ndarray) -> float:
    """SSIM on Y rounded to integers (MATLAB ``rgb2ycbcr`` on uint8), data range 255, 'valid' filtering."""
    _check_pair(sr, hr)
    height, width = sr.shape[:2]
    size = SSIM_WINDOW.shape[0]
    if min(height, width) < size:
        raise ValueError(f"SSIM needs images of at least {size}×{size} pixels, got {width}×{height}")
    x = np.round(luma_bt601(sr))  # round half to even, as torch.round in pyiqa
    y = np.round(luma_bt601(hr))
    mu_x, mu_y, e_xx, e_yy, e_xy = _filter_valid(np.stack([x, y, x * x, y * y, x * y]))
    var_x = e_xx - mu_x * mu_x
    var_y = e_yy - mu_y * mu_y
    cov_xy = e_xy - mu_x * mu_y
    c1 = (0.01 * 255.0) ** 2
    c2 = (0.03 * 255.0) ** 2
    contrast_structure = np.maximum((2.0 * cov_xy + c2) / (var_x + var_y + c2), 0.0)
    luminance = (2.0 * mu_x * mu_y + c1) / (mu_x * mu_x + mu_y * mu_y + c1)
    return float(np.mean(luminance * contrast_structure))


# ---------------------------------------------------------------------------------------------------------
# Weight files of the learned metrics (reference §4.10): where pyiqa, torchvision, OpenAI-CLIP and timm look.


@dataclass(frozen=True)
class WeightFile:
    path: Path  # where the loader looks for it
    url: str  # where it comes from on first use
    sha256: str | None = None  # checked by its loader (only OpenAI's CLIP loader does)
    hub_repo: str | None = None  # a Hugging Face model repo (timm), resolved through the HF cache

    def problem(self) -> str | None:
        """Why this file cannot be used offline, or None when it is in place."""
        if self.hub_repo is not None:
            return None if _hf_cached_file(self.hub_repo) else "not in the Hugging Face cache"
        if not self.path.is_file():
            return "missing"
        if self.sha256 is not None and _sha256(self.path) != self.sha256:
            return f"sha256 is not {self.sha256[:12]}… (its loader would download it again)"
        return None


def _sha256(path: Path) -> str:
    from sr1step.weights.cache import hash_file
    from sr1step.weights.progress import TransferProgress

    return hash_file(path, TransferProgress(enabled=False))[0]


# timm loads model.safetensors when the repo has it, else pytorch_model.bin.
_HF_WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")


def _hf_cached_file(repo_id: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    for filename in _HF_WEIGHT_NAMES:
        found = try_to_load_from_cache(repo_id, filename)
        if isinstance(found, str):
            return found
    return None


def _pyiqa_file(url: str) -> WeightFile:
    # pyiqa stores a file under the last URL component in a folder it fixes when it is imported.
    from pyiqa.utils import download_util

    return WeightFile(Path(download_util.DEFAULT_CACHE_DIR) / url.rsplit("/", 1)[-1], url)


def _torchvision_file(weights: Any) -> WeightFile:
    import torch

    url = weights.url
    return WeightFile(Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1], url)


def weight_files(name: str) -> list[WeightFile]:
    """Every file the learned metric ``name`` loads at construction (read from the libraries' own tables)."""
    import torch
    from torchvision import models

    spec = METRICS[name]
    if name == "lpips":
        from pyiqa.archs import lpips_arch

        key = f"{spec.pyiqa_options['version']}_{spec.pyiqa_options['net']}"
        return [
            _pyiqa_file(lpips_arch.default_model_urls[key]),
            _torchvision_file(models.AlexNet_Weights.IMAGENET1K_V1),
        ]
    if name == "dists":
        from pyiqa.archs import dists_arch

        return [
            _pyiqa_file(dists_arch.default_model_urls["url"]),
            _torchvision_file(models.VGG16_Weights.IMAGENET1K_V1),
        ]
    if name == "niqe":
        from pyiqa.archs import niqe_arch

        return [_pyiqa_file(niqe_arch.default_model_urls["url"])]
    if name == "musiq":
        from pyiqa.archs import musiq_arch

        return [_pyiqa_file(musiq_arch.default_model_urls[spec.pyiqa_options["pretrained"]])]
    if name == "maniqa":
        import timm
        from huggingface_hub import constants
        from pyiqa.archs import maniqa_arch

        # MANIQA builds timm's ViT with pretrained=True (a Hub download) before loading its own checkpoint.
        repo = timm.models.get_pretrained_cfg("vit_base_patch8_224").hf_hub_id
        hub_path = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}" / "snapshots"
        return [
            _pyiqa_file(maniqa_arch.default_model_urls[spec.pyiqa_options["train_dataset"]]),
            WeightFile(hub_path / "<revision>" / _HF_WEIGHT_NAMES[0], f"hf://{repo}", hub_repo=repo),
        ]
    if name == "clipiqa":
        from pyiqa.archs import clip_model

        url = clip_model._MODELS[spec.pyiqa_options["backbone"]]
        # OpenAI's loader keeps the sha256 as the URL's parent folder and re-downloads on a mismatch.
        return [
            WeightFile(Path(torch.hub.get_dir()) / "clip" / url.rsplit("/", 1)[-1], url, url.split("/")[-2])
        ]
    if name == "fid":
        from pyiqa.archs import inception

        return [_pyiqa_file(inception.FID_WEIGHTS_URL)]
    return []


def check_weights_cached(names: Sequence[str]) -> None:
    """Offline mode: fail before any loading when a learned metric's weights are not all in place."""
    problems = [
        f"{name} needs {wf.path} ({reason}; from {wf.url})"
        for name in names
        if METRICS[name].pyiqa_name is not None
        for wf in weight_files(name)
        if (reason := wf.problem()) is not None
    ]
    if problems:
        raise WeightsNotFoundError(
            "--offline: metric weights are not cached: " + "; ".join(problems)
            + ". Run once with network access, or put the files there"
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Metric objects


ImageMetricFn = Callable[[np.ndarray, "np.ndarray | None"], float]


class ImageMetric:
    """A per-image metric: ``metric(sr, hr)`` with 8-bit RGB arrays (``hr`` is None for no-reference ones)."""

    def __init__(self, spec: MetricSpec, fn: ImageMetricFn) -> None:
        self.spec = spec
        self._fn = fn

    def __call__(self, sr: np.ndarray, hr: np.ndarray | None) -> float:
        return self._fn(sr, hr)


class SetMetric:
    """A folder-level metric (FID): ``metric(sr_files, hr_files)`` over exactly the given files."""

    def __init__(self, spec: MetricSpec, fn: Callable[[Path, Path], float]) -> None:
        self.spec = spec
        self._fn = fn

    def __call__(self, sr_files: Sequence[Path], hr_files: Sequence[Path]) -> float:
        # pyiqa's FID walks folders recursively; staging links makes it see the paired files and nothing else.
        with tempfile.TemporaryDirectory(prefix="sr1step-fid-") as stage:
            sr_dir, hr_dir = (
                _stage_files(sr_files, Path(stage) / "sr"),
                _stage_files(hr_files, Path(stage) / "hr"),
            )
            return self._fn(sr_dir, hr_dir)


def _stage_files(files: Sequence[Path], folder: Path) -> Path:
    folder.mkdir(parents=True)
    for index, source in enumerate(files):
        # Index prefix: unique names even when two folders hold the same file name.
        link = folder / f"{index:06d}_{source.name}"
        try:
            link.symlink_to(source.resolve())
        except OSError:  # file systems without symlinks: hard link instead (same bytes either way)
            os.link(source, link)
    return folder


@contextlib.contextmanager
def _hub_offline(enabled: bool) -> Iterator[None]:
    """Keep huggingface_hub from any request (timm's ViT for MANIQA) while ``enabled``."""
    if not enabled:
        yield
        return
    from huggingface_hub import constants

    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def resolve_device(device: str) -> str:
    """``auto``: CUDA when available, else CPU (not MPS: pyiqa's NIQE and SSIM-style code needs float64).
    An explicit device is checked by the pipeline's rules (a clear error when it is not available)."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    from sr1step.pipeline import resolve_device as check_device

    return str(check_device(device))


def _to_tensor(image: np.ndarray, device: str) -> Any:
    import torch

    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float().div(255.0).to(device)


def create_metrics(
    names: Sequence[str], *, device: str = "auto", offline: bool = False, log: IO[str] | None = None
) -> dict[str, ImageMetric | SetMetric]:
    """Build the metrics ``names``. Learned metrics load their weights here (pyiqa downloads them on first use;
    with ``offline`` every missing file is reported in one error before anything loads).

    ``log`` receives what pyiqa prints while loading (it prints to stdout, which ``--json`` keeps clean).
    """
    if offline:
        check_weights_cached(names)
    return {name: _create_metric(METRICS[name], resolve_device(device), offline, log) for name in names}


def _create_metric(
    spec: MetricSpec, device: str, offline: bool, log: IO[str] | None
) -> ImageMetric | SetMetric:
    if spec.name == "psnr":
        return ImageMetric(spec, lambda sr, hr: psnr_y(sr, _need_hr(hr)))
    if spec.name == "ssim":
        return ImageMetric(spec, lambda sr, hr: ssim_y(sr, _need_hr(hr)))
    return _create_pyiqa_metric(spec, device, offline, log)


def _need_hr(hr: np.ndarray | None) -> np.ndarray:
    if hr is None:
        raise ValueError("this metric needs the HR image")
    return hr


def _create_pyiqa_metric(
    spec: MetricSpec, device: str, offline: bool, log: IO[str] | None
) -> ImageMetric | SetMetric:
    try:
        import pyiqa
    except ImportError as exc:
        raise ConfigError(
            f"metric '{spec.name}' needs the optional package pyiqa: pip install 'sr1step[eval]' ({exc})"
        ) from exc
    import torch

    sink = log if log is not None else open(os.devnull, "w")  # noqa: SIM115 - closed below
    try:
        with contextlib.redirect_stdout(sink), _hub_offline(offline):
            model = pyiqa.create_metric(spec.pyiqa_name, device=torch.device(device), **spec.pyiqa_options)
    except ImportError as exc:  # pyiqa imports each metric's own packages lazily, here
        hint = " (openai-clip imports it; setuptools>=81 no longer ships it: pip install 'setuptools<81')"
        raise ConfigError(
            f"metric '{spec.name}' cannot be built: pyiqa's '{spec.pyiqa_name}' failed to import "
            f"{exc.name or 'a module'} ({exc}){hint if exc.name == 'pkg_resources' else ''}"
        ) from exc
    except Exception as exc:  # download failures, corrupt or truncated files (EOFError, unpickling errors, …)
        places = ", ".join(str(wf.path) for wf in weight_files(spec.name))
        raise WeightsError(
            f"cannot load metric '{spec.name}' (pyiqa '{spec.pyiqa_name}'): {type(exc).__name__}: {exc}; "
            f"its weights are downloaded on first use into {places}"
        ) from exc
    finally:
        if sink is not log:
            sink.close()
    model.eval()

    if spec.kind == "set":
        workers = min(4, os.cpu_count() or 1)

        def folder_score(sr_dir: Path, hr_dir: Path) -> float:
            # Argument order as OSEDiff's test_metrics.py: (GT folder, SR folder).
            with torch.no_grad():
                return float(
                    model(str(hr_dir), str(sr_dir), mode="clean", num_workers=workers, verbose=False)
                )

        return SetMetric(spec, folder_score)

    def image_score(sr: np.ndarray, hr: np.ndarray | None) -> float:
        with torch.no_grad():
            if spec.kind == "fr":
                score = model(_to_tensor(sr, device), _to_tensor(_need_hr(hr), device))
            else:
                score = model(_to_tensor(sr, device))
        return float(score.reshape(-1)[0].item())

    return ImageMetric(spec, image_score)
