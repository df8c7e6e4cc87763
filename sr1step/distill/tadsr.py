"""TAD-SR (arXiv 2408.07476): one-step ResShift distillation with high-frequency score distillation (HSD) and a
time-aware discriminator on the frozen teacher's encoder features (reference ``distillation.md`` §5).

Per iteration (batch 8 in the released config): the student G (a teacher copy, t = T−1 only) predicts x̂0 from
the prior sample x_T = z_y + κ sqrt(η_T) ε. Then

* **D step**: real = q(z_gt, t_d), fake = q(x̂0, t_d) with one shared perturbation; both go through the frozen
  teacher's encoder (input blocks + middle block, 5 taps); per-tap FiLM on the t_d embedding and 1-D
  spectral-normalised heads give logits; hinge loss.
* **G step**: L = L_reg + λ_hsd·L_hsd + λ_adv·L_adv with
  L_reg = MSE(x̂0, z_tch) (z_tch: the teacher's deterministic 15-step DDIM output from the same x_T),
  L_hsd = mean(g ⊙ x̂0) with g = ε̂_T(a) − ε̂_T(b) (teacher noise predictions on x̂0 and z_tch re-noised at a small
  t_h with one shared perturbation; detached), and L_adv = −mean D(features of q(x̂0, t_d)), whose gradient
  reaches the student through the frozen teacher (teacher parameters never get gradients).

The perturbations are Gaussian by default; ``tadsr.perturbation = "uniform"`` reproduces the released code's
U[0, 1) draw (quirk Q1).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from sr1step import diffusion as D
from sr1step.distill.losses import hinge_d_loss, hinge_g_loss, hsd_surrogate, x0_regression
from sr1step.distill.student import ResShiftStudentMethod
from sr1step.distill.trainer import Batch, TrainContext, ema_update
from sr1step.errors import ConfigError
from sr1step.models.resshift_unet import ResShiftUNet, timestep_embedding


def _groups(channels: int, preferred: int) -> int:
    return next(g for g in (preferred, 16, 8, 4, 2, 1) if channels % g == 0)


class _Conv1dBlock(nn.Module):
    """Spectral-normalised Conv1d → GroupNorm(4) → LeakyReLU(0.2)."""

    def __init__(self, channels: int, kernel: int) -> None:
        super().__init__()
        padding = kernel // 2
        self.conv = spectral_norm(
            nn.Conv1d(channels, channels, kernel, padding=padding, padding_mode="circular")
        )
        self.norm = nn.GroupNorm(_groups(channels, 4), channels)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(self.conv(x)))


class TimeAwareHead(nn.Module):
    """One tap: FiLM of the feature map on the t_d embedding, a zero-initialised 3×3 conv, then a 1-D head over the
    flattened positions (StyleGAN-T/ADD style) giving ``logits`` values per position."""

    def __init__(self, channels: int, embed_dim: int, logits: int) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.film = nn.Sequential(nn.SiLU(), nn.Linear(embed_dim, 2 * channels))
        self.norm = nn.GroupNorm(_groups(channels, 32), channels)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.block = _Conv1dBlock(channels, 1)
        self.residual = _Conv1dBlock(channels, 9)
        self.out = spectral_norm(nn.Conv1d(channels, logits, 1))

    def forward(self, features: Tensor, t: Tensor) -> Tensor:
        scale, shift = self.film(timestep_embedding(t, self.embed_dim).to(features.dtype)).chunk(2, dim=1)
        h = self.norm(features) * (1 + scale[..., None, None]) + shift[..., None, None]
        h = self.conv(torch.nn.functional.silu(h)).flatten(2)  # (B, C, positions)
        h = self.block(h)
        h = (h + self.residual(h)) / math.sqrt(2)
        return self.out(h).flatten(1)  # (B, logits·positions)


class TimeAwareDiscriminator(nn.Module):
    """One :class:`TimeAwareHead` per tapped encoder feature map; logits of all heads concatenated per sample."""

    def __init__(self, tap_channels: dict[str, int], embed_dim: int, logits: int) -> None:
        super().__init__()
        self.taps = list(tap_channels)
        self.heads = nn.ModuleList(TimeAwareHead(c, embed_dim, logits) for c in tap_channels.values())

    def logits(self, features: dict[str, Tensor], t: Tensor) -> Tensor:
        return torch.cat(
            [head(features[tap], t) for tap, head in zip(self.taps, self.heads, strict=True)], dim=1
        )

    def forward(self, real: dict[str, Tensor], fake: dict[str, Tensor], t: Tensor) -> tuple[Tensor, Tensor]:
        """Real and fake logits in one call (one DDP forward per micro-step)."""
        joined = {tap: torch.cat([real[tap], fake[tap]]) for tap in self.taps}
        both = self.logits(joined, torch.cat([t, t]))
        return both[: len(t)], both[len(t) :]


def tap_channels(unet: ResShiftUNet, taps: tuple[str, ...], latent: int) -> dict[str, int]:
    """Channel counts of the requested encoder taps (found by one probe forward on a small latent)."""
    cfg = unet.config
    with torch.no_grad():
        probe = torch.zeros(1, cfg.out_channels, latent, latent, device=next(unet.parameters()).device)
        lq = torch.zeros(1, 3, latent * 2**cfg.lq_stages, latent * 2**cfg.lq_stages, device=probe.device)
        features = unet.encoder_features(probe, torch.zeros(1, dtype=torch.long, device=probe.device), lq)
    missing = [tap for tap in taps if tap not in features]
    if missing:
        raise ConfigError(
            f"tadsr.disc_taps: {missing[0]!r} is not an encoder feature of this teacher "
            f"(available: {', '.join(features)})"
        )
    return {tap: features[tap].shape[1] for tap in taps}


class TADSRMethod(ResShiftStudentMethod):
    name = "tad-sr"

    def setup(self, ctx: TrainContext) -> None:
        cfg = ctx.config.tadsr
        self.cfg = cfg
        teacher = ctx.teacher
        self.student = copy.deepcopy(teacher).requires_grad_(True)
        self.ema = copy.deepcopy(teacher).requires_grad_(False).eval()
        latent = teacher.config.size_multiple
        self.disc = TimeAwareDiscriminator(
            tap_channels(teacher, cfg.disc_taps, latent), teacher.config.model_channels, cfg.disc_logits
        ).to(ctx.device)
        self.student_ddp = ctx.wrap(self.student)
        self.disc_ddp = ctx.wrap(self.disc)
        self.opt_student = ctx.optimizer(self.student.parameters())
        self.sched_student = ctx.warmup_schedule(self.opt_student)
        self.opt_disc = ctx.optimizer(self.disc.parameters(), lr=cfg.disc_lr)

    # ------------------------------------------------------------------------------------- pieces

    def _perturbation(self, ctx: TrainContext, keys: list[int], shape: tuple[int, ...], tag: str) -> Tensor:
        if self.cfg.perturbation == "uniform":
            return ctx.random.rand(keys, shape, tag)
        return ctx.random.randn(keys, shape, tag)

    def _prior(self, ctx: TrainContext, batch: Batch) -> dict[str, Tensor]:
        schedule = ctx.schedule
        z_gt = ctx.encode(batch.hr)
        zy = ctx.encode(ctx.upsample(batch.lr))
        eps = ctx.random.randn(batch.keys, zy.shape[1:], "tad/eps")
        x_T = D.prior_sample(schedule, zy, eps)
        last = torch.full((len(batch),), schedule.last, dtype=torch.long, device=zy.device)
        return {"z_gt": z_gt, "zy": zy, "eps": eps, "x_in": D.scale_input(schedule, x_T, last), "last": last}

    def _disc_inputs(self, ctx: TrainContext, batch: Batch, z0: Tensor, zy: Tensor) -> tuple[Tensor, Tensor]:
        """q(z0 → t_d) with the batch's t_d and shared perturbation, scaled for the teacher, and t_d."""
        t_d = ctx.random.choice(batch.keys, self.cfg.disc_steps, "tad/t_d")
        xi = self._perturbation(ctx, batch.keys, tuple(z0.shape[1:]), "tad/xi_d")
        return D.scale_input(ctx.schedule, D.q_sample(ctx.schedule, z0, zy, t_d, xi), t_d), t_d

    def _teacher_features(self, ctx: TrainContext, x_in: Tensor, t: Tensor, lr: Tensor) -> dict[str, Tensor]:
        features = ctx.teacher.encoder_features(x_in, t, lr)
        return {tap: features[tap] for tap in self.cfg.disc_taps}

    # ------------------------------------------------------------------------------------- updates

    def disc_loss(self, ctx: TrainContext, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        p = self._prior(ctx, batch)
        with torch.no_grad():
            x0 = self.student(p["x_in"], p["last"], batch.lr)
            real_in, t_d = self._disc_inputs(ctx, batch, p["z_gt"], p["zy"])
            fake_in, _ = self._disc_inputs(ctx, batch, x0, p["zy"])
            real = self._teacher_features(ctx, real_in, t_d, batch.lr)
            fake = self._teacher_features(ctx, fake_in, t_d, batch.lr)
        real_logits, fake_logits = self.disc_ddp(real, fake, t_d)
        loss = hinge_d_loss(real_logits, fake_logits)
        return loss, {"disc/loss": loss}

    def student_loss(self, ctx: TrainContext, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        cfg, schedule, teacher = self.cfg, ctx.schedule, ctx.teacher
        p = self._prior(ctx, batch)
        zy, keys = p["zy"], batch.keys
        x0 = self.student_ddp(p["x_in"], p["last"], batch.lr)
        with torch.no_grad():
            z_tch = D.sample_ddim(schedule, D.unet_denoiser(teacher, batch.lr), zy, p["eps"])
        reg = x0_regression(x0, z_tch)
        # HSD: the teacher's noise predictions on both outputs re-noised at a small t_h, one shared perturbation
        t_h = ctx.random.choice(keys, cfg.hsd_steps, "tad/t_h")
        xi = self._perturbation(ctx, keys, tuple(x0.shape[1:]), "tad/xi_h")
        with torch.no_grad():
            a = D.q_sample(schedule, x0.detach(), zy, t_h, xi)
            b = D.q_sample(schedule, z_tch, zy, t_h, xi)
            eps_a = D.eps_from_x0(
                schedule, a, teacher(D.scale_input(schedule, a, t_h), t_h, batch.lr), zy, t_h
            )
            eps_b = D.eps_from_x0(
                schedule, b, teacher(D.scale_input(schedule, b, t_h), t_h, batch.lr), zy, t_h
            )
        hsd = hsd_surrogate(eps_a - eps_b, x0)
        # adversarial: same t_d and perturbation as the D step; gradients flow through the frozen teacher and D
        fake_in, t_d = self._disc_inputs(ctx, batch, x0, zy)
        adv = hinge_g_loss(self.disc.logits(self._teacher_features(ctx, fake_in, t_d, batch.lr), t_d))
        loss = cfg.reg_weight * reg + cfg.hsd_weight * hsd + cfg.adv_weight * adv
        return loss, {"student/reg": reg, "student/hsd": hsd, "student/adv": adv, "student/loss": loss}

    def train_step(self, ctx: TrainContext, step: int) -> dict[str, float]:
        batch = ctx.fetch()
        self.disc.requires_grad_(True)
        self.opt_disc.zero_grad(set_to_none=True)
        logs = ctx.accumulate(self.disc_ddp, batch, lambda b: self.disc_loss(ctx, b))
        self.opt_disc.step()
        self.disc.requires_grad_(False)  # the G step sends gradients through D, not into it
        self.opt_student.zero_grad(set_to_none=True)
        logs.update(ctx.accumulate(self.student_ddp, batch, lambda b: self.student_loss(ctx, b)))
        self.opt_student.step()
        self.sched_student.step()
        self.disc.requires_grad_(True)
        ema_update(self.ema, self.student, ctx.config.train.ema_rate)
        logs["lr"] = self.opt_student.param_groups[0]["lr"]
        return logs

    # ------------------------------------------------------------------------------------- evaluation, state

    def state_parts(self) -> dict[str, Any]:
        return {
            "student": self.student,
            "disc": self.disc,
            "ema": self.ema,
            "opt_student": self.opt_student,
            "opt_disc": self.opt_disc,
            "sched_student": self.sched_student,
        }

    def export_metadata(self) -> dict[str, str]:
        return {"perturbation": self.cfg.perturbation}
