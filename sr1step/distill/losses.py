"""Loss terms of the distillation methods, as small pure functions on tensors (per-sample values, shape (B,)).

Reductions follow the reference: squared norms are means over (C, H, W) per sample (ResShift's ``mean_flat``);
callers average over the batch. Gradients: nothing here detaches unless the formula says so.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension but the batch."""
    return x.mean(dim=tuple(range(1, x.ndim)))


# --------------------------------------------------------------------------------------------- RSD


def x0_regression(pred_x0: Tensor, target_x0: Tensor) -> Tensor:
    """ResShift's x0-MSE: mean_CHW (pred − target)² (the fake model's loss on student samples)."""
    return mean_flat((pred_x0 - target_x0) ** 2)


def rsd_distillation(
    teacher_x0: Tensor, fake_x0: Tensor, student_x0: Tensor, sid_normalization: bool = True, eps: float = 1e-8
) -> Tensor:
    """RSD's student term  ‖f*(z_t) − ẑ0‖² − ‖f_φ(z_t) − ẑ0‖²  (means over C, H, W).

    With SiD normalisation it is divided by stopgrad(mean_CHW |f*(z_t) − ẑ0|) + eps. Gradients flow through all
    three inputs: the teacher/fake predictions carry their Jacobians back into z_t and ẑ0 (the RSD gradient, not
    the VSD one; see :func:`vsd_distillation`).
    """
    term = mean_flat((teacher_x0 - student_x0) ** 2) - mean_flat((fake_x0 - student_x0) ** 2)
    if sid_normalization:
        term = term / (mean_flat((teacher_x0 - student_x0).abs()).detach() + eps)
    return term


def vsd_distillation(
    teacher_x0: Tensor, fake_x0: Tensor, student_x0: Tensor, sid_normalization: bool = True, eps: float = 1e-8
) -> Tensor:
    """The ResShift-VSD baseline (RSD Algorithm 2): the same value with gradients stopped at f* and f_φ."""
    return rsd_distillation(teacher_x0.detach(), fake_x0.detach(), student_x0, sid_normalization, eps)


def non_saturating_d_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """softplus(−D(real)) + softplus(D(fake)) (DMD2/RSD discriminator)."""
    return F.softplus(-real_logits) + F.softplus(fake_logits)


def non_saturating_g_loss(fake_logits: Tensor) -> Tensor:
    """softplus(−D(fake)) (the generator side)."""
    return F.softplus(-fake_logits)


def straight_through_quantize(quantizer: nn.Module, z: Tensor) -> Tensor:
    """Nearest-codeword z in the forward pass, identity gradient in the backward pass."""
    with torch.no_grad():
        snapped = quantizer(z)
    return z + (snapped - z).detach()


# --------------------------------------------------------------------------------------------- TAD-SR


def hinge_d_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """mean relu(1 − D(real)) + mean relu(1 + D(fake)), per sample over all logits."""
    return mean_flat(F.relu(1 - real_logits)) + mean_flat(F.relu(1 + fake_logits))


def hinge_g_loss(fake_logits: Tensor) -> Tensor:
    return -mean_flat(fake_logits)


def hsd_surrogate(signal: Tensor, student_x0: Tensor) -> Tensor:
    """TAD-SR's HSD surrogate mean_CHW(g ⊙ x̂0) with g detached: ∂/∂x̂0 = g / (C·H·W)."""
    return mean_flat(torch.nan_to_num(signal.detach()) * student_x0)
