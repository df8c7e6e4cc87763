"""ResShift's residual-shifting diffusion: the η schedule, forward process, posterior, samplers and loss.

All in latent space: z_0 = Enc(HR), z_y = Enc(bicubic_up(LR)). With 0-based step indices t = 0 … T−1:

    q-sample   z_t = z_0 + η_t (z_y − z_0) + κ sqrt(η_t) ε
    prior      z_T = z_y + κ sqrt(η_{T−1}) ε
    posterior  mean = (η_{t−1}/η_t) z_t + (α_t/η_t) ẑ_0,   var = κ² (η_{t−1}/η_t) α_t
    net input  z_t / sqrt(κ² η_t + 1)          (``normalize_input`` with a latent)

Every model predicts x_0 (``predict_type: xstart``). Per-step coefficients are computed in float64 and cast to
float32 when applied, as the official code does; the golden fixtures are reproduced to < 1e-4.

A *denoiser* is any callable ``(x_in, t) -> ẑ_0`` where ``x_in`` is the scaled latent and ``t`` a (B,) long tensor;
the LR conditioning and the student noise are bound by the caller (see :func:`unet_denoiser`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from sr1step.errors import ConfigError

Denoiser = Callable[[Tensor, Tensor], Tensor]
StepCallback = Callable[[dict], None]


@dataclass(frozen=True)
class ResShiftSchedule:
    """The exponential η schedule of ResShift (frozen; derived float64 arrays are attributes)."""

    steps: int = 15
    min_noise_level: float = 0.04
    kappa: float = 2.0
    etas_end: float = 0.99
    power: float = 0.3
    # derived, float64, shape (steps,)
    sqrt_etas: np.ndarray = field(init=False, repr=False, compare=False)
    etas: np.ndarray = field(init=False, repr=False, compare=False)
    etas_prev: np.ndarray = field(init=False, repr=False, compare=False)
    alpha: np.ndarray = field(init=False, repr=False, compare=False)
    posterior_variance: np.ndarray = field(init=False, repr=False, compare=False)
    posterior_log_variance_clipped: np.ndarray = field(init=False, repr=False, compare=False)
    posterior_mean_coef1: np.ndarray = field(init=False, repr=False, compare=False)
    posterior_mean_coef2: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.steps < 2:
            raise ConfigError(f"the ResShift schedule needs at least 2 steps, got {self.steps}")
        if not 0 < self.min_noise_level < self.etas_end:
            raise ConfigError(
                f"min_noise_level {self.min_noise_level} must lie in (0, etas_end={self.etas_end})"
            )
        start = min(self.min_noise_level / self.kappa, self.min_noise_level)
        growth = math.exp(math.log(self.etas_end / start) / (self.steps - 1))
        exponents = np.power(np.linspace(0, 1, self.steps, endpoint=True), self.power) * (self.steps - 1)
        sqrt_etas = start * np.power(growth, exponents)
        etas = sqrt_etas**2
        etas_prev = np.append(0.0, etas[:-1])
        alpha = etas - etas_prev
        variance = self.kappa**2 * etas_prev / etas * alpha
        log_variance = np.log(np.append(variance[1], variance[1:]))
        derived = {
            "sqrt_etas": sqrt_etas,
            "etas": etas,
            "etas_prev": etas_prev,
            "alpha": alpha,
            "posterior_variance": variance,
            "posterior_log_variance_clipped": log_variance,
            "posterior_mean_coef1": etas_prev / etas,
            "posterior_mean_coef2": alpha / etas,
        }
        for name, value in derived.items():
            value.setflags(write=False)
            object.__setattr__(self, name, value)

    @classmethod
    def preset(cls, name: str) -> ResShiftSchedule:
        """``s15`` (v1/v2, SinSR, RSD, TAD-SR) or ``s4`` (v3, bicsr, the x2 config)."""
        try:
            return cls(**SCHEDULE_PRESETS[name])
        except KeyError:
            raise ConfigError(f"unknown schedule {name!r}; known: {', '.join(SCHEDULE_PRESETS)}") from None

    def to_dict(self) -> dict:
        return {
            "steps": self.steps,
            "min_noise_level": self.min_noise_level,
            "kappa": self.kappa,
            "etas_end": self.etas_end,
            "power": self.power,
        }

    @property
    def last(self) -> int:
        return self.steps - 1


SCHEDULE_PRESETS: dict[str, dict] = {
    "s15": {"steps": 15, "min_noise_level": 0.04, "kappa": 2.0, "etas_end": 0.99, "power": 0.3},
    "s4": {"steps": 4, "min_noise_level": 0.2, "kappa": 2.0, "etas_end": 0.99, "power": 0.3},
}


def _extract(values: np.ndarray, t: Tensor, like: Tensor) -> Tensor:
    """values[t] as float32, broadcast against ``like`` (B, ...), as the official ``_extract_into_tensor``."""
    picked = torch.tensor(values, dtype=torch.float64, device=t.device)[t].float()
    return picked.view(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def _steps(t: int | Tensor, like: Tensor) -> Tensor:
    if isinstance(t, int):
        return torch.full((like.shape[0],), t, dtype=torch.long, device=like.device)
    return t.to(device=like.device, dtype=torch.long)


def q_sample(schedule: ResShiftSchedule, z0: Tensor, zy: Tensor, t: int | Tensor, noise: Tensor) -> Tensor:
    """z_t = z_0 + η_t (z_y − z_0) + κ sqrt(η_t) ε."""
    t = _steps(t, z0)
    return (
        z0
        + _extract(schedule.etas, t, z0) * (zy - z0)
        + _extract(schedule.kappa * schedule.sqrt_etas, t, z0) * noise
    )


def prior_sample(
    schedule: ResShiftSchedule, zy: Tensor, noise: Tensor, noise_scale: str = "kappa_sqrt_eta"
) -> Tensor:
    """z_T = z_y + κ sqrt(η_{T−1}) ε (official); ``noise_scale='kappa'`` gives z_y + κ ε (sorryhyun students)."""
    t = _steps(schedule.last, zy)
    if noise_scale == "kappa_sqrt_eta":
        scale = _extract(schedule.kappa * schedule.sqrt_etas, t, zy)
    elif noise_scale == "kappa":
        scale = torch.tensor(schedule.kappa, dtype=zy.dtype, device=zy.device)
    else:
        raise ConfigError(f"unknown prior noise scale {noise_scale!r} (use 'kappa_sqrt_eta' or 'kappa')")
    return zy + scale * noise


def scale_input(schedule: ResShiftSchedule, z_t: Tensor, t: int | Tensor) -> Tensor:
    """Network input normalisation z_t / sqrt(κ² η_t + 1) (computed in float32 as the official code)."""
    t = _steps(t, z_t)
    std = torch.sqrt(_extract(schedule.etas, t, z_t).float() * schedule.kappa**2 + 1)
    return z_t / std.to(z_t.dtype)


def posterior_mean(schedule: ResShiftSchedule, z_t: Tensor, x0: Tensor, t: int | Tensor) -> Tensor:
    t = _steps(t, z_t)
    return (
        _extract(schedule.posterior_mean_coef1, t, z_t) * z_t
        + _extract(schedule.posterior_mean_coef2, t, z_t) * x0
    )


def posterior_step(
    schedule: ResShiftSchedule, z_t: Tensor, x0: Tensor, t: int | Tensor, noise: Tensor
) -> Tensor:
    """One ancestral step z_t → z_{t−1} given ẑ_0 (no noise at t = 0)."""
    t = _steps(t, z_t)
    mean = posterior_mean(schedule, z_t, x0, t)
    std = torch.exp(0.5 * _extract(schedule.posterior_log_variance_clipped, t, z_t))
    nonzero = (t != 0).to(z_t.dtype).view(-1, *([1] * (z_t.ndim - 1)))
    return mean + nonzero * std * noise


def predict_x0(schedule: ResShiftSchedule, denoiser: Denoiser, z_t: Tensor, t: int | Tensor) -> Tensor:
    """ẑ_0 = denoiser(z_t / sqrt(κ² η_t + 1), t)."""
    t = _steps(t, z_t)
    return denoiser(scale_input(schedule, z_t, t), t)


@torch.no_grad()
def sample(
    schedule: ResShiftSchedule,
    denoiser: Denoiser,
    zy: Tensor,
    prior_noise: Tensor,
    step_noise: Callable[[int], Tensor] | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """Full T-step ancestral sampling of the teacher from z_T = prior(z_y, ε); returns the final latent z_0.

    ``step_noise(i)`` gives the noise of the i-th step (t = T−1−i); default: fresh ``randn_like``. The last
    step's noise is drawn but masked, as in the official sampler.
    """
    z = prior_sample(schedule, zy, prior_noise)
    for i, t in enumerate(range(schedule.last, -1, -1)):
        x0 = predict_x0(schedule, denoiser, z, t)
        noise = step_noise(i) if step_noise is not None else torch.randn_like(z)
        z = posterior_step(schedule, z, x0, t, noise)
        if callback is not None:
            callback({"i": i, "t": t, "x0": x0, "z": z})
    return z


@torch.no_grad()
def sample_ddim(schedule: ResShiftSchedule, denoiser: Denoiser, zy: Tensor, prior_noise: Tensor) -> Tensor:
    """Deterministic ResShift-DDIM sampling over all T steps (SinSR/TAD-SR teacher target); returns ẑ_0.

    z_{t−1} = k_t ẑ_0 + m_t z_t + j_t z_y with m_t = sqrt(η_{t−1}/η_t), j_t = η_{t−1} − sqrt(η_{t−1} η_t),
    k_t = 1 − η_{t−1} + sqrt(η_{t−1} η_t) − sqrt(η_{t−1}/η_t); the last step returns ẑ_0 itself.
    """
    z = prior_sample(schedule, zy, prior_noise)
    for t in range(schedule.last, 0, -1):
        x0 = predict_x0(schedule, denoiser, z, t)
        eta, eta_prev = schedule.etas[t], schedule.etas[t - 1]
        m = float(np.sqrt(eta_prev / eta))
        j = float(eta_prev - np.sqrt(eta_prev * eta))
        k = float(1 - eta_prev + np.sqrt(eta_prev * eta) - np.sqrt(eta_prev / eta))
        z = k * x0 + m * z + j * zy
    return predict_x0(schedule, denoiser, z, 0)


def eps_from_x0(schedule: ResShiftSchedule, z_t: Tensor, x0: Tensor, zy: Tensor, t: int | Tensor) -> Tensor:
    """The noise implied by an x0 prediction: ε̂ = (z_t − ẑ_0 − η_t (z_y − ẑ_0)) / (κ sqrt(η_t))."""
    t = _steps(t, z_t)
    return (z_t - x0 - _extract(schedule.etas, t, z_t) * (zy - x0)) / _extract(
        schedule.kappa * schedule.sqrt_etas, t, z_t
    )


def one_step(
    schedule: ResShiftSchedule,
    denoiser: Denoiser,
    zy: Tensor,
    prior_noise: Tensor,
    noise_scale: str = "kappa_sqrt_eta",
) -> Tensor:
    """The one-step student: ẑ_0 = f(prior(z_y, ε) / sqrt(κ² η_{T−1} + 1), T−1), returned directly."""
    z_t = prior_sample(schedule, zy, prior_noise, noise_scale)
    return predict_x0(schedule, denoiser, z_t, schedule.last)


def training_loss(
    schedule: ResShiftSchedule, denoiser: Denoiser, z0: Tensor, zy: Tensor, t: Tensor, noise: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """ResShift's objective (x0-prediction, unweighted MSE). Returns (per-sample MSE (B,), ẑ_0, z_t)."""
    z_t = q_sample(schedule, z0, zy, t, noise)
    pred = predict_x0(schedule, denoiser, z_t, t)
    mse = ((z0 - pred) ** 2).mean(dim=tuple(range(1, z0.ndim)))
    return mse, pred, z_t


def unet_denoiser(unet: torch.nn.Module, lq: Tensor | None, noise: Tensor | None = None) -> Denoiser:
    """Bind the LR conditioning (and a student's noise input) to a ResShift UNet: ``(x_in, t) -> ẑ_0``."""

    def call(x_in: Tensor, t: Tensor) -> Tensor:
        return unet(x_in, t, lq=lq, noise=noise)

    return call
