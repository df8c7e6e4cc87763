"""YONOS-SR scale distillation (arXiv 2401.17258; reference ``distillation.md`` §6) as a trainer plug-in.

The run is a chain of stages, ``yonos.stage_iterations`` each, then decoder fine-tuning:

* stage 1 (×stages[0]): the x0-space diffusion loss  w(λ_t)·‖x̂0_θ(z_t, z_lr^N) − z_h‖²;
* stage k > 1 (×N = 2× the previous): the student starts from stage k−1 (its EMA by default), and a frozen copy
  of it is the teacher:  w(λ_t)·‖x̂0_θ(z_t, z_lr^N) − x̂0_φ(z_t, z_lr^{N/2})‖²  with the same noisy HR latent z_t
  and t, the teacher fed the same HR degraded to half the scale;
* decoder (``yonos.decoder_iterations``): the last UNet (EMA) is frozen and run once per batch for one-step
  latents; the VAE decoder is trained on them towards the HR image with L1 + LPIPS (+ an optional hinge patch GAN).

z_h is the VAE latent of the HR crop, z_lr^N that of its ×N LR (Real-ESRGAN-degraded per sample from the HR with
a keyed generator, so runs are deterministic and independent of how the batch is split) bicubic-upsampled back to
the HR size. The trainer's ``fetch`` is asked for HR only: every stage needs its own scale.
EMA (``train.ema_rate``) follows the trained network of each stage; exports and validation use the EMAs.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sr1step.checkpoints import export_safetensors
from sr1step.distill.config import YonosConfig
from sr1step.distill.data import derive_seed
from sr1step.distill.degradations import DegradationConfig, apply_plan, sample_plan
from sr1step.distill.losses import hinge_d_loss, hinge_g_loss, mean_flat
from sr1step.distill.trainer import Batch, TrainContext, ema_update
from sr1step.errors import ConfigError
from sr1step.models.yonos import LatentDecoder, YonosSR, YonosUpscaler
from sr1step.pipeline import TileSettings

# Generator tags of the per-sample degradation draws (the student's scale, and the teacher's when not shared).
DEGRADE_TAG = 0x594F4E4F53  # "YONOS"
TEACHER_DEGRADE_TAG = DEGRADE_TAG + 1
DISCRIMINATOR_SEED_TAG = 11


def lr_versions(
    hr: Tensor,
    keys: Sequence[int],
    scales: Sequence[int],
    degradation: DegradationConfig,
    shared: bool = True,
) -> list[Tensor]:
    """LR versions in [-1, 1] of an HR batch in [-1, 1], one tensor per scale.

    Each sample's Real-ESRGAN choices are drawn from a generator keyed by its key. With ``shared`` every scale
    applies the same draw (the teacher's LR is the student's degradation at half the scale); otherwise each
    scale after the first draws its own. The HR is taken as it is (no USM sharpening of the target).
    """
    hr01 = ((hr.float() + 1) / 2).clamp(0, 1)
    outputs: list[list[Tensor]] = [[] for _ in scales]
    for j, key in enumerate(keys):
        plan = None
        for i, scale in enumerate(scales):
            config = dataclasses.replace(degradation, scale=scale, use_sharp=False)
            if plan is None or not shared:
                tag = DEGRADE_TAG if i == 0 else TEACHER_DEGRADE_TAG + i - 1
                plan = sample_plan(1, config, torch.Generator().manual_seed(derive_seed(key, tag)))
            lq, _ = apply_plan(hr01[j : j + 1], plan, config)
            outputs[i].append(lq)
    return [torch.cat(parts) * 2 - 1 for parts in outputs]


def loss_weight(snr: Tensor, kind: str, gamma: float = 5.0) -> Tensor:
    """w(λ_t) on the x0 error: ``snr_trunc`` max(SNR, 1) (ε-loss weighting at low noise, x0 at high noise),
    ``min_snr`` min(SNR, γ), ``uniform`` 1."""
    if kind == "snr_trunc":
        return snr.clamp(min=1.0)
    if kind == "min_snr":
        return snr.clamp(max=gamma)
    if kind == "uniform":
        return torch.ones_like(snr)
    raise ConfigError(f"unknown loss weighting {kind!r}")


class PatchDiscriminator(nn.Module):
    """A pix2pix-style PatchGAN (our choice; the paper names no GAN): strided 4×4 convs with GroupNorm and
    LeakyReLU, one logit per patch. GroupNorm keeps it independent of how a batch is split."""

    def __init__(self, channels: int = 64, layers: int = 3) -> None:
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(3, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, layers + 1):
            out = channels * min(2**i, 8)
            blocks += [
                nn.Conv2d(width, out, 4, stride=2 if i < layers else 1, padding=1),
                nn.GroupNorm(math.gcd(32, out), out),
                nn.LeakyReLU(0.2),
            ]
            width = out
        blocks.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.layers = nn.Sequential(*blocks)

    def forward(self, images: Tensor) -> Tensor:
        return self.layers(images)


class YonosMethod:
    name = "yonos-sr"

    # ------------------------------------------------------------------------------------- set-up

    def setup(self, ctx: TrainContext) -> None:
        config = ctx.config
        cfg: YonosConfig = config.yonos
        cfg.validate()
        if config.model.scale != cfg.stages[-1]:
            raise ConfigError(
                f"model.scale {config.model.scale} must be the last YONOS stage yonos.stages[-1] = {cfg.stages[-1]}"
            )
        if config.model.teacher_weights or config.model.vae:
            raise ConfigError(
                "yonos-sr takes its UNet and VAE from yonos.base (--base): model.teacher_weights / model.vae "
                "(--teacher-weights, --vae) do not apply"
            )
        if config.data.paired_lq is not None:
            raise ConfigError(
                "yonos-sr degrades each HR crop at every stage's scale: paired LQ/GT folders cannot be used"
            )
        default_total = YonosConfig().total_iterations
        if config.train.iterations not in (cfg.total_iterations, default_total):
            raise ConfigError(
                f"train.iterations {config.train.iterations} does not fit the YONOS-SR schedule: {len(cfg.stages)} "
                f"stages × {cfg.stage_iterations} + {cfg.decoder_iterations} decoder = {cfg.total_iterations}; "
                "set yonos.stage_iterations / yonos.decoder_iterations instead"
            )
        config.train.iterations = cfg.total_iterations
        self.ctx = ctx
        self.cfg = cfg
        self.model = YonosSR.from_base(
            cfg.base,
            scale=cfg.stages[0],
            prediction=cfg.prediction,
            schedule=cfg.schedule,
            empty_prompt=cfg.empty_prompt,
            lr_upsample=cfg.lr_upsample,
            one_step_start=cfg.one_step_start,
            latent_tile=cfg.latent_tile,
            offline=ctx.offline,
            progress=ctx.env.is_main,
        ).to(ctx.device)
        self.model.requires_grad_(False)
        multiple = self.model.pixel_multiple
        if config.data.gt_size % multiple:
            raise ConfigError(
                f"data.gt_size {config.data.gt_size} must be a multiple of {multiple} px for this base "
                f"(VAE ×{self.model.vae_factor}, UNet latents in multiples of {self.model.latent_multiple})"
            )
        self.stage = -1
        self.teacher: nn.Module | None = None
        self.ema_unet: nn.Module | None = None
        self.ema_vae: nn.Module | None = None
        self.disc: PatchDiscriminator | None = None
        self._latents: dict[int, Tensor] = {}
        self._fakes: dict[int, Tensor] = {}
        self.start_stage(0)
        if cfg.decoder_iterations and cfg.decoder_lpips_weight:
            ctx.lpips  # noqa: B018 - load (or fail on missing weights) before the first step, not mid-run

    @property
    def unet_stages(self) -> int:
        return len(self.cfg.stages)

    def stage_of(self, step: int) -> int:
        """The stage an iteration belongs to: 0 … len(stages)−1 for the UNet stages, len(stages) for the decoder."""
        return min(step // self.cfg.stage_iterations, self.unet_stages)

    def stage_label(self, stage: int | None = None) -> str:
        stage = self.stage if stage is None else stage
        return "decoder" if stage >= self.unet_stages else f"x{self.cfg.stages[stage]}"

    def start_stage(self, stage: int) -> None:
        """Make stage ``stage``'s networks and optimizers from the current ones (the previous stage's result).

        Also builds the structures a checkpoint of that stage is loaded into.
        """
        ctx, cfg, model = self.ctx, self.cfg, self.model
        # free the previous stage's optimizer state and DDP wrapper before the next stage's copies are made
        self.opt = self.sched = self.model_ddp = None
        gc.collect()
        if stage < self.unet_stages:
            if stage == 0:
                student = model.unet
            else:
                source = self.ema_unet if cfg.next_stage_from == "ema" else model.unet
                self.teacher = copy.deepcopy(source).eval().requires_grad_(False)
                student = copy.deepcopy(source)
            student.train().requires_grad_(True)
            if cfg.gradient_checkpointing:
                student.enable_gradient_checkpointing()
            model.unet = student
            model.scale = cfg.stages[stage]
            self.ema_unet = copy.deepcopy(student).eval().requires_grad_(False)
            self.model_ddp = ctx.wrap(model)
            self.opt = ctx.optimizer(student.parameters())
        else:
            # the UNet is frozen from here on: the decoder learns the latents the exported UNet produces
            self.teacher = None
            model.unet = self.ema_unet
            model.scale = cfg.stages[-1]
            model.vae.requires_grad_(False)
            decoder = LatentDecoder(model.vae).train().requires_grad_(True)
            if cfg.gradient_checkpointing:
                model.vae.enable_gradient_checkpointing()
            self.ema_vae = copy.deepcopy(model.vae).eval().requires_grad_(False)
            self.decoder = decoder
            self.decoder_ddp = ctx.wrap(decoder)
            self.opt = ctx.optimizer(decoder.parameters(), lr=cfg.decoder_lr)
            if cfg.decoder_gan_weight:
                # the same initial weights on every rank and in a resumed run
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(derive_seed(ctx.config.train.seed, DISCRIMINATOR_SEED_TAG))
                    self.disc = PatchDiscriminator(cfg.decoder_gan_channels, cfg.decoder_gan_layers)
                self.disc_ddp = ctx.wrap(self.disc)
                self.opt_disc = ctx.optimizer(self.disc.parameters(), lr=cfg.decoder_lr)
        self.sched = ctx.warmup_schedule(self.opt)
        self.stage = stage

    # ------------------------------------------------------------------------------------- shared pieces

    def _autocast(self) -> contextlib.AbstractContextManager:
        precision, device = self.cfg.precision, self.ctx.device
        if precision == "auto":
            precision = "bf16" if device.type == "cuda" else "fp32"
        if precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)

    def _lr_versions(self, batch: Batch, scales: Sequence[int]) -> list[Tensor]:
        return lr_versions(
            batch.hr, batch.keys, scales, self.ctx.config.data.degradation, self.cfg.shared_degradation
        )

    def _timesteps(self, keys: Sequence[int]) -> Tensor:
        terminal = self.model.terminal_timestep
        if self.cfg.timesteps == "terminal":
            return torch.full((len(keys),), terminal, dtype=torch.long, device=self.ctx.device)
        return self.ctx.random.randint(keys, terminal + 1, "yonos/t")

    # ------------------------------------------------------------------------------------- UNet stages

    def unet_terms(self, batch: Batch) -> dict[str, Any]:
        """One UNet-stage micro-batch: LR versions, latents, t, z_t, the student's x̂0 and its regression target
        (z_h in stage 1; the frozen teacher's x̂0 at the same z_t and t from the half-scale LR afterwards)."""
        model, scale = self.model, self.cfg.stages[self.stage]
        distilling = self.teacher is not None
        lrs = self._lr_versions(batch, [scale, scale // 2] if distilling else [scale])
        size = tuple(batch.hr.shape[-2:])
        with torch.no_grad(), self._autocast():
            z_h = model.encode_images(batch.hr)
            z_lr = model.encode_lr(lrs[0], size)
            z_lr_teacher = model.encode_lr(lrs[1], size) if distilling else None
        t = self._timesteps(batch.keys)
        noise = self.ctx.random.randn(batch.keys, z_h.shape[1:], "yonos/noise")
        z_t = model.add_noise(z_h, noise, t)
        with self._autocast():
            x0 = self.model_ddp(z_t, t, z_lr)
        if distilling:
            with torch.no_grad(), self._autocast():
                target = model.predict_x0(z_t, t, z_lr_teacher, unet=self.teacher)
        else:
            target = z_h
        return {
            "lr": lrs[0],
            "lr_teacher": lrs[1] if distilling else None,
            "z_h": z_h,
            "z_lr": z_lr,
            "z_lr_teacher": z_lr_teacher,
            "t": t,
            "z_t": z_t,
            "x0": x0,
            "target": target,
        }

    def unet_loss(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        terms = self.unet_terms(batch)
        error = mean_flat((terms["x0"] - terms["target"]) ** 2)
        weight = loss_weight(self.model.snr(terms["t"]), self.cfg.loss_weighting, self.cfg.min_snr_gamma)
        loss = weight * error
        kind = "sd" if self.teacher is not None else "sr"
        return loss, {f"unet/loss_{kind}": loss, "unet/x0_mse": error}

    def _unet_step(self, batch: Batch) -> dict[str, float]:
        self.opt.zero_grad(set_to_none=True)
        logs = self.ctx.accumulate(self.model_ddp, batch, self.unet_loss)
        self.opt.step()
        self.sched.step()
        ema_update(self.ema_unet, self.model.unet, self.ctx.config.train.ema_rate)
        return logs

    # ------------------------------------------------------------------------------------- decoder stage

    @torch.no_grad()
    def one_step_latents(self, batch: Batch) -> dict[int, Tensor]:
        """The frozen UNet's one-step latents for a batch (per micro-batch), by sample key."""
        model, latents = self.model, {}
        for part in batch.split(self.ctx.config.train.microbatch):
            lr = self._lr_versions(part, [model.scale])[0]
            with self._autocast():
                z_lr = model.encode_lr(lr, tuple(part.hr.shape[-2:]))
                noise = self.ctx.random.randn(part.keys, z_lr.shape[1:], "yonos/one_step_noise")
                x0 = model.one_step(z_lr, noise)
            latents.update(zip(part.keys, x0.float(), strict=True))
        return latents

    def decoder_loss(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.cfg
        z = torch.stack([self._latents[key] for key in batch.keys])
        with self._autocast():
            images = self.decoder_ddp(z)
        images = images.float()
        l1 = mean_flat((images - batch.hr).abs())
        loss = cfg.decoder_l1_weight * l1
        logs = {"decoder/l1": l1}
        if cfg.decoder_lpips_weight:
            lpips = self.ctx.lpips(images, batch.hr).flatten()
            loss = loss + cfg.decoder_lpips_weight * lpips
            logs["decoder/lpips"] = lpips
        if self.disc is not None:
            with self._autocast():
                g_loss = hinge_g_loss(self.disc(images).float())
            loss = loss + cfg.decoder_gan_weight * g_loss
            logs["decoder/g_loss"] = g_loss
            self._fakes.update(zip(batch.keys, images.detach(), strict=True))
        logs["decoder/loss"] = loss
        return loss, logs

    def discriminator_loss(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        fakes = torch.stack([self._fakes[key] for key in batch.keys])
        with self._autocast():
            logits = self.disc_ddp(torch.cat([batch.hr, fakes])).float()
        loss = hinge_d_loss(logits[: len(fakes)], logits[len(fakes) :])
        return loss, {"disc/loss": loss}

    def _decoder_step(self, batch: Batch) -> dict[str, float]:
        self._latents = self.one_step_latents(batch)
        self._fakes = {}
        if self.disc is not None:
            self.disc.requires_grad_(False)  # the generator's gradient passes through D into the images only
        self.opt.zero_grad(set_to_none=True)
        logs = self.ctx.accumulate(self.decoder_ddp, batch, self.decoder_loss)
        self.opt.step()
        self.sched.step()
        if self.disc is not None:
            self.disc.requires_grad_(True)
            self.opt_disc.zero_grad(set_to_none=True)
            logs.update(self.ctx.accumulate(self.disc_ddp, batch, self.discriminator_loss))
            self.opt_disc.step()
        ema_update(LatentDecoder(self.ema_vae), self.decoder, self.ctx.config.train.ema_rate)
        self._latents, self._fakes = {}, {}
        return logs

    # ------------------------------------------------------------------------------------- the loop

    def train_step(self, ctx: TrainContext, step: int) -> dict[str, float]:
        stage = self.stage_of(step)
        if stage != self.stage:
            self.start_stage(stage)
        batch = ctx.fetch(degrade_lr=False)  # every stage makes its own LR versions of the HR
        logs = self._unet_step(batch) if stage < self.unet_stages else self._decoder_step(batch)
        logs["lr"] = self.opt.param_groups[0]["lr"]
        logs["stage"] = float(stage)
        logs["scale"] = float(self.model.scale)
        return logs

    # ------------------------------------------------------------------------------------- evaluation, state

    def inference_model(self) -> YonosSR:
        """The model to validate and export: the EMA UNet and, once fine-tuning started, the EMA decoder."""
        model = self.model
        return YonosSR(
            self.ema_unet,
            self.ema_vae if self.ema_vae is not None else model.vae,
            model.prompt_embeds,
            model.scheduler_config,
            scale=model.scale,
            lr_upsample=model.lr_upsample,
            one_step_start=model.one_step_start,
            latent_tile=model.latent_tile,
            provenance=model.provenance,
        ).to(self.ctx.device)

    def eval_upscaler(self, ctx: TrainContext) -> Any:
        # validation pairs are at model.scale: earlier stages' models run at it too (LR upsampled to any size)
        return YonosUpscaler(
            self.inference_model(),
            scale=ctx.config.model.scale,
            device=ctx.device,
            dtype=torch.float32,
            tiles=TileSettings(tile=0),
            seed=0,
        )

    def state_dict(self) -> dict[str, Any]:
        decoding = self.stage >= self.unet_stages
        state: dict[str, Any] = {
            "stage": self.stage,
            "student": None if decoding else self.model.unet.state_dict(),
            "ema_unet": self.ema_unet.state_dict(),
            "teacher": self.teacher.state_dict() if self.teacher is not None else None,
            "opt": self.opt.state_dict(),
            "sched": self.sched.state_dict(),
        }
        if decoding:
            state["vae"] = self.model.vae.state_dict()
            state["ema_vae"] = self.ema_vae.state_dict()
            if self.disc is not None:
                state["disc"] = self.disc.state_dict()
                state["opt_disc"] = self.opt_disc.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        stage = int(state["stage"])
        if not 0 <= stage <= self.unet_stages:
            raise ConfigError(
                f"checkpoint is at YONOS stage {stage}, but this config has {self.unet_stages} stages"
            )
        if (state["teacher"] is not None) != (0 < stage < self.unet_stages):
            raise ConfigError(f"checkpoint stage {stage} does not fit yonos.stages {list(self.cfg.stages)}")
        self.start_stage(stage)
        self.ema_unet.load_state_dict(state["ema_unet"])
        if state["student"] is not None:
            self.model.unet.load_state_dict(state["student"])
        if self.teacher is not None:
            self.teacher.load_state_dict(state["teacher"])
        if stage >= self.unet_stages:
            self.model.vae.load_state_dict(state["vae"])
            self.ema_vae.load_state_dict(state["ema_vae"])
            if self.disc is not None:
                self.disc.load_state_dict(state["disc"])
                self.opt_disc.load_state_dict(state["opt_disc"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])

    def export(self, ctx: TrainContext, path: Path, step: int) -> Path:
        """A self-describing ``yonos-sd`` safetensors: EMA UNet, VAE (EMA decoder once fine-tuned), prompt."""
        model = self.inference_model()
        metadata = {
            "method": "yonos-sr",
            "step": str(step),
            "stage": self.stage_label(),
            "scale": str(model.scale),
            "base": self.cfg.base,
            "decoder": "fine-tuned" if self.ema_vae is not None else "base",
            "prediction": model.prediction,
        }
        return export_safetensors(model, path, None, metadata)
