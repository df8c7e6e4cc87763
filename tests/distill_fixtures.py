"""Shared set-up for the distillation tests: tiny teacher/VQ files, generated HR images, a config factory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from tiny import tiny_unet, tiny_vq

from sr1step.checkpoints import InferenceSpec, export_safetensors
from sr1step.distill.config import resolve_config


def make_workspace(root: Path, images: int = 8) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    teacher = export_safetensors(
        tiny_unet(seed=5), root / "teacher.safetensors", InferenceSpec(family="resshift", steps=15)
    )
    vq = export_safetensors(tiny_vq(seed=6), root / "vq.safetensors")
    rng = np.random.default_rng(0)
    hr = root / "hr" / "class_a"
    hr.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:80, 0:100] / 100
    for i in range(images):
        base = np.stack([xx * (i + 1) % 1, yy, 0.5 + 0.5 * np.sin(8 * xx + i)], -1)
        noisy = np.clip(base + rng.normal(0, 0.05, base.shape), 0, 1)
        Image.fromarray((noisy * 255).astype(np.uint8)).save(hr / f"img_{i}.png")
    val = root / "val"
    for sub in ("lr", "hr"):
        (val / sub).mkdir(parents=True, exist_ok=True)
    for i in range(2):
        img = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
        img.save(val / "hr" / f"v{i}.png")
        img.resize((16, 16), Image.Resampling.BICUBIC).save(val / "lr" / f"v{i}.png")
    return {"root": root, "teacher": teacher, "vq": vq, "hr": root / "hr", "val": val}


def tiny_overrides(ws: dict[str, Path], **extra: object) -> list[str]:
    settings = {
        "data.dirs": f'["{ws["hr"]}"]',
        "model.teacher_weights": str(ws["teacher"]),
        "model.vae": str(ws["vq"]),
        "data.gt_size": 64,
        "train.batch": 4,
        "train.microbatch": 2,
        "train.num_workers": 0,
        "train.lr": 1e-3,
        "train.save_freq": 2,
        "train.val_freq": 1000,
        "train.iterations": 2,
        "rsd.n_fake_loop": 2,
    }
    settings.update(extra)
    return [f"{key}={value}" for key, value in settings.items()]


def tiny_config(ws: dict[str, Path], method: str = "rsd", **extra: object):
    return resolve_config(method, None, tiny_overrides(ws, **extra))
