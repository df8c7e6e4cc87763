"""The distillation trainer: one loop that every method (RSD, TAD-SR, YONOS-SR) plugs into.

The trainer owns what methods share: the process group (torchrun / DDP, or one process), data (HR folders with
the on-device Real-ESRGAN degradation and the training-pair pool, or paired folders), per-sample random draws,
micro-batching with gradient accumulation (``no_sync`` on all but the last micro-step), checkpoints (atomic,
exact resume: models, optimizers, EMA, counters, RNG and sampler/pool states), validation, logging (rich progress,
CSV, TensorBoard when installed) and the export. A method (:class:`DistillMethod`) owns its networks, optimizers
and losses, and runs one outer iteration per call.

Random draws that belong to a sample (timesteps, noises) come from generators keyed by (seed, batch counter,
global position of the sample in the global batch). They do not depend on how the global batch is split over
ranks or micro-batches, so 2 processes reproduce 1 process with the same global batch.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import errno
import json
import math
import os
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from sr1step.distill.config import DistillConfig, choices_not_from_paper
from sr1step.distill.data import BatchStream, HRFolderDataset, PairedFolderDataset, derive_seed
from sr1step.distill.degradations import TrainingPairPool, degrade
from sr1step.errors import CheckpointError, ConfigError, DatasetError, Sr1stepError
from sr1step.fsio import atomic_path, atomic_write_text
from sr1step.pairing import check_sizes, pair_by_name, upright_size

CHECKPOINT_PATTERN = re.compile(r"step_(\d+)\.pt$")
CHECKPOINT_FORMAT = 1


# --------------------------------------------------------------------------------------------- process group


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistEnv:
    """One process, or the process group torchrun describes in the environment (NCCL on CUDA, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        raise ConfigError(f"distill runs on cuda or cpu, got device {device!r}")
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("device cuda requested but no CUDA device is available")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=60))
    if use_cuda:
        torch_device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(torch_device)
    else:
        torch_device = torch.device("cpu")
    return DistEnv(rank, world_size, local_rank, torch_device)


# --------------------------------------------------------------------------------------------- batches & RNG


@dataclass
class Batch:
    """A per-rank batch: HR and LR in [-1, 1] on the device (LR None when not asked for), one random key per sample."""

    hr: Tensor
    lr: Tensor | None
    keys: list[int]

    def __len__(self) -> int:
        return len(self.keys)

    def split(self, size: int) -> list[Batch]:
        return [
            Batch(
                self.hr[i : i + size],
                None if self.lr is None else self.lr[i : i + size],
                self.keys[i : i + size],
            )
            for i in range(0, len(self), size)
        ]


class KeyedRandom:
    """Per-sample draws from generators keyed by (sample key, tag): independent of batching and rank."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    @staticmethod
    def _generator(key: int, tag: str) -> torch.Generator:
        tag_id = int.from_bytes(tag.encode()[:16].ljust(16, b"\0"), "little") % (2**62)
        return torch.Generator().manual_seed(derive_seed(key, tag_id))

    def randn(self, keys: Sequence[int], shape: Sequence[int], tag: str) -> Tensor:
        return torch.stack([torch.randn(*shape, generator=self._generator(k, tag)) for k in keys]).to(
            self.device
        )

    def rand(self, keys: Sequence[int], shape: Sequence[int], tag: str) -> Tensor:
        return torch.stack([torch.rand(*shape, generator=self._generator(k, tag)) for k in keys]).to(
            self.device
        )

    def choice(self, keys: Sequence[int], values: Sequence[int], tag: str) -> Tensor:
        picks = [int(torch.randint(len(values), (1,), generator=self._generator(k, tag))) for k in keys]
        return torch.tensor([values[p] for p in picks], dtype=torch.long, device=self.device)

    def randint(self, keys: Sequence[int], high: int, tag: str) -> Tensor:
        return self.choice(keys, list(range(high)), tag)


def ema_update(ema: nn.Module, model: nn.Module, rate: float) -> None:
    """ema ← rate·ema + (1−rate)·model for float tensors; other buffers (e.g. index tables) are copied."""
    with torch.no_grad():
        model_state = model.state_dict()
        for name, value in ema.state_dict().items():
            source = model_state[name]
            if value.dtype.is_floating_point and not name.endswith("attn_mask"):
                value.mul_(rate).add_(source.detach().to(value.dtype), alpha=1 - rate)
            else:
                value.copy_(source)


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


# --------------------------------------------------------------------------------------------- method protocol


class DistillMethod(Protocol):
    """A distillation method: networks, optimizers and losses; the trainer runs the loop around it."""

    name: str

    def setup(self, ctx: TrainContext) -> None: ...

    def train_step(self, ctx: TrainContext, step: int) -> dict[str, float]: ...

    def eval_upscaler(self, ctx: TrainContext) -> Any:
        """An Upscaler around the model to validate (the EMA student), see :meth:`TrainContext.upscaler_for`."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def export(self, ctx: TrainContext, path: Path, step: int) -> Path: ...


# --------------------------------------------------------------------------------------------- context


class TrainContext:
    """What a method may use: config, devices, frozen shared models, data, random draws, accumulation."""

    def __init__(
        self,
        config: DistillConfig,
        env: DistEnv,
        run_dir: Path,
        offline: bool = False,
        lpips_pretrained: bool = True,
    ) -> None:
        self.config = config
        self.env = env
        self.device = env.device
        self.run_dir = run_dir
        self.offline = offline
        self.lpips_pretrained = lpips_pretrained
        self.random = KeyedRandom(env.device)
        self.batches_drawn = 0  # global batch counter (identical on every rank)
        self.skipped_images = 0
        self._teacher: nn.Module | None = None
        self._vq: nn.Module | None = None
        self._lpips: nn.Module | None = None
        self._schedule = None
        self._data_ready = False

    # ---- precision
    @property
    def vq_dtype(self) -> torch.dtype:
        name = self.config.train.vq_dtype
        if name == "auto":
            return torch.float16 if self.device.type == "cuda" else torch.float32
        return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]

    # ---- frozen shared models (ResShift-family methods)
    @property
    def schedule(self):  # noqa: ANN201 - ResShiftSchedule, imported lazily
        if self._schedule is None:
            from sr1step.diffusion import ResShiftSchedule

            self._schedule = ResShiftSchedule.preset("s15")
        return self._schedule

    def _load(self, spec: str, arch: str, what: str) -> nn.Module:
        from sr1step import weights
        from sr1step.checkpoints import load_model

        try:
            resolved = weights.resolve_model(spec, offline=self.offline, progress=self.env.is_main)
        except Sr1stepError as exc:
            raise Sr1stepError(
                f"{what} weights {spec!r} are not available: {exc} (download them with 'sr1step weights download "
                f"{spec}' or pass a local file)"
            ) from None
        return load_model(weights.converted_path(resolved), expect=arch).module

    @property
    def teacher(self) -> nn.Module:
        """The frozen ResShift teacher (parameters never receive gradients; inputs may)."""
        if self._teacher is None:
            teacher = self._load(self.config.model.teacher_weights, "resshift-unet", "teacher")
            if teacher.config.noise_channels:
                raise ConfigError(
                    f"{self.config.model.teacher_weights}: a teacher must not have a noise input"
                )
            self._teacher = teacher.to(self.device).eval().requires_grad_(False)
        return self._teacher

    @property
    def vq(self) -> nn.Module:
        if self._vq is None:
            vq = self._load(self.config.model.vae, "vq-autoencoder", "autoencoder")
            self._vq = vq.to(self.device, self.vq_dtype).eval().requires_grad_(False)
        return self._vq

    @property
    def lpips(self) -> nn.Module:
        if self._lpips is None:
            from sr1step.distill.lpips import load_lpips

            # Seeded the same on every rank and run, so a random-backbone LPIPS (tests) is identical everywhere.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.config.train.seed)
                module = load_lpips(pretrained_backbone=self.lpips_pretrained, offline=self.offline)
            self._lpips = module.to(self.device)
        return self._lpips

    def encode(self, images: Tensor) -> Tensor:
        """VQ latent of images in [-1, 1] (no gradient), float32."""
        with torch.no_grad():
            return self.vq.encode(images.to(self.vq_dtype)).float()

    def upsample(self, lr: Tensor) -> Tensor:
        return F.interpolate(lr, scale_factor=self.config.model.scale, mode="bicubic", align_corners=False)

    def decode_with_grad(self, z: Tensor) -> Tensor:
        """Decode with a straight-through codebook snap, so gradients reach z through the frozen decoder."""
        from sr1step.distill.losses import straight_through_quantize

        vq = self.vq
        z = straight_through_quantize(vq.quantize, z.to(self.vq_dtype))
        return vq.decode(z, quantize=False).float()

    # ---- optimizers
    def optimizer(self, params: Any, lr: float | None = None) -> torch.optim.Optimizer:
        """AdamW with the train section's betas and weight decay (``lr`` defaults to ``train.lr``)."""
        train = self.config.train
        return torch.optim.AdamW(
            params,
            lr=train.lr if lr is None else lr,
            betas=tuple(train.betas),
            weight_decay=train.weight_decay,
        )

    def warmup_schedule(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        """The train section's linear learning-rate warm-up (constant when ``train.warmup`` is 0)."""
        warmup = self.config.train.warmup
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0
        )

    # ---- DDP
    def wrap(self, module: nn.Module) -> nn.Module:
        module = module.to(self.device)
        if not self.env.distributed:
            return module
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False)

    # ---- data
    def setup_data(self) -> None:
        cfg, env = self.config, self.env
        per_rank = cfg.train.batch // env.world_size
        if per_rank * env.world_size != cfg.train.batch:
            raise ConfigError(
                f"train.batch {cfg.train.batch} is not divisible by the {env.world_size} processes"
            )
        self.per_rank_batch = per_rank
        self.paired = cfg.data.paired_lq is not None
        if self.paired:
            dataset = PairedFolderDataset(
                Path(cfg.data.paired_lq),
                Path(cfg.data.paired_gt),
                cfg.model.scale,
                crop_size=cfg.data.gt_size,
                flip=True,
                seed=cfg.train.seed,
            )
        else:
            if not cfg.data.dirs:
                raise DatasetError("no training data: pass --data DIR (folders of HR images)")
            dataset = HRFolderDataset(
                [Path(d) for d in cfg.data.dirs], size=cfg.data.gt_size, seed=cfg.train.seed
            )
        self.stream = BatchStream(
            dataset,
            per_rank,
            seed=cfg.train.seed,
            rank=env.rank,
            world_size=env.world_size,
            num_workers=cfg.train.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        self.degrade_generator = torch.Generator().manual_seed(derive_seed(cfg.train.seed, env.rank, 1))
        pool_size = cfg.data.degradation.pool_batches * per_rank
        use_pool = not self.paired and cfg.data.degradation_grouping == "batch" and pool_size > 0
        self.pool = (
            TrainingPairPool(pool_size, seed=derive_seed(cfg.train.seed, env.rank, 2)) if use_pool else None
        )
        self._data_ready = True

    def fetch(self, degrade_lr: bool = True) -> Batch:
        """The next per-rank batch, degraded on the device (Real-ESRGAN) unless the data is paired.

        ``degrade_lr=False``: HR only (methods that make their own LR versions, e.g. YONOS-SR's scale chain).
        """
        if not self._data_ready:
            self.setup_data()
        cfg, env = self.config, self.env
        raw = next(self.stream)
        index = self.batches_drawn
        self.batches_drawn += 1
        gt = raw["gt"].to(self.device, non_blocking=True).float()
        # global position of this rank's j-th sample: the sampler hands out rank::world_size strides
        keys = [derive_seed(cfg.train.seed, index, j * env.world_size + env.rank) for j in range(gt.shape[0])]
        if not degrade_lr and not self.paired:
            self.skipped_images = self.stream.skipped
            return Batch(hr=gt * 2 - 1, lr=None, keys=keys)
        if self.paired:
            lq = raw["lq"].to(self.device, non_blocking=True).float()
        elif cfg.data.degradation_grouping == "sample":
            pairs = [
                degrade(
                    gt[j : j + 1], cfg.data.degradation, torch.Generator().manual_seed(derive_seed(key, 7))
                )
                for j, key in enumerate(keys)
            ]
            lq, gt = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
        else:
            lq, gt = degrade(gt, cfg.data.degradation, self.degrade_generator)
            if self.pool is not None:
                lq, gt = self.pool.exchange(lq, gt)
        if cfg.train.drop_nonfinite:
            finite = torch.isfinite(lq).flatten(1).all(dim=1)
            if not bool(finite.all()):
                keep = finite.nonzero().flatten().tolist()
                lq, gt, keys = lq[keep], gt[keep], [keys[i] for i in keep]
        self.skipped_images = self.stream.skipped
        return Batch(hr=gt * 2 - 1, lr=lq * 2 - 1, keys=keys)

    # ---- accumulation
    def accumulate(
        self, model: nn.Module, batch: Batch, loss_fn: Callable[[Batch], tuple[Tensor, dict[str, Tensor]]]
    ) -> dict[str, float]:
        """Run ``loss_fn`` over micro-batches and backpropagate sum(per-sample loss) / per-rank batch size.

        DDP then averages over ranks, so the gradient is that of the mean over the global batch. Every micro-step
        but the last runs under ``no_sync``. Returns the batch means of the logged terms.
        """
        micro = batch.split(self.config.train.microbatch)
        totals: dict[str, float] = {}
        count = max(1, len(batch))
        for i, part in enumerate(micro):
            sync = i == len(micro) - 1
            context = (
                model.no_sync()
                if (not sync and isinstance(model, nn.parallel.DistributedDataParallel))
                else contextlib.nullcontext()
            )
            with context:
                per_sample, logs = loss_fn(part)
                (per_sample.sum() / count).backward()
            for name, value in logs.items():
                totals[name] = totals.get(name, 0.0) + float(value.detach().sum()) / count
        return totals

    def upscaler_for(self, unet: nn.Module, inference: Any) -> Any:
        """An Upscaler around a (EMA) student for validation, sharing the frozen VQ."""
        from sr1step.pipeline import TileSettings, Upscaler

        # The VQ's training precision: Upscaler moves its modules in place and must not change the shared VQ.
        return Upscaler(
            unet=unet,
            vae=self.vq,
            inference=inference,
            scale=self.config.model.scale,
            device=self.device,
            dtype=self.vq_dtype,
            tiles=TileSettings(tile=0),
            seed=0,
        )

    def data_state(self) -> dict[str, Any]:
        return {
            "stream": self.stream.state_dict() if self._data_ready else None,
            "pool": self.pool.state_dict() if self._data_ready and self.pool is not None else None,
            "degrade_generator": self.degrade_generator.get_state() if self._data_ready else None,
        }

    def load_data_state(self, state: dict[str, Any]) -> None:
        if not self._data_ready:
            self.setup_data()
        if state["stream"] is not None:
            self.stream.load_state_dict(state["stream"])
        if state["pool"] is not None and self.pool is not None:
            self.pool.load_state_dict(state["pool"])
        if state["degrade_generator"] is not None:
            self.degrade_generator.set_state(state["degrade_generator"])


# --------------------------------------------------------------------------------------------- logging


class MetricsLog:
    """CSV (always) and TensorBoard (when installed) on the main rank."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.path = run_dir / "log.csv"
        self.tb = None
        if enabled:
            with contextlib.suppress(ImportError, ModuleNotFoundError):
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tb"))

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3), **{k: f"{v:.6g}" for k, v in values.items()}}
        existing = self.path.is_file() and self.path.stat().st_size > 0
        fieldnames = list(row)
        if existing:
            with open(self.path, newline="") as handle:
                header = next(csv.reader(handle), [])
            fieldnames = header + [k for k in row if k not in header]
            if fieldnames != header:  # new columns (e.g. validation metrics): rewrite with the wider header
                with open(self.path, newline="") as handle:
                    rows = list(csv.DictReader(handle))
                with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as handle:
                    writer = csv.DictWriter(handle, fieldnames=fieldnames)
                    writer.writeheader()
                    writer.writerows(rows)
                existing = True
        with open(self.path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fieldnames)
            if not existing:
                writer.writeheader()
            writer.writerow(row)
        if self.tb is not None:
            for name, value in values.items():
                self.tb.add_scalar(name, value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# --------------------------------------------------------------------------------------------- trainer


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    folder = run_dir / "ckpts"
    found = []
    if folder.is_dir():
        for path in folder.iterdir():
            match = CHECKPOINT_PATTERN.search(path.name)
            if match and not path.name.startswith("."):
                found.append((int(match.group(1)), path))
    return sorted(found)


class Trainer:
    """Runs a :class:`DistillMethod` for ``config.train.iterations`` outer iterations."""

    def __init__(
        self,
        config: DistillConfig,
        method: DistillMethod,
        run_dir: Path,
        *,
        env: DistEnv | None = None,
        offline: bool = False,
        lpips_pretrained: bool = True,
        progress: bool = True,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.method = method
        self.run_dir = Path(run_dir)
        self.env = env or init_distributed(config.train.device)
        self.ctx = TrainContext(
            config, self.env, self.run_dir, offline=offline, lpips_pretrained=lpips_pretrained
        )
        self.progress = progress and self.env.is_main
        self.log = log or (lambda message: None)
        self.step = 0
        self.metrics = MetricsLog(self.run_dir, self.env.is_main)

    # ---- checkpoints
    def _gather(self, value: Any) -> list[Any]:
        if not self.env.distributed:
            return [value]
        gathered: list[Any] = [None] * self.env.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def save_checkpoint(self) -> Path | None:
        """Write ``ckpts/step_N.pt`` atomically (all ranks' data states inside); keep the newest few."""
        data_states = self._gather(self.ctx.data_state())
        rng_states = self._gather(_rng_state())
        if not self.env.is_main:
            return None
        folder = self.run_dir / "ckpts"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step_{self.step:07d}.pt"
        state = {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "batches_drawn": self.ctx.batches_drawn,
            "method": self.method.name,
            "method_state": self.method.state_dict(),
            "data": data_states,
            "rng": rng_states,
            "config": self.config.to_dict(),
        }
        try:
            with atomic_path(path) as tmp:
                torch.save(state, tmp)
        except OSError as exc:
            previous = list_checkpoints(self.run_dir)
            kept = f"; the previous checkpoint {previous[-1][1]} is kept" if previous else ""
            reason = "no space left on device" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
            raise Sr1stepError(f"{path}: cannot write the checkpoint ({reason}){kept}") from None
        for _, old in list_checkpoints(self.run_dir)[: -self.config.train.keep_checkpoints]:
            old.unlink(missing_ok=True)
        return path

    def load_checkpoint(self, path: Path) -> None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001 - torch raises many types for damaged files
            raise CheckpointError(
                f"{path}: cannot read the training checkpoint ({str(exc).splitlines()[0]})"
            ) from None
        if state.get("format") != CHECKPOINT_FORMAT or state.get("method") != self.method.name:
            raise CheckpointError(
                f"{path}: not a {self.method.name} training checkpoint of this sr1step version"
            )
        if len(state["data"]) != self.env.world_size:
            raise CheckpointError(
                f"{path}: saved with {len(state['data'])} processes, resumed with {self.env.world_size}; "
                "resume with the same number of processes"
            )
        self.method.load_state_dict(state["method_state"])
        self.ctx.load_data_state(state["data"][self.env.rank])
        _set_rng_state(state["rng"][self.env.rank])
        self.step = int(state["step"])
        self.ctx.batches_drawn = int(state["batches_drawn"])

    # ---- validation
    def validate(self) -> dict[str, float]:
        """One-step EMA student on the held-out pairs: PSNR/SSIM (Y) and LPIPS; a grid image is saved."""
        cfg = self.config
        if not self.env.is_main or not cfg.data.val_dir:
            return {}
        from sr1step.eval.metrics import psnr_y, ssim_y
        from sr1step.imageio import read_image, write_image

        val = Path(cfg.data.val_dir)
        pairs = pair_by_name(val / "lr", val / "hr", "validation LR", "validation HR")[: cfg.data.val_images]
        check_sizes(pairs, "validation LR", "validation HR", scale=cfg.model.scale, size_of=upright_size)
        upscaler = self.method.eval_upscaler(self.ctx)
        psnrs, ssims, lpipses, rows = [], [], [], []
        for pair in pairs:
            lr = read_image(pair.left).rgb
            hr = read_image(pair.right).rgb
            sr = upscaler.upscale_array(lr, out_dtype=np.float32, seed=0).image
            sr8, hr8 = np.rint(sr * 255).astype(np.uint8), np.rint(hr * 255).astype(np.uint8)
            psnrs.append(psnr_y(sr8, hr8))
            ssims.append(ssim_y(sr8, hr8))
            with torch.no_grad():
                to_t = lambda a: torch.from_numpy(a).permute(2, 0, 1)[None].to(self.ctx.device) * 2 - 1  # noqa: E731
                lpipses.append(
                    float(self.ctx.lpips(to_t(sr8 / 255.0).float(), to_t(hr8 / 255.0).float()).mean())
                )
            if len(rows) < 4:
                bicubic = (
                    F.interpolate(
                        torch.from_numpy(lr).permute(2, 0, 1)[None],
                        size=hr.shape[:2],
                        mode="bicubic",
                        align_corners=False,
                    )[0]
                    .permute(1, 2, 0)
                    .numpy()
                )
                rows.append(np.concatenate([np.clip(bicubic, 0, 1), sr, hr], axis=1))
        grid = np.concatenate(rows, axis=0)
        (self.run_dir / "val").mkdir(exist_ok=True)
        write_image(self.run_dir / "val" / f"step_{self.step:07d}.png", grid)
        return {
            "val/psnr_y": float(np.mean(psnrs)),
            "val/ssim_y": float(np.mean(ssims)),
            "val/lpips": float(np.mean(lpipses)),
        }

    # ---- export
    def export(self) -> Path | None:
        if not self.env.is_main:
            return None
        return self.method.export(self.ctx, self.run_dir / "student.safetensors", self.step)

    # ---- loop
    def run(self, resume: bool = False) -> Path | None:
        cfg = self.config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(derive_seed(cfg.train.seed, self.env.rank))
        self.method.setup(self.ctx)
        if resume:
            found = list_checkpoints(self.run_dir)
            if not found:
                raise CheckpointError(
                    f"{self.run_dir}: --resume but no checkpoint in {self.run_dir / 'ckpts'}"
                )
            self.load_checkpoint(found[-1][1])
            self.log(f"resumed from {found[-1][1]} (step {self.step})")
        else:
            self.ctx.setup_data()
        if self.env.is_main:
            atomic_write_text(
                self.run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2, default=str) + "\n"
            )
            self.log(f"our choices (not from the paper): {', '.join(choices_not_from_paper(cfg.method))}")
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        columns = (
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[losses]}"),
        )
        started, start_step = time.perf_counter(), self.step
        with Progress(*columns, disable=not self.progress, transient=False) as progress:
            task = progress.add_task(
                f"distill {cfg.method}", total=cfg.train.iterations, completed=self.step, rate="", losses=""
            )
            while self.step < cfg.train.iterations:
                logs = self.method.train_step(self.ctx, self.step)
                self.step += 1
                for name, value in logs.items():
                    if not math.isfinite(value):
                        raise Sr1stepError(f"step {self.step}: loss '{name}' is {value}; training diverged")
                if self.step % cfg.train.log_freq == 0:
                    logs = dict(logs, skipped_images=float(self.ctx.skipped_images))
                    self.metrics.write(self.step, logs)
                rate = (self.step - start_step) / max(time.perf_counter() - started, 1e-9)
                shown = "  ".join(f"{k.split('/')[-1]} {v:.4g}" for k, v in list(logs.items())[:4])
                progress.update(task, completed=self.step, rate=f"{rate:.2f} it/s", losses=shown)
                if self.step % cfg.train.val_freq == 0 or self.step == cfg.train.iterations:
                    values = self.validate()
                    if values:
                        self.metrics.write(self.step, values)
                        self.log("validation: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
                if self.step % cfg.train.save_freq == 0 or self.step == cfg.train.iterations:
                    saved = self.save_checkpoint()
                    self.export()
                    if saved is not None:
                        self.log(f"checkpoint {saved}")
        exported = self.export()
        self.metrics.close()
        if self.env.distributed:
            dist.barrier()
        return exported
