"""The RSD trainer end to end on CPU with tiny random-weight models: losses, export → upscale, resume, DDP."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from distill_fixtures import make_workspace, tiny_config, tiny_overrides
from PIL import Image

from sr1step.cli import run
from sr1step.distill.rsd import RSDMethod
from sr1step.distill.trainer import DistEnv, Trainer, list_checkpoints
from sr1step.errors import DatasetError, Sr1stepError

CPU = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("distill"))


def _train(ws, run_dir: Path, resume: bool = False, **settings) -> Trainer:
    method = RSDMethod()
    trainer = Trainer(
        tiny_config(ws, **settings), method, run_dir, env=CPU, lpips_pretrained=False, progress=False
    )
    trainer.run(resume=resume)
    return trainer


def _log_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "log.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _checkpoint_state(run_dir: Path) -> dict:
    _, path = list_checkpoints(run_dir)[-1]
    return torch.load(path, map_location="cpu", weights_only=False)["method_state"]


def _assert_same_models(a: dict, b: dict, atol: float = 0.0) -> None:
    for part in ("student", "fake", "ema"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            if atol:
                torch.testing.assert_close(a[part][key], b[part][key], rtol=0, atol=atol, msg=f"{part}.{key}")
            else:
                assert torch.equal(a[part][key], b[part][key]), f"{part}.{key}"


@pytest.mark.slow
def test_tiny_rsd_run_losses_fake_learning_and_export(ws, tmp_path, capsys):
    run_dir = tmp_path / "run"
    trainer = _train(
        ws,
        run_dir,
        **{"train.iterations": 2, "rsd.n_fake_loop": 3, "data.val_dir": str(ws["val"]), "train.val_freq": 1},
    )
    rows = _log_rows(run_dir)
    losses = [float(v) for row in rows for k, v in row.items() if v and k not in ("step", "time")]
    assert losses and all(math.isfinite(v) for v in losses)
    assert len(trainer.method.fake_history) == 6  # K = 3 fake updates per student update
    assert {"student/distill", "student/lpips", "student/g_loss", "fake/d_loss"} <= set(rows[0])
    assert any(row.get("val/psnr_y") for row in rows) and (run_dir / "val").is_dir()
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["method"] == "rsd" and saved["train"]["iterations"] == 2
    # the export loads in upscale and produces an image
    student = run_dir / "student.safetensors"
    Image.fromarray(np.full((20, 24, 3), 128, np.uint8)).save(tmp_path / "in.png")
    code = run(
        [
            "upscale",
            str(tmp_path / "in.png"),
            "--model",
            str(student),
            "--vae",
            str(ws["vq"]),
            "-o",
            str(tmp_path / "out"),
            "--seed",
            "0",
            "-q",
        ]
    )
    assert code == 0 and Image.open(tmp_path / "out" / "in_x4.png").size == (96, 80)


def test_fake_diffusion_loss_decreases_over_its_updates(ws, tmp_path):
    """With the student fixed, the fake's x0-regression on a fixed batch falls as it is updated."""
    from sr1step.distill.trainer import TrainContext

    ctx = TrainContext(tiny_config(ws, **{"rsd.lpips_weight": 0}), CPU, tmp_path, lpips_pretrained=False)
    method = RSDMethod()
    method.setup(ctx)
    ctx.setup_data()
    probe = ctx.fetch()

    def probe_loss() -> float:
        with torch.no_grad():
            return float(method.fake_loss(ctx, probe)[1]["fake/regression"].mean())

    before = probe_loss()
    for _ in range(8):
        method.opt_fake.zero_grad(set_to_none=True)
        ctx.accumulate(method.fake_ddp, ctx.fetch(), lambda b: method.fake_loss(ctx, b))
        method.opt_fake.step()
    assert probe_loss() < 0.9 * before


@pytest.mark.slow
def test_resume_continues_exactly(ws, tmp_path):
    """Run 4 iterations at once == run 2, stop, resume to 4 (CPU, fixed seeds)."""
    straight = _train(ws, tmp_path / "straight", **{"train.iterations": 4})
    _train(ws, tmp_path / "split", **{"train.iterations": 2})
    assert [step for step, _ in list_checkpoints(tmp_path / "split")] == [2]
    resumed = _train(ws, tmp_path / "split", resume=True, **{"train.iterations": 4})
    assert resumed.step == 4 and straight.step == 4
    _assert_same_models(_checkpoint_state(tmp_path / "straight"), _checkpoint_state(tmp_path / "split"))


LAUNCHER = """
import sys
import torch

# AdamW's first steps are ~lr·sign(g): float-rounding differences in near-zero gradients (summation order of the
# all-reduce vs. local accumulation) flip signs. Plain SGD keeps parameters linear in the gradients, so this test
# compares what DDP must get right: the gradients of the global batch.
torch.optim.AdamW = lambda params, lr, betas, weight_decay: torch.optim.SGD(params, lr=lr)
from sr1step.cli import main

sys.argv = ["sr1step", *sys.argv[1:]]
main()
"""


@pytest.mark.slow
def test_ddp_two_processes_match_one(ws, tmp_path):
    """torchrun --nproc_per_node 2 (gloo, CPU) gives the parameters of 1 process with the same global batch."""
    settings = {
        "train.iterations": 2,
        "train.microbatch": 1,
        "data.degradation_grouping": "sample",
        "rsd.n_fake_loop": 1,
        "train.lr": 0.05,
    }
    args = ["distill", "--lpips-random-backbone", "-q"]
    for item in tiny_overrides(ws, **settings):
        args += ["--set", item]
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    single, double = tmp_path / "single", tmp_path / "double"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    common = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    for nproc, out in ((1, single), (2, double)):
        proc = subprocess.run(
            [*common, f"--nproc_per_node={nproc}", str(launcher), *args, "--out", str(out)],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _checkpoint_state(single), _checkpoint_state(double)
    _assert_same_models(a, b, atol=1e-5)
    # and training moved the parameters well beyond that tolerance
    moved = max(
        (a["student"][k] - b["ema"][k]).abs().max().item()
        for k in a["student"]
        if a["student"][k].dtype.is_floating_point and "attn_mask" not in k
    )
    assert moved > 1e-3


def test_checkpoint_write_failure_keeps_the_previous_one(ws, tmp_path, monkeypatch):
    trainer = _train(ws, tmp_path / "run", **{"train.iterations": 2})
    before = list_checkpoints(tmp_path / "run")
    assert len(before) == 1

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    trainer.step = 3
    with pytest.raises(
        Sr1stepError, match="no space left on device.*previous checkpoint .*step_0000002.pt is kept"
    ):
        trainer.save_checkpoint()
    assert list_checkpoints(tmp_path / "run") == before
    assert not [p for p in (tmp_path / "run" / "ckpts").iterdir() if p.name.endswith(".tmp")]


def test_clear_errors(ws, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="no images"):
        _train(ws, tmp_path / "r1", **{"data.dirs": f'["{empty}"]'})
    code = run(
        [
            "distill",
            "--out",
            str(tmp_path / "r2"),
            "--data",
            str(ws["hr"]),
            "--teacher-weights",
            str(tmp_path / "missing.pth"),
            "--offline",
            "-q",
        ]
    )
    assert code == 1 and "teacher weights" in capsys.readouterr().err
    assert run(["distill", "--out", str(tmp_path / "r3"), "--resume", "-q"]) == 1
    assert run(["distill", "--out", str(tmp_path / "r4"), "--set", "train.lr=fast", "-q"]) == 1
    assert "train.lr must be a number" in capsys.readouterr().err
    assert run(["distill", "--out", str(tmp_path / "r5"), "--set", "train.nope=1", "-q"]) == 1
    assert "unknown setting train.nope" in capsys.readouterr().err


def test_unreadable_images_are_skipped_and_counted(ws, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for path in list(ws["hr"].rglob("*.png"))[:6]:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "broken.png").write_bytes(b"not an image")
    (folder / "broken2.png").write_bytes(b"")
    trainer = _train(
        ws,
        tmp_path / "run",
        **{"data.dirs": f'["{folder}"]', "train.iterations": 1, "rsd.n_fake_loop": 1, "rsd.lpips_weight": 0},
    )
    rows = _log_rows(tmp_path / "run")
    assert trainer.ctx.skipped_images >= 1 and float(rows[-1]["skipped_images"]) >= 1


def test_validation_upscaler_keeps_the_training_vq_precision(ws, tmp_path):
    """The Upscaler moves modules in place: validation must not turn a half-precision training VQ into fp32."""
    from sr1step.checkpoints import InferenceSpec
    from sr1step.distill.trainer import TrainContext

    ctx = TrainContext(tiny_config(ws, **{"train.vq_dtype": "bf16"}), CPU, tmp_path, lpips_pretrained=False)
    assert next(ctx.vq.parameters()).dtype == torch.bfloat16
    upscaler = ctx.upscaler_for(ctx.teacher, InferenceSpec(family="sinsr"))
    assert upscaler.dtype == torch.bfloat16
    assert next(ctx.vq.parameters()).dtype == torch.bfloat16
