"""RSD (arXiv 2503.13358): ResShift distillation with a fake model, its discriminator head and a joint-trajectory
objective (reference ``distillation.md`` §2).

Per outer iteration: K fake updates (x0-regression of the fake on re-noised student samples + non-saturating D
loss on the fake's bottleneck), then one student update: the SiD-normalised distillation term
‖f*(z_t) − ẑ0‖² − ‖f_φ(z_t) − ẑ0‖² with gradients through the frozen teacher and fake into z_t, plus LPIPS of a
separate one-step sample decoded through a straight-through VQ, plus the generator GAN loss. EMA after each
student update. Student = teacher + one zero-initialised noise plane; fake = teacher copy + head.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from sr1step import diffusion as D
from sr1step.distill.losses import (
    non_saturating_d_loss,
    non_saturating_g_loss,
    rsd_distillation,
    vsd_distillation,
    x0_regression,
)
from sr1step.distill.student import ResShiftStudentMethod
from sr1step.distill.trainer import Batch, TrainContext, ema_update
from sr1step.models import ResShiftUNet


def with_noise_channels(teacher: ResShiftUNet, channels: int) -> ResShiftUNet:
    """A copy of the teacher whose first conv takes ``channels`` extra noise planes (appended last, zero weights),
    so the student equals the teacher at step 0 whatever the noise."""
    if channels == 0:
        return copy.deepcopy(teacher)
    config = teacher.config.to_dict() | {"noise_channels": channels, "noise_mode": "concat"}
    student = ResShiftUNet.from_config(config).to(next(teacher.parameters()).device)
    state = teacher.state_dict()
    weight = state["input_blocks.0.0.weight"]
    zeros = weight.new_zeros(weight.shape[0], channels, *weight.shape[2:])
    state["input_blocks.0.0.weight"] = torch.cat([weight, zeros], dim=1)
    student.load_state_dict(state)
    return student


class BottleneckHead(nn.Module):
    """DMD2-style discriminator head on the middle-block features (reference default, the paper gives none):
    2 × [conv4×4 stride 2, GroupNorm, SiLU] → conv1×1 → one logit per position, averaged per sample."""

    def __init__(self, channels: int, width: int = 0) -> None:
        super().__init__()
        width = width or channels
        groups = next(g for g in (32, 16, 8, 4, 2, 1) if width % g == 0)
        self.layers = nn.Sequential(
            nn.Conv2d(channels, width, 4, stride=2, padding=1),
            nn.GroupNorm(groups, width),
            nn.SiLU(),
            nn.Conv2d(width, width, 4, stride=2, padding=1),
            nn.GroupNorm(groups, width),
            nn.SiLU(),
            nn.Conv2d(width, 1, 1),
        )

    def forward(self, features: Tensor) -> Tensor:
        if min(features.shape[-2:]) < 4:
            raise ValueError(
                f"the discriminator head needs a bottleneck of at least 4×4, got {tuple(features.shape[-2:])}"
            )
        return self.layers(features).mean(dim=(1, 2, 3))


class FakeModel(nn.Module):
    """The fake denoiser f_φ (a teacher copy) with the discriminator head D_ψ on its bottleneck.

    One ``forward`` returns what the fake update needs, so DDP sees a single call per micro-step.
    """

    def __init__(self, unet: ResShiftUNet, head_width: int = 0) -> None:
        super().__init__()
        self.unet = unet
        bottleneck = unet.config.model_channels * unet.config.channel_mult[-1]
        self.head = BottleneckHead(bottleneck, head_width)

    def logits(self, schedule: D.ResShiftSchedule, z0: Tensor, lq: Tensor) -> Tensor:
        """D_ψ(enc_φ(z0, t=0, lq)): the head on the middle block, run at t = 0 with the scaled clean latent."""
        t = torch.zeros(z0.shape[0], dtype=torch.long, device=z0.device)
        features = self.unet.encoder_features(D.scale_input(schedule, z0, t), t, lq)["middle_block"]
        return self.head(features)

    def forward(
        self,
        schedule: D.ResShiftSchedule,
        x_in: Tensor,
        t: Tensor,
        lq: Tensor,
        z_real: Tensor,
        z_fake: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        pred = self.unet(x_in, t, lq)
        both = self.logits(schedule, torch.cat([z_real, z_fake]), torch.cat([lq, lq]))
        return pred, both[: len(z_real)], both[len(z_real) :]


class StudentModel(nn.Module):
    """The student G_θ; ``forward`` evaluates several (input, t, noise) sets in one batched call (one DDP call)."""

    def __init__(self, unet: ResShiftUNet) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x_in: Tensor, t: Tensor, lq: Tensor, noise: Tensor) -> Tensor:
        return self.unet(x_in, t, lq, noise)


class RSDMethod(ResShiftStudentMethod):
    name = "rsd"

    def setup(self, ctx: TrainContext) -> None:
        cfg = ctx.config.rsd
        self.cfg = cfg
        teacher = ctx.teacher
        self.student = StudentModel(with_noise_channels(teacher, cfg.noise_channels)).requires_grad_(True)
        self.fake = FakeModel(copy.deepcopy(teacher), cfg.head_channels).requires_grad_(True)
        self.ema = copy.deepcopy(self.student.unet).requires_grad_(False).eval()
        self.student_ddp = ctx.wrap(self.student)
        self.fake_ddp = ctx.wrap(self.fake)
        self.opt_student = ctx.optimizer(self.student.parameters())
        self.sched_student = ctx.warmup_schedule(self.opt_student)
        self.opt_fake = ctx.optimizer(self.fake.parameters())
        self.fake_history: list[float] = []  # the fake's x0-regression loss after each of its updates
        if cfg.lpips_weight:
            ctx.lpips  # noqa: B018 - load (or fail on missing weights) before the first step, not mid-run

    # ------------------------------------------------------------------------------------- shared pieces

    def _student_inputs(self, ctx: TrainContext, batch: Batch, phase: str) -> dict[str, Tensor]:
        """Latents, a node t_n per sample and the forward-noised GT z_{t_n} (``true_data``)."""
        schedule, keys = ctx.schedule, batch.keys
        z0 = ctx.encode(batch.hr)
        zy = ctx.encode(ctx.upsample(batch.lr))
        t_n = ctx.random.choice(keys, self.cfg.nodes, f"{phase}/node")
        xi = ctx.random.randn(keys, z0.shape[1:], f"{phase}/xi_node")
        eps = ctx.random.randn(keys, (self.cfg.noise_channels, *z0.shape[2:]), f"{phase}/eps")
        z_tn = D.q_sample(schedule, z0, zy, t_n, xi)
        return {"z0": z0, "zy": zy, "t_n": t_n, "x_in": D.scale_input(schedule, z_tn, t_n), "eps": eps}

    def _renoise(
        self, ctx: TrainContext, batch: Batch, x0: Tensor, zy: Tensor, phase: str
    ) -> tuple[Tensor, Tensor]:
        """t ~ U{0..T−1} and z_t = q(ẑ0 → t) toward z_y; returns (scaled input, t)."""
        schedule = ctx.schedule
        t = ctx.random.randint(batch.keys, schedule.steps, f"{phase}/t")
        xi = ctx.random.randn(batch.keys, x0.shape[1:], f"{phase}/xi_t")
        z_t = D.q_sample(schedule, x0, zy, t, xi)
        return D.scale_input(schedule, z_t, t), t

    # ------------------------------------------------------------------------------------- updates

    def fake_loss(self, ctx: TrainContext, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        inputs = self._student_inputs(ctx, batch, "fake")
        with torch.no_grad():
            x0_student = self.student.unet(inputs["x_in"], inputs["t_n"], batch.lr, inputs["eps"])
        x_in, t = self._renoise(ctx, batch, x0_student, inputs["zy"], "fake")
        pred, real_logits, fake_logits = self.fake_ddp(
            ctx.schedule, x_in, t, batch.lr, inputs["z0"], x0_student
        )
        regression = x0_regression(pred, x0_student)
        d_loss = non_saturating_d_loss(real_logits, fake_logits)
        loss = regression + self.cfg.gan_weight * d_loss
        return loss, {"fake/regression": regression, "fake/d_loss": d_loss, "fake/loss": loss}

    def student_loss(self, ctx: TrainContext, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        cfg, schedule = self.cfg, ctx.schedule
        inputs = self._student_inputs(ctx, batch, "student")
        keys, zy = batch.keys, inputs["zy"]
        # the separate one-step sample at t = T−1 for LPIPS, batched with the node call
        z_T = D.prior_sample(schedule, zy, ctx.random.randn(keys, zy.shape[1:], "student/xi_prior"))
        eps_T = (
            ctx.random.randn(keys, inputs["eps"].shape[1:], "student/eps_lpips")
            if cfg.fresh_lpips_noise
            else inputs["eps"]
        )
        last = torch.full_like(inputs["t_n"], schedule.last)
        out = self.student_ddp(
            torch.cat([inputs["x_in"], D.scale_input(schedule, z_T, last)]),
            torch.cat([inputs["t_n"], last]),
            torch.cat([batch.lr, batch.lr]),
            torch.cat([inputs["eps"], eps_T]),
        )
        x0_student, x0_onestep = out[: len(keys)], out[len(keys) :]
        x_in, t = self._renoise(ctx, batch, x0_student, zy, "student")
        teacher_x0 = ctx.teacher(x_in, t, batch.lr)
        fake_x0 = self.fake.unet(x_in, t, batch.lr)
        term = vsd_distillation if cfg.stop_gradient_scores else rsd_distillation
        distill = term(teacher_x0, fake_x0, x0_student, cfg.sid_normalization)
        loss = distill
        logs = {"student/distill": distill}
        if cfg.lpips_weight:
            lpips = ctx.lpips(ctx.decode_with_grad(x0_onestep), batch.hr).flatten()
            loss = loss + cfg.lpips_weight * lpips
            logs["student/lpips"] = lpips
        if cfg.gan_weight:
            g_loss = non_saturating_g_loss(self.fake.logits(schedule, x0_student, batch.lr))
            loss = loss + cfg.gan_weight * g_loss
            logs["student/g_loss"] = g_loss
        logs["student/loss"] = loss
        return loss, logs

    def train_step(self, ctx: TrainContext, step: int) -> dict[str, float]:
        logs: dict[str, float] = {}
        self.fake.requires_grad_(True)
        for _ in range(self.cfg.n_fake_loop):
            self.opt_fake.zero_grad(set_to_none=True)
            fake_logs = ctx.accumulate(self.fake_ddp, ctx.fetch(), lambda b: self.fake_loss(ctx, b))
            self.opt_fake.step()
            self.fake_history.append(fake_logs["fake/regression"])
            for name, value in fake_logs.items():  # mean over the K updates
                logs[name] = logs.get(name, 0.0) + value / self.cfg.n_fake_loop
        # the fake is frozen for the student update: gradients pass through it into ẑ0, never into φ, ψ
        self.fake.requires_grad_(False)
        self.opt_student.zero_grad(set_to_none=True)
        logs.update(ctx.accumulate(self.student_ddp, ctx.fetch(), lambda b: self.student_loss(ctx, b)))
        self.opt_student.step()
        self.sched_student.step()
        self.fake.requires_grad_(True)
        ema_update(self.ema, self.student.unet, ctx.config.train.ema_rate)
        logs["lr"] = self.opt_student.param_groups[0]["lr"]
        return logs

    # ------------------------------------------------------------------------------------- evaluation, state

    def state_parts(self) -> dict[str, Any]:
        return {
            "student": self.student.unet,
            "fake": self.fake,
            "ema": self.ema,
            "opt_student": self.opt_student,
            "opt_fake": self.opt_fake,
            "sched_student": self.sched_student,
        }
