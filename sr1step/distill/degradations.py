"""Real-ESRGAN second-order degradation, batched in torch so it runs on the training device.

Turns clean GT crops (B, 3, H, W) in [0, 1] into LQ images (B, 3, H/scale, W/scale) in [0, 1] with the settings
RSD trains with (reference ``distillation.md`` §2.10, ResShift/Real-ESRGAN):

1. blur with a random per-sample kernel (Gaussian, generalized Gaussian, plateau, iso/aniso, or 2-D sinc),
   resize (up/down/keep, random mode), Gaussian or Poisson noise (colour or grey), JPEG;
2. with probability ``second_order_prob``: blur again (``second_blur_prob``), resize relative to the final LR
   size, noise again;
3. the final stage in random order: [resize to LR → sinc → JPEG] or [JPEG → resize to LR → sinc];
4. round to 8-bit levels.

All randomness comes from one ``torch.Generator``. :func:`sample_plan` draws every random choice of a batch in a
fixed order, whatever stages are switched off, and :func:`apply_plan` applies it; so a seed fixes the whole
pipeline and switching one stage off leaves every other stage's draws unchanged. Noise tensors come from
per-stage generators seeded by the plan, created on the images' device.

The JPEG stage is an own float implementation of a baseline libjpeg round trip (RGB→YCbCr, 4:2:0, 8×8 DCT,
quantisation with the Annex K tables scaled by quality as libjpeg does, rounding, inverse, "fancy" chroma
upsampling); it is not differentiable, and does not need to be: gradients never flow into the data.

Also here: USM sharpening of the GT (off in RSD), and :class:`TrainingPairPool`, Real-ESRGAN's training-pair
queue that mixes per-batch degradation choices across iterations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sr1step.errors import ConfigError

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
RESIZE_MODES = ("area", "bilinear", "bicubic")
# Order of the three resize-direction probabilities in ``resize_prob`` / ``resize_prob2``.
RESIZE_DIRECTIONS = ("up", "down", "keep")

# Kernel rotation is drawn from U[-pi, pi] in both stages (Real-ESRGAN ``rotation_range``).
ROTATION_RANGE = (-math.pi, math.pi)
# Sinc cutoff omega_c: U[pi/3, pi] for kernels smaller than 13, U[pi/5, pi] from 13 up (a larger support can
# realise a lower cutoff); the final sinc always uses U[pi/3, pi].
SINC_CUTOFF_SMALL = (math.pi / 3, math.pi)
SINC_CUTOFF_LARGE = (math.pi / 5, math.pi)
SINC_LARGE_KERNEL_FROM = 13
# Grey noise and Poisson-on-grey use these luma weights (torchvision's rgb_to_grayscale, as Real-ESRGAN).
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)

# JPEG Annex K base quantisation tables (luminance, chrominance), row-major 8×8.
JPEG_LUMA_TABLE = (
    (16, 11, 10, 16, 24, 40, 51, 61),
    (12, 12, 14, 19, 26, 58, 60, 55),
    (14, 13, 16, 24, 40, 57, 69, 56),
    (14, 17, 22, 29, 51, 87, 80, 62),
    (18, 22, 37, 56, 68, 109, 103, 77),
    (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101),
    (72, 92, 95, 98, 112, 100, 103, 99),
)
JPEG_CHROMA_TABLE = (
    (17, 18, 24, 47, 99, 99, 99, 99),
    (18, 21, 26, 66, 99, 99, 99, 99),
    (24, 26, 56, 99, 99, 99, 99, 99),
    (47, 66, 99, 99, 99, 99, 99, 99),
    (99, 99, 99, 99, 99, 99, 99, 99),
    (99, 99, 99, 99, 99, 99, 99, 99),
    (99, 99, 99, 99, 99, 99, 99, 99),
    (99, 99, 99, 99, 99, 99, 99, 99),
)


# ----------------------------------------------------------------------------------------------- config

_PROBABILITY_FIELDS = (
    "sinc_prob",
    "gaussian_noise_prob",
    "gray_noise_prob",
    "second_order_prob",
    "second_blur_prob",
)
_PROBABILITY_FIELDS += ("sinc_prob2", "gaussian_noise_prob2", "gray_noise_prob2", "final_sinc_prob")
_PROBABILITY_FIELDS += ("final_resize_first_prob",)
_NON_NEGATIVE_RANGE_FIELDS = ("blur_sigma", "blur_sigma2", "noise_range", "noise_range2")
_NON_NEGATIVE_RANGE_FIELDS += ("poisson_scale_range", "poisson_scale_range2")


@dataclass(frozen=True)
class DegradationConfig:
    """Every parameter of the degradation; defaults are RSD's (ResShift/Real-ESRGAN, reference §2.10).

    Field names follow the Real-ESRGAN YAML keys where one exists (``*2`` = second stage). The boolean stage
    switches (``blur1`` … ``final_jpeg``) are sr1step's: a switched-off stage is skipped, its random draws are
    still made so the other stages see the same values. The final resize to the LR size always runs.
    """

    scale: int = 4
    # USM sharpening of the GT before degrading it (Real-ESRGAN ``use_sharp``; RSD: off).
    use_sharp: bool = False
    usm_radius: int = 50
    usm_weight: float = 0.5
    usm_threshold: float = 10.0

    # Stage switches.
    blur1: bool = True
    resize1: bool = True
    noise1: bool = True
    jpeg1: bool = True
    second_order: bool = True
    blur2: bool = True
    resize2: bool = True
    noise2: bool = True
    final_sinc: bool = True
    final_jpeg: bool = True

    # First blur.
    kernel_sizes: tuple[int, ...] = tuple(range(3, 21, 2))
    kernel_list: tuple[str, ...] = KERNEL_TYPES
    kernel_prob: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob: float = 0.1
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    betag_range: tuple[float, float] = (0.5, 4.0)
    betap_range: tuple[float, float] = (1.0, 2.0)
    # First resize: probabilities of (up, down, keep), scale range (down low, up high), modes drawn uniformly.
    resize_prob: tuple[float, float, float] = (0.2, 0.7, 0.1)
    resize_range: tuple[float, float] = (0.15, 1.5)
    # First noise: Gaussian with this probability (sigma in 8-bit units), else Poisson; grey per sample.
    gaussian_noise_prob: float = 0.5
    noise_range: tuple[float, float] = (1.0, 30.0)
    poisson_scale_range: tuple[float, float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_range: tuple[float, float] = (30.0, 95.0)

    # Second order: the whole block runs with this probability.
    second_order_prob: float = 0.5
    second_blur_prob: float = 0.8
    kernel_sizes2: tuple[int, ...] = tuple(range(3, 15, 2))
    kernel_list2: tuple[str, ...] = KERNEL_TYPES
    kernel_prob2: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob2: float = 0.1
    blur_sigma2: tuple[float, float] = (0.2, 1.5)
    betag_range2: tuple[float, float] = (0.5, 4.0)
    betap_range2: tuple[float, float] = (1.0, 2.0)
    # Second resize scales are relative to the final LR size.
    resize_prob2: tuple[float, float, float] = (0.3, 0.4, 0.3)
    resize_range2: tuple[float, float] = (0.3, 1.2)
    gaussian_noise_prob2: float = 0.5
    noise_range2: tuple[float, float] = (1.0, 25.0)
    poisson_scale_range2: tuple[float, float] = (0.05, 2.5)
    gray_noise_prob2: float = 0.4

    # Final stage.
    final_sinc_prob: float = 0.8
    final_sinc_sizes: tuple[int, ...] = tuple(range(3, 15, 2))
    jpeg_range2: tuple[float, float] = (30.0, 95.0)
    # Probability of [resize → sinc → JPEG]; otherwise [JPEG → resize → sinc].
    final_resize_first_prob: float = 0.5
    # Resize modes, drawn uniformly for each of the three resizes.
    resize_modes: tuple[str, ...] = RESIZE_MODES

    # Training-pair pool capacity in per-rank batches (RSD: 10 × batch).
    pool_batches: int = 10

    def __post_init__(self) -> None:
        # TOML/YAML give lists; store tuples so the config stays hashable and comparable.
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, list):
                object.__setattr__(self, item.name, tuple(value))
        try:
            self._validate()
        except TypeError as error:  # e.g. a string where a number belongs, from a hand-written config file
            raise ConfigError(f"degradation config has a value of the wrong type: {error}") from error

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DegradationConfig:
        known = {item.name for item in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown degradation config keys: {', '.join(unknown)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {item.name: getattr(self, item.name) for item in fields(self)}

    def _validate(self) -> None:
        if not isinstance(self.scale, int) or self.scale < 1:
            raise ConfigError(f"degradation scale must be a positive integer, got {self.scale!r}")
        if self.usm_radius < 1 or self.usm_weight < 0 or self.usm_threshold < 0:
            raise ConfigError("degradation usm_radius must be >= 1 and usm_weight, usm_threshold >= 0")
        for name in _PROBABILITY_FIELDS:
            _check_probability(name, getattr(self, name))
        for sizes_name in ("kernel_sizes", "kernel_sizes2", "final_sinc_sizes"):
            sizes = getattr(self, sizes_name)
            if not sizes or any(not isinstance(s, int) or s < 1 or s % 2 == 0 for s in sizes):
                raise ConfigError(
                    f"degradation {sizes_name} must be a non-empty list of odd sizes, got {sizes!r}"
                )
        for list_name, prob_name in (("kernel_list", "kernel_prob"), ("kernel_list2", "kernel_prob2")):
            kinds = getattr(self, list_name)
            unknown = [k for k in kinds if k not in KERNEL_TYPES]
            if not kinds or unknown:
                raise ConfigError(
                    f"degradation {list_name} has unknown kernel types {unknown}; known: {', '.join(KERNEL_TYPES)}"
                )
            _check_distribution(prob_name, getattr(self, prob_name), len(kinds))
        _check_distribution("resize_prob", self.resize_prob, 3)
        _check_distribution("resize_prob2", self.resize_prob2, 3)
        for name in _NON_NEGATIVE_RANGE_FIELDS:
            _check_range(name, getattr(self, name), low=0.0)
        for name in ("betag_range", "betag_range2", "betap_range", "betap_range2"):
            _check_range(name, getattr(self, name), low=1e-6)
            # beta is drawn from [low, 1] or [1, high] with equal probability.
            if not getattr(self, name)[0] <= 1.0 <= getattr(self, name)[1]:
                raise ConfigError(f"degradation {name} must contain 1, got {getattr(self, name)!r}")
        for name in ("resize_range", "resize_range2"):
            _check_range(name, getattr(self, name), low=1e-6)
            if not getattr(self, name)[0] <= 1.0 <= getattr(self, name)[1]:
                raise ConfigError(f"degradation {name} must contain 1 (down from low, up to high)")
        for name in ("jpeg_range", "jpeg_range2"):
            _check_range(name, getattr(self, name), low=1.0, high=100.0)
        unknown_modes = [m for m in self.resize_modes if m not in RESIZE_MODES]
        if not self.resize_modes or unknown_modes:
            raise ConfigError(
                f"degradation resize_modes has unknown modes {unknown_modes}; known: {', '.join(RESIZE_MODES)}"
            )
        if not isinstance(self.pool_batches, int) or self.pool_batches < 0:
            raise ConfigError(f"degradation pool_batches must be an integer >= 0, got {self.pool_batches!r}")


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"degradation {name} must be a probability in [0, 1], got {value!r}")


def _check_distribution(name: str, probs: Sequence[float], length: int) -> None:
    if len(probs) != length or any(p < 0 for p in probs) or abs(sum(probs) - 1.0) > 1e-6:
        raise ConfigError(
            f"degradation {name} must be {length} non-negative probabilities summing to 1, got {probs!r}"
        )


def _check_range(name: str, bounds: Sequence[float], low: float, high: float = math.inf) -> None:
    if len(bounds) != 2 or not low <= bounds[0] <= bounds[1] <= high:
        raise ConfigError(
            f"degradation {name} must be [low, high] with {low} <= low <= high <= {high}, got {bounds!r}"
        )


# ---------------------------------------------------------------------------------------------- kernels


def _kernel_grid(pad_to: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Column (x) and row (y) offsets from the centre of a pad_to × pad_to grid."""
    axis = torch.arange(pad_to, device=device, dtype=torch.float32) - (pad_to // 2)
    ys, xs = torch.meshgrid(axis, axis, indexing="ij")
    return xs, ys


def _support_mask(sizes: Tensor, pad_to: int) -> Tensor:
    """(B, P, P) mask of each sample's size × size window, centred: a k-kernel zero-padded to P."""
    xs, ys = _kernel_grid(pad_to, sizes.device)
    half = (sizes // 2).view(-1, 1, 1).to(torch.float32)
    return (xs.abs() <= half) & (ys.abs() <= half)


def _normalised(kernels: Tensor, mask: Tensor) -> Tensor:
    kernels = torch.where(mask, kernels, torch.zeros_like(kernels))
    return kernels / kernels.sum(dim=(-2, -1), keepdim=True)


def _quadratic_form(sigma_x: Tensor, sigma_y: Tensor, theta: Tensor, pad_to: int) -> Tensor:
    """(B, P, P) values of [x y] Σ⁻¹ [x y]ᵀ with Σ = R(θ) diag(σx², σy²) R(θ)ᵀ."""
    xs, ys = _kernel_grid(pad_to, sigma_x.device)
    cos, sin = torch.cos(theta).view(-1, 1, 1), torch.sin(theta).view(-1, 1, 1)
    inv_x, inv_y = (1.0 / sigma_x**2).view(-1, 1, 1), (1.0 / sigma_y**2).view(-1, 1, 1)
    a = cos**2 * inv_x + sin**2 * inv_y
    b = cos * sin * (inv_x - inv_y)
    c = sin**2 * inv_x + cos**2 * inv_y
    return a * xs**2 + 2 * b * xs * ys + c * ys**2


def _sizes_tensor(sizes: Tensor | int, batch: int, device: torch.device) -> Tensor:
    if isinstance(sizes, int):
        return torch.full((batch,), sizes, dtype=torch.long, device=device)
    return sizes.to(device=device, dtype=torch.long)


def gaussian_kernels(
    sizes: Tensor | int, sigma_x: Tensor, sigma_y: Tensor, theta: Tensor, pad_to: int | None = None
) -> Tensor:
    """Bivariate Gaussian kernels exp(-q/2), (B, P, P), each summing to 1 over its size × size support."""
    sizes = _sizes_tensor(sizes, sigma_x.shape[0], sigma_x.device)
    pad_to = pad_to or int(sizes.max())
    quad = _quadratic_form(sigma_x, sigma_y, theta, pad_to)
    return _normalised(torch.exp(-0.5 * quad), _support_mask(sizes, pad_to))


def generalized_gaussian_kernels(
    sizes: Tensor | int,
    sigma_x: Tensor,
    sigma_y: Tensor,
    theta: Tensor,
    beta: Tensor,
    pad_to: int | None = None,
) -> Tensor:
    """Generalized Gaussian kernels exp(-q^β/2), (B, P, P), normalised; β = 1 is the Gaussian."""
    sizes = _sizes_tensor(sizes, sigma_x.shape[0], sigma_x.device)
    pad_to = pad_to or int(sizes.max())
    quad = _quadratic_form(sigma_x, sigma_y, theta, pad_to)
    return _normalised(torch.exp(-0.5 * quad.pow(beta.view(-1, 1, 1))), _support_mask(sizes, pad_to))


def plateau_kernels(
    sizes: Tensor | int,
    sigma_x: Tensor,
    sigma_y: Tensor,
    theta: Tensor,
    beta: Tensor,
    pad_to: int | None = None,
) -> Tensor:
    """Plateau-shaped kernels 1/(q^β + 1), (B, P, P), normalised."""
    sizes = _sizes_tensor(sizes, sigma_x.shape[0], sigma_x.device)
    pad_to = pad_to or int(sizes.max())
    quad = _quadratic_form(sigma_x, sigma_y, theta, pad_to)
    return _normalised(1.0 / (quad.pow(beta.view(-1, 1, 1)) + 1.0), _support_mask(sizes, pad_to))


def sinc_kernels(sizes: Tensor | int, cutoff: Tensor, pad_to: int | None = None) -> Tensor:
    """2-D circular low-pass (jinc) kernels ω·J1(ω r)/(2π r), (B, P, P), truncated to size × size, normalised.

    ``cutoff`` ω is in radians per sample: frequencies with radius below ω pass, above are removed (up to the
    ripple of the truncation). The centre value is the limit ω²/(4π).
    """
    sizes = _sizes_tensor(sizes, cutoff.shape[0], cutoff.device)
    pad_to = pad_to or int(sizes.max())
    xs, ys = _kernel_grid(pad_to, cutoff.device)
    radius = torch.sqrt(xs**2 + ys**2)
    omega = cutoff.to(torch.float32).view(-1, 1, 1)
    safe_radius = torch.where(radius > 0, radius, torch.ones_like(radius))
    values = omega * torch.special.bessel_j1(omega * safe_radius) / (2 * math.pi * safe_radius)
    values = torch.where(radius > 0, values, omega**2 / (4 * math.pi))
    return _normalised(values, _support_mask(sizes, pad_to))


def identity_kernels(batch: int, pad_to: int, device: torch.device | str = "cpu") -> Tensor:
    kernels = torch.zeros(batch, pad_to, pad_to, device=device)
    kernels[:, pad_to // 2, pad_to // 2] = 1.0
    return kernels


def _categorical(uniform: Tensor, probs: Sequence[float]) -> Tensor:
    """Indices drawn with the given probabilities from U[0, 1) samples (inverse CDF)."""
    cdf = torch.tensor(probs, dtype=torch.float64, device=uniform.device).cumsum(0)
    index = torch.searchsorted(cdf, uniform.to(torch.float64).contiguous(), right=True)
    return index.clamp(max=len(probs) - 1)


def _pick(uniform: Tensor, choices: Sequence[int]) -> Tensor:
    """Uniform choice among ``choices`` from U[0, 1) samples."""
    index = (uniform * len(choices)).long().clamp(max=len(choices) - 1)
    return torch.tensor(list(choices), device=uniform.device)[index]


def _between(uniform: Tensor, low: Tensor | float, high: Tensor | float) -> Tensor:
    return low + uniform * (high - low)


def _stage(config: DegradationConfig, name: str, stage: int) -> Any:
    """A per-stage setting: the first stage's field is ``name``, the second stage's ``name2``."""
    return getattr(config, name if stage == 1 else f"{name}2")


def random_blur_kernels(
    batch: int, config: DegradationConfig, stage: int, generator: torch.Generator
) -> Tensor:
    """One random blur kernel per sample for ``stage`` (1 or 2): (B, P, P), P = max size, on the generator's device.

    Per sample: a size from ``kernel_sizes``; with ``sinc_prob`` a sinc kernel (cutoff U[π/3, π] below size 13,
    U[π/5, π] from 13), else a type from ``kernel_list`` with ``kernel_prob``: σx, σy ~ U(blur_sigma) (σy = σx and
    θ = 0 when isotropic), θ ~ U[-π, π], β from U[low, 1] or U[1, high] with equal odds. Always 9 uniforms a sample.
    """
    device = generator.device
    draws = torch.rand(batch, 9, generator=generator, device=device)
    sizes_list = _stage(config, "kernel_sizes", stage)
    pad_to = max(sizes_list)
    sizes = _pick(draws[:, 1], sizes_list)
    kinds = _stage(config, "kernel_list", stage)
    kind = _categorical(draws[:, 0], _stage(config, "kernel_prob", stage))
    # Candidate order below: generalized (0), plateau (1), Gaussian (2).
    family_of_kind = [
        0 if k.startswith("generalized") else 1 if k.startswith("plateau") else 2 for k in kinds
    ]
    isotropic_kind = [k.endswith("iso") and not k.endswith("aniso") for k in kinds]
    family = torch.tensor(family_of_kind, device=device)[kind]
    isotropic = torch.tensor(isotropic_kind, device=device)[kind]
    sigma_range = _stage(config, "blur_sigma", stage)
    sigma_x = _between(draws[:, 3], *sigma_range)
    sigma_y = torch.where(isotropic, sigma_x, _between(draws[:, 4], *sigma_range))
    theta = torch.where(isotropic, torch.zeros_like(sigma_x), _between(draws[:, 5], *ROTATION_RANGE))
    betas = []
    for name in ("betag_range", "betap_range"):
        low, high = _stage(config, name, stage)
        betas.append(
            torch.where(draws[:, 6] < 0.5, _between(draws[:, 7], low, 1.0), _between(draws[:, 7], 1.0, high))
        )
    candidates = torch.stack(
        [
            generalized_gaussian_kernels(sizes, sigma_x, sigma_y, theta, betas[0], pad_to),
            plateau_kernels(sizes, sigma_x, sigma_y, theta, betas[1], pad_to),
            gaussian_kernels(sizes, sigma_x, sigma_y, theta, pad_to),
        ]
    )
    kernels = candidates[family, torch.arange(batch, device=device)]
    cutoff_low = torch.where(sizes >= SINC_LARGE_KERNEL_FROM, SINC_CUTOFF_LARGE[0], SINC_CUTOFF_SMALL[0])
    sinc = sinc_kernels(sizes, _between(draws[:, 8], cutoff_low, math.pi), pad_to)
    use_sinc = (draws[:, 2] < _stage(config, "sinc_prob", stage)).view(-1, 1, 1)
    return torch.where(use_sinc, sinc, kernels)


def random_final_sinc_kernels(batch: int, config: DegradationConfig, generator: torch.Generator) -> Tensor:
    """Final-stage kernels: with ``final_sinc_prob`` a sinc (size from ``final_sinc_sizes``, ω ~ U[π/3, π]), else
    the identity. (B, P, P) on the generator's device."""
    device = generator.device
    draws = torch.rand(batch, 3, generator=generator, device=device)
    pad_to = max(config.final_sinc_sizes)
    sinc = sinc_kernels(
        _pick(draws[:, 1], config.final_sinc_sizes), _between(draws[:, 2], *SINC_CUTOFF_SMALL), pad_to
    )
    use_sinc = (draws[:, 0] < config.final_sinc_prob).view(-1, 1, 1)
    return torch.where(use_sinc, sinc, identity_kernels(batch, pad_to, device))


# -------------------------------------------------------------------------------------------- filtering


def _reflect_index(length: int, before: int, after: int, device: torch.device) -> Tensor:
    """Source indices for reflect-101 padding of any width (the reflection repeats when the pad is wider)."""
    index = torch.arange(-before, length + after, device=device)
    if length == 1:
        return torch.zeros_like(index)
    period = 2 * (length - 1)
    index = index.remainder(period)
    return torch.where(index >= length, period - index, index)


def reflect_pad(images: Tensor, pad: int) -> Tensor:
    """Reflect-pad the last two dims by ``pad``; equals F.pad(mode="reflect") when pad < size, also works beyond."""
    if pad == 0:
        return images
    rows = _reflect_index(images.shape[-2], pad, pad, images.device)
    cols = _reflect_index(images.shape[-1], pad, pad, images.device)
    return images.index_select(-2, rows).index_select(-1, cols)


def filter2d(images: Tensor, kernels: Tensor) -> Tensor:
    """Filter (B, C, H, W) with one odd kernel per sample (B, k, k) or one shared (k, k); reflect padding."""
    batch, channels, height, width = images.shape
    if kernels.dim() == 2:
        kernels = kernels.expand(batch, -1, -1)
    size = kernels.shape[-1]
    padded = reflect_pad(images, size // 2)
    weight = kernels.to(images.dtype).repeat_interleave(channels, dim=0).unsqueeze(1)
    out = F.conv2d(padded.reshape(1, batch * channels, *padded.shape[-2:]), weight, groups=batch * channels)
    return out.view(batch, channels, height, width)


def usm_sharpen(images: Tensor, radius: int = 50, weight: float = 0.5, threshold: float = 10.0) -> Tensor:
    """Unsharp masking as Real-ESRGAN's USMSharp: sharpen where the detail exceeds ``threshold`` 8-bit levels.

    The blur is a Gaussian of odd size (radius rounded up to odd) with OpenCV's default σ for that size; the
    sharpened image is blended in through a blurred mask so the edges of the mask stay soft. (B, C, H, W) in [0, 1].
    """
    size = radius + 1 if radius % 2 == 0 else radius
    sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8
    axis = torch.arange(size, device=images.device, dtype=torch.float32) - size // 2
    line = torch.exp(-(axis**2) / (2 * sigma**2))
    kernel = torch.outer(line, line)
    kernel = kernel / kernel.sum()
    blurred = filter2d(images, kernel)
    residual = images - blurred
    mask = (residual.abs() * 255 > threshold).to(images.dtype)
    soft_mask = filter2d(mask, kernel)
    sharp = (images + weight * residual).clamp(0, 1)
    return soft_mask * sharp + (1 - soft_mask) * images


# ------------------------------------------------------------------------------------------------ noise


def _to_gray(images: Tensor) -> Tensor:
    weights = torch.tensor(GRAY_WEIGHTS, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)


def gaussian_noise(images: Tensor, sigma: Tensor, gray: Tensor, generator: torch.Generator) -> Tensor:
    """Gaussian noise for (B, C, H, W): std ``sigma`` (B,) in [0, 1] units; grey samples share one channel."""
    batch, channels, height, width = images.shape
    sigma = sigma.to(images.device, images.dtype).view(-1, 1, 1, 1)
    color = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype) * sigma
    mono = torch.randn(
        (batch, 1, height, width), generator=generator, device=images.device, dtype=images.dtype
    )
    return torch.where(gray.to(images.device).view(-1, 1, 1, 1), (mono * sigma).expand_as(color), color)


def _poisson_delta(levels: Tensor, generator: torch.Generator) -> Tensor:
    """Poisson(λ = x·v)/v − x on 8-bit-quantised x, with v the distinct-level count rounded up to a power of 2."""
    batch = levels.shape[0]
    codes = (levels * 255).round().clamp(0, 255).to(torch.long).view(batch, -1)
    present = torch.zeros(batch, 256, device=levels.device).scatter_(1, codes, 1.0)
    distinct = present.sum(dim=1)
    vals = torch.exp2(torch.ceil(torch.log2(distinct))).view(-1, 1, 1, 1).to(levels.dtype)
    return torch.poisson(levels * vals, generator=generator) / vals - levels


def poisson_noise(images: Tensor, scale: Tensor, gray: Tensor, generator: torch.Generator) -> Tensor:
    """Poisson (shot) noise for (B, 3, H, W) in [0, 1], times ``scale`` (B,), as Real-ESRGAN.

    The image is quantised to 8 bits and its distinct levels counted (v); the noise is Poisson(x·v)/v − x, so its
    variance is scale²·x/v. Grey samples take the noise of the luma, shared by the three channels.
    """
    quantised = (images * 255).round().clamp(0, 255) / 255
    color = _poisson_delta(quantised, generator)
    luma = (_to_gray(images) * 255).round().clamp(0, 255) / 255
    mono = _poisson_delta(luma, generator).expand_as(color)
    noise = torch.where(gray.to(images.device).view(-1, 1, 1, 1), mono, color)
    return noise * scale.to(images.device, images.dtype).view(-1, 1, 1, 1)


# ------------------------------------------------------------------------------------------------- JPEG


def _dct_matrix(device: torch.device) -> Tensor:
    """Orthonormal 8-point DCT-II matrix D[u, x]; the JPEG 2-D FDCT of a block B is D B Dᵀ."""
    u = torch.arange(8, device=device, dtype=torch.float32).view(-1, 1)
    x = torch.arange(8, device=device, dtype=torch.float32).view(1, -1)
    matrix = torch.cos((2 * x + 1) * u * math.pi / 16) * math.sqrt(2 / 8)
    matrix[0] = matrix[0] / math.sqrt(2)
    return matrix


def jpeg_quant_tables(quality: Tensor) -> tuple[Tensor, Tensor]:
    """libjpeg's quality scaling of the Annex K tables: (B, 8, 8) luma and chroma, integers in [1, 255]."""
    quality = quality.to(torch.float32).clamp(1, 100).view(-1, 1, 1)
    percent = torch.where(quality < 50, torch.floor(5000 / quality), 200 - 2 * quality)
    tables = []
    for base in (JPEG_LUMA_TABLE, JPEG_CHROMA_TABLE):
        base_t = torch.tensor(base, dtype=torch.float32, device=quality.device)
        tables.append(torch.floor((base_t * percent + 50) / 100).clamp(1, 255))
    return tables[0], tables[1]


def _quantise_blocks(plane: Tensor, table: Tensor) -> Tensor:
    """DCT → quantise → round → dequantise → IDCT of a level-shifted (B, 1, H, W) plane; H, W multiples of 8."""
    batch, _, height, width = plane.shape
    dct = _dct_matrix(plane.device)
    blocks = plane.view(batch, height // 8, 8, width // 8, 8).permute(0, 1, 3, 2, 4)
    coefficients = dct @ blocks @ dct.T
    table = table.view(batch, 1, 1, 8, 8)
    restored = dct.T @ (torch.round(coefficients / table) * table) @ dct
    return restored.permute(0, 1, 3, 2, 4).reshape(batch, 1, height, width)


def jpeg_compress(images: Tensor, quality: Tensor | float) -> Tensor:
    """JPEG encode + decode of (B, 3, H, W) in [0, 1] at ``quality`` (scalar or per sample (B,), 1–100).

    Mirrors a baseline libjpeg round trip in float with the 8-bit roundings of the real codec: RGB→YCbCr (JFIF),
    4:2:0 chroma averaging, level shift, 8×8 DCT, quantisation with quality-scaled tables, IDCT, clamp, "fancy"
    (triangular) chroma upsampling, YCbCr→RGB. Edges are replicated to whole 16×16 MCUs as libjpeg does. The
    output holds 8-bit levels.
    """
    batch, _, height, width = images.shape
    quality_t = torch.as_tensor(quality, dtype=torch.float32, device=images.device).expand(batch)
    luma_table, chroma_table = jpeg_quant_tables(quality_t)
    rgb = (images.to(torch.float32).clamp(0, 1) * 255).round()
    pad_h, pad_w = (-height) % 16, (-width) % 16
    if pad_h or pad_w:
        rgb = F.pad(rgb, (0, pad_w, 0, pad_h), mode="replicate")
    red, green, blue = rgb[:, 0:1], rgb[:, 1:2], rgb[:, 2:3]
    luma = (0.299 * red + 0.587 * green + 0.114 * blue).round()
    cb = (-0.168736 * red - 0.331264 * green + 0.5 * blue + 128).round().clamp(0, 255)
    cr = (0.5 * red - 0.418688 * green - 0.081312 * blue + 128).round().clamp(0, 255)
    chroma = F.avg_pool2d(torch.cat([cb, cr], dim=1), 2).round()

    luma = (_quantise_blocks(luma - 128, luma_table) + 128).round().clamp(0, 255)
    chroma_planes = [
        (_quantise_blocks(chroma[:, i : i + 1] - 128, chroma_table) + 128).round().clamp(0, 255)
        for i in range(2)
    ]
    # libjpeg's default h2v2 "fancy" upsampling is the 3/4–1/4 triangle filter = bilinear ×2, half-pixel centres,
    # with edges replicated at the image's own chroma size (not the MCU-padded one).
    chroma = torch.cat(chroma_planes, dim=1)[:, :, : (height + 1) // 2, : (width + 1) // 2]
    chroma = F.interpolate(chroma, scale_factor=2, mode="bilinear", align_corners=False)
    chroma = chroma[:, :, :height, :width].round() - 128
    cb, cr = chroma[:, 0:1], chroma[:, 1:2]
    luma = luma[:, :, :height, :width]
    rgb = torch.cat([luma + 1.402 * cr, luma - 0.344136 * cb - 0.714136 * cr, luma + 1.772 * cb], dim=1)
    rgb = rgb.round().clamp(0, 255)
    return (rgb / 255).to(images.dtype)


# ------------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class ResizeDraw:
    direction: str  # "up", "down" or "keep"
    scale: float
    mode: str


@dataclass(frozen=True)
class NoiseDraw:
    gaussian: bool  # per batch: Gaussian, else Poisson
    sigma: Tensor  # (B,) Gaussian std in [0, 1] units
    poisson_scale: Tensor  # (B,)
    gray: Tensor  # (B,) bool
    seed: int  # seeds the generator of this stage's noise tensors


@dataclass(frozen=True)
class DegradationPlan:
    """Every random choice for one batch; per-sample tensors live on the generator's device."""

    kernel1: Tensor  # (B, P1, P1)
    resize1: ResizeDraw
    noise1: NoiseDraw
    jpeg_quality1: Tensor  # (B,)
    second_order: bool
    blur2: bool
    kernel2: Tensor  # (B, P2, P2)
    resize2: ResizeDraw
    noise2: NoiseDraw
    final_resize_first: bool
    final_mode: str
    sinc_kernel: Tensor  # (B, P3, P3), identity where the sample gets no final sinc
    jpeg_quality2: Tensor  # (B,)


def _draw_resize(uniforms: Sequence[float], config: DegradationConfig, stage: int) -> ResizeDraw:
    pick, amount, mode_pick = uniforms
    index = int(_categorical(torch.tensor([pick]), _stage(config, "resize_prob", stage)))
    direction = RESIZE_DIRECTIONS[index]
    low, high = _stage(config, "resize_range", stage)
    scale = {"up": 1.0 + amount * (high - 1.0), "down": low + amount * (1.0 - low), "keep": 1.0}[direction]
    return ResizeDraw(direction, scale, _draw_mode(mode_pick, config))


def _draw_mode(uniform: float, config: DegradationConfig) -> str:
    modes = config.resize_modes
    return modes[min(int(uniform * len(modes)), len(modes) - 1)]


def _draw_noise(
    gaussian_uniform: float, batch: int, config: DegradationConfig, stage: int, generator: torch.Generator
) -> NoiseDraw:
    draws = torch.rand(batch, 3, generator=generator, device=generator.device)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    return NoiseDraw(
        gaussian=gaussian_uniform < _stage(config, "gaussian_noise_prob", stage),
        sigma=_between(draws[:, 0], *_stage(config, "noise_range", stage)) / 255.0,
        poisson_scale=_between(draws[:, 1], *_stage(config, "poisson_scale_range", stage)),
        gray=draws[:, 2] < _stage(config, "gray_noise_prob", stage),
        seed=seed,
    )


def _draw_quality(batch: int, config: DegradationConfig, stage: int, generator: torch.Generator) -> Tensor:
    uniform = torch.rand(batch, generator=generator, device=generator.device)
    return _between(uniform, *_stage(config, "jpeg_range", stage))


def sample_plan(batch: int, config: DegradationConfig, generator: torch.Generator) -> DegradationPlan:
    """Draw every random choice for a batch, in a fixed order that does not depend on the stage switches."""
    # Per-batch choices: resize1 (3), noise1 type, second-order gate, second-blur gate, resize2 (3), noise2 type,
    # final order, final mode. One host transfer for all of them.
    per_batch = torch.rand(12, generator=generator, device=generator.device, dtype=torch.float64).tolist()
    return DegradationPlan(
        kernel1=random_blur_kernels(batch, config, 1, generator),
        resize1=_draw_resize(per_batch[0:3], config, 1),
        noise1=_draw_noise(per_batch[3], batch, config, 1, generator),
        jpeg_quality1=_draw_quality(batch, config, 1, generator),
        second_order=per_batch[4] < config.second_order_prob,
        blur2=per_batch[5] < config.second_blur_prob,
        kernel2=random_blur_kernels(batch, config, 2, generator),
        resize2=_draw_resize(per_batch[6:9], config, 2),
        noise2=_draw_noise(per_batch[9], batch, config, 2, generator),
        final_resize_first=per_batch[10] < config.final_resize_first_prob,
        final_mode=_draw_mode(per_batch[11], config),
        sinc_kernel=random_final_sinc_kernels(batch, config, generator),
        jpeg_quality2=_draw_quality(batch, config, 2, generator),
    )


# ------------------------------------------------------------------------------------------------ apply


def _resize(images: Tensor, size: tuple[int, int], mode: str, scale_factor: float | None = None) -> Tensor:
    if size[0] < 1 or size[1] < 1:
        raise ConfigError(
            f"degradation resize of a {images.shape[-2]}×{images.shape[-1]} image gives {size[0]}×{size[1]}; "
            "use larger GT crops"
        )
    if scale_factor is not None:
        # As Real-ESRGAN: resize by factor (the sampling grid uses the factor, not the rounded size ratio).
        return F.interpolate(images, scale_factor=scale_factor, mode=mode)
    return F.interpolate(images, size=size, mode=mode)


def _add_noise(images: Tensor, draw: NoiseDraw) -> Tensor:
    generator = torch.Generator(device=images.device).manual_seed(draw.seed)
    if draw.gaussian:
        noise = gaussian_noise(images, draw.sigma, draw.gray, generator)
    else:
        noise = poisson_noise(images, draw.poisson_scale, draw.gray, generator)
    return (images + noise).clamp(0, 1)


def _check_gt(gt: Tensor, config: DegradationConfig) -> None:
    if gt.dim() != 4 or gt.shape[1] != 3:
        raise ConfigError(f"degradation input must be (B, 3, H, W), got shape {tuple(gt.shape)}")
    if gt.shape[-2] % config.scale or gt.shape[-1] % config.scale:
        raise ConfigError(
            f"degradation GT size {gt.shape[-2]}×{gt.shape[-1]} is not divisible by the scale {config.scale}"
        )


def apply_plan(gt: Tensor, plan: DegradationPlan, config: DegradationConfig) -> tuple[Tensor, Tensor]:
    """Degrade ``gt`` (B, 3, H, W) in [0, 1] with the choices in ``plan``; returns (LQ, GT) as :func:`degrade`."""
    _check_gt(gt, config)
    if plan.kernel1.shape[0] != gt.shape[0]:
        raise ConfigError(
            f"degradation plan is for {plan.kernel1.shape[0]} images, got a batch of {gt.shape[0]}"
        )
    gt = gt.to(torch.float32)
    device = gt.device
    height, width = gt.shape[-2:]
    if config.use_sharp:
        gt = usm_sharpen(gt, config.usm_radius, config.usm_weight, config.usm_threshold)
    out = gt

    if config.blur1:
        out = filter2d(out, plan.kernel1.to(device))
    if config.resize1 and plan.resize1.direction != "keep":
        size = (math.floor(height * plan.resize1.scale), math.floor(width * plan.resize1.scale))
        out = _resize(out, size, plan.resize1.mode, scale_factor=plan.resize1.scale)
    if config.noise1:
        out = _add_noise(out, plan.noise1)
    if config.jpeg1:
        out = jpeg_compress(out.clamp(0, 1), plan.jpeg_quality1.to(device))

    if config.second_order and plan.second_order:
        if config.blur2 and plan.blur2:
            out = filter2d(out, plan.kernel2.to(device))
        if config.resize2:
            # Relative to the final LR size; "keep" still resizes, to exactly that size.
            size = (
                int(height / config.scale * plan.resize2.scale),
                int(width / config.scale * plan.resize2.scale),
            )
            out = _resize(out, size, plan.resize2.mode)
        if config.noise2:
            out = _add_noise(out, plan.noise2)

    lr_size = (height // config.scale, width // config.scale)
    if plan.final_resize_first:
        out = _resize(out, lr_size, plan.final_mode)
        if config.final_sinc:
            out = filter2d(out, plan.sinc_kernel.to(device))
        if config.final_jpeg:
            out = jpeg_compress(out.clamp(0, 1), plan.jpeg_quality2.to(device))
    else:
        if config.final_jpeg:
            out = jpeg_compress(out.clamp(0, 1), plan.jpeg_quality2.to(device))
        out = _resize(out, lr_size, plan.final_mode)
        if config.final_sinc:
            out = filter2d(out, plan.sinc_kernel.to(device))
    lq = (out * 255).round().clamp(0, 255) / 255
    return lq, gt


def degrade(
    gt: Tensor, config: DegradationConfig | None = None, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Real-ESRGAN second-order degradation of a GT batch.

    gt: (B, 3, H, W) in [0, 1], H and W divisible by ``config.scale``. Returns (lq, gt_processed): lq is
    (B, 3, H/scale, W/scale) float32 in [0, 1] on 8-bit levels; gt_processed is the GT the LQ was made from
    (USM-sharpened when ``use_sharp``, else ``gt`` as float32). A generator on the images' device avoids
    host-device copies of the per-sample draws; a CPU generator works everywhere.
    """
    config = config or DegradationConfig()
    if generator is None:
        generator = torch.Generator(device=gt.device)
        generator.seed()
    _check_gt(gt, config)
    plan = sample_plan(gt.shape[0], config, generator)
    return apply_plan(gt, plan, config)


# ------------------------------------------------------------------------------------------------- pool


class TrainingPairPool:
    """Real-ESRGAN's training-pair queue: mixes degradations drawn for different batches.

    While it fills, each batch is stored and returned unchanged. Once full, each call returns ``b`` stored pairs
    picked uniformly at random and stores the incoming batch in their slots (the same distribution as Real-ESRGAN's
    shuffle-then-take-the-first-b). A CPU generator seeded here drives the picks; :meth:`state_dict` holds the
    stored pairs, the fill level and the generator state, so a resumed run continues identically.
    """

    def __init__(self, capacity: int, seed: int = 0) -> None:
        if capacity < 0:
            raise ConfigError(f"training-pair pool capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self._generator = torch.Generator().manual_seed(seed)
        self._lq: Tensor | None = None
        self._gt: Tensor | None = None
        self._filled = 0

    def __len__(self) -> int:
        return self._filled

    def exchange(self, lq: Tensor, gt: Tensor) -> tuple[Tensor, Tensor]:
        """Store the batch (lq, gt) and return a batch of the same size; a capacity of 0 passes it through."""
        batch = lq.shape[0]
        if gt.shape[0] != batch:
            raise ConfigError(f"training-pair pool got {batch} LQ images but {gt.shape[0]} GT images")
        if self.capacity == 0:
            return lq, gt
        if self.capacity % batch:
            raise ConfigError(
                f"training-pair pool capacity {self.capacity} is not a multiple of the batch {batch}"
            )
        if self._lq is None or self._gt is None:
            self._lq = lq.new_empty((self.capacity, *lq.shape[1:]))
            self._gt = gt.new_empty((self.capacity, *gt.shape[1:]))
        elif self._lq.shape[1:] != lq.shape[1:] or self._gt.shape[1:] != gt.shape[1:]:
            raise ConfigError(
                f"training-pair pool holds LQ {tuple(self._lq.shape[1:])} / GT {tuple(self._gt.shape[1:])}, "
                f"got LQ {tuple(lq.shape[1:])} / GT {tuple(gt.shape[1:])}"
            )
        if self._lq.device != lq.device:
            self._lq, self._gt = self._lq.to(lq.device), self._gt.to(gt.device)

        if self._filled < self.capacity:
            self._lq[self._filled : self._filled + batch] = lq
            self._gt[self._filled : self._filled + batch] = gt
            self._filled += batch
            return lq, gt
        slots = torch.randperm(self.capacity, generator=self._generator)[:batch].to(lq.device)
        out_lq, out_gt = self._lq[slots].clone(), self._gt[slots].clone()
        self._lq[slots] = lq
        self._gt[slots] = gt
        return out_lq, out_gt

    def state_dict(self) -> dict[str, Any]:
        stored = self._lq is not None and self._gt is not None
        return {
            "capacity": self.capacity,
            "filled": self._filled,
            "generator": self._generator.get_state(),
            "lq": self._lq[: self._filled].cpu() if stored else None,
            "gt": self._gt[: self._filled].cpu() if stored else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["capacity"] != self.capacity:
            raise ConfigError(
                f"training-pair pool state has capacity {state['capacity']}, this run uses {self.capacity}"
            )
        self._generator.set_state(state["generator"])
        self._filled = int(state["filled"])
        if state["lq"] is None:
            self._lq = self._gt = None
            return
        lq, gt = state["lq"], state["gt"]
        self._lq = lq.new_empty((self.capacity, *lq.shape[1:]))
        self._gt = gt.new_empty((self.capacity, *gt.shape[1:]))
        self._lq[: self._filled] = lq
        self._gt[: self._filled] = gt
