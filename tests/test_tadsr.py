"""TAD-SR: discriminator taps, the G/D updates' gradient paths, the teacher target, and a tiny end-to-end run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from distill_fixtures import make_workspace, tiny_config
from PIL import Image

from sr1step import diffusion as D
from sr1step.cli import run
from sr1step.distill.tadsr import TADSRMethod, TimeAwareDiscriminator, tap_channels
from sr1step.distill.trainer import DistEnv, TrainContext, Trainer
from sr1step.models import ResShiftUNet

CPU = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
TINY_TAPS = '["input_blocks.1", "input_blocks.3", "middle_block"]'


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("tadsr"))


def _config(ws, **extra):
    settings = {"tadsr.disc_taps": TINY_TAPS, "train.batch": 2, "train.microbatch": 2, "tadsr.disc_logits": 8}
    settings.update(extra)
    return tiny_config(ws, "tad-sr", **settings)


def test_real_teacher_taps_have_the_documented_shapes():
    """input_blocks.3/6/9/11 and the middle block of the x4 teacher: 160@32², 320@16², 320@8², 640@8², 640@8²."""
    with torch.device("meta"):
        teacher = ResShiftUNet()
    features = teacher.encoder_features(
        torch.empty(1, 3, 64, 64, device="meta"),
        torch.zeros(1, dtype=torch.long, device="meta"),
        torch.empty(1, 3, 64, 64, device="meta"),
    )
    shapes = {
        tap: tuple(features[tap].shape[1:])
        for tap in ("input_blocks.3", "input_blocks.6", "input_blocks.9", "input_blocks.11", "middle_block")
    }
    assert shapes == {
        "input_blocks.3": (160, 32, 32),
        "input_blocks.6": (320, 16, 16),
        "input_blocks.9": (320, 8, 8),
        "input_blocks.11": (640, 8, 8),
        "middle_block": (640, 8, 8),
    }
    disc = TimeAwareDiscriminator({k: v[0] for k, v in shapes.items()}, 160, 64)
    assert [h.film[1].out_features for h in disc.heads] == [
        320,
        640,
        640,
        1280,
        1280,
    ]  # FiLM scale+shift per tap


def test_unknown_tap_is_a_clear_error(ws):
    from sr1step.errors import ConfigError

    teacher = TrainContext(_config(ws), CPU, ws["root"]).teacher
    with pytest.raises(ConfigError, match="input_blocks.9"):
        tap_channels(teacher, ("input_blocks.9",), 16)


@pytest.fixture(scope="module")
def method(ws, tmp_path_factory):
    ctx = TrainContext(_config(ws), CPU, tmp_path_factory.mktemp("tad_ctx"), lpips_pretrained=False)
    tad = TADSRMethod()
    tad.setup(ctx)
    ctx.setup_data()
    return tad, ctx, ctx.fetch()


def test_discriminator_logits_and_hinge_update(method):
    tad, ctx, batch = method
    tad.disc.zero_grad(set_to_none=True)
    loss, logs = tad.disc_loss(ctx, batch)
    loss.mean().backward()
    assert loss.shape == (2,) and torch.isfinite(loss).all()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tad.disc.parameters())
    assert all(p.grad is None for p in ctx.teacher.parameters())
    assert all(p.grad is None for p in tad.student.parameters())  # D step: the student is not trained


def test_student_update_gradients_reach_student_only(method):
    tad, ctx, batch = method
    tad.disc.zero_grad(set_to_none=True)
    tad.disc.requires_grad_(False)
    tad.student.zero_grad(set_to_none=True)
    loss, logs = tad.student_loss(ctx, batch)
    loss.mean().backward()
    tad.disc.requires_grad_(True)
    assert {"student/reg", "student/hsd", "student/adv"} <= set(logs)
    assert all(torch.isfinite(v).all() for v in logs.values())
    assert all(p.grad is None for p in ctx.teacher.parameters())  # the frozen teacher keeps no gradients
    assert all(p.grad is None for p in tad.disc.parameters())
    assert sum(float(p.grad.abs().sum()) for p in tad.student.parameters() if p.grad is not None) > 0


def test_regression_target_is_the_teachers_ddim_output_from_the_same_prior(method):
    tad, ctx, batch = method
    p = tad._prior(ctx, batch)
    with torch.no_grad():
        expected = D.sample_ddim(ctx.schedule, D.unet_denoiser(ctx.teacher, batch.lr), p["zy"], p["eps"])
        x0 = tad.student(p["x_in"], p["last"], batch.lr)
    direct = ((x0 - expected) ** 2).mean(dim=(1, 2, 3))
    # the student starts as the teacher, so its one-step output differs from the 15-step target
    assert direct.min() > 0
    logs = tad.student_loss(ctx, batch)[1]
    torch.testing.assert_close(logs["student/reg"], direct, rtol=1e-5, atol=1e-6)


def test_uniform_perturbation_option(ws, tmp_path):
    ctx = TrainContext(
        _config(ws, **{"tadsr.perturbation": "uniform"}), CPU, tmp_path, lpips_pretrained=False
    )
    tad = TADSRMethod()
    tad.setup(ctx)
    draw = tad._perturbation(ctx, [1, 2], (3, 4, 4), "x")
    assert draw.min() >= 0 and draw.max() < 1


@pytest.mark.slow
def test_tiny_tadsr_run_export_and_tiled_upscale(ws, tmp_path):
    run_dir = tmp_path / "run"
    config = _config(ws, **{"train.iterations": 2, "train.warmup": 2})
    trainer = Trainer(config, TADSRMethod(), run_dir, env=CPU, lpips_pretrained=False, progress=False)
    exported = trainer.run()
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["method"] == "tad-sr" and saved["tadsr"]["perturbation"] == "gaussian"
    # an image larger than one tile: 40×56 LR with 32-px tiles
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(
        tmp_path / "a.png"
    )
    code = run(
        [
            "upscale",
            str(tmp_path / "a.png"),
            "--model",
            str(exported),
            "--vae",
            str(ws["vq"]),
            "--tile",
            "32",
            "--overlap",
            "8",
            "-o",
            str(tmp_path / "out"),
            "--json",
            "-q",
        ]
    )
    assert code == 0
    out = Image.open(tmp_path / "out" / "a_x4.png")
    assert out.size == (224, 160)
