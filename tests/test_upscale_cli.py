"""`sr1step upscale` end to end with tiny local models: outputs, batch behaviour, I/O cases, exit codes."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from sr1step.cli import run


def _png(path, size=(24, 20), mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    data = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    if mode == "L":
        data = data[..., 0]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(data, mode).save(path)
    return path


@pytest.fixture
def pipeline_args(tiny_model_files):
    """Everything but the model: the tiny VAE, small tiles, a fixed seed."""
    return ["--vae", str(tiny_model_files["vae"]), "--tile", "32", "--overlap", "8", "--seed", "1"]


@pytest.fixture
def model_args(tiny_model_files, pipeline_args):
    return ["--model", str(tiny_model_files["unet"]), *pipeline_args]


def _records(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]


def test_upscale_one_file(tmp_path, model_args, capsys):
    src = _png(tmp_path / "in" / "photo.png")
    code = run(["upscale", str(src), "-o", str(tmp_path / "out"), "--json", *model_args])
    records = _records(capsys)
    assert code == 0
    assert records[0]["status"] == "ok" and records[0]["out_width"] == 96 and records[0]["out_height"] == 80
    out = Image.open(tmp_path / "out" / "photo_x4.png")
    assert out.size == (96, 80) and out.mode == "RGB"
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "out").iterdir())


def test_seed_makes_runs_reproducible(tmp_path, model_args):
    src = _png(tmp_path / "a.png")
    assert run(["upscale", str(src), "-o", str(tmp_path / "o1"), "-q", *model_args]) == 0
    assert run(["upscale", str(src), "-o", str(tmp_path / "o2"), "-q", *model_args]) == 0
    other = [*model_args[:-1], "2"]
    assert run(["upscale", str(src), "-o", str(tmp_path / "o3"), "-q", *other]) == 0
    one, two, three = (np.asarray(Image.open(tmp_path / d / "a_x4.png")) for d in ("o1", "o2", "o3"))
    assert np.array_equal(one, two) and not np.array_equal(one, three)


def test_folder_recursive_mirrors_and_skip_existing(tmp_path, model_args, capsys):
    _png(tmp_path / "in" / "x.png")
    _png(tmp_path / "in" / "sub" / "x.png", seed=1)
    out = tmp_path / "out"
    assert run(["upscale", str(tmp_path / "in"), "-r", "-o", str(out), "-q", *model_args]) == 0
    assert (out / "x_x4.png").is_file() and (out / "sub" / "x_x4.png").is_file()
    before = os.path.getmtime(out / "x_x4.png")
    capsys.readouterr()
    assert (
        run(["upscale", str(tmp_path / "in"), "-r", "-o", str(out), "--skip-existing", "--json", *model_args])
        == 0
    )
    assert {r["status"] for r in _records(capsys)} == {"skipped"}
    assert os.path.getmtime(out / "x_x4.png") == before


def test_batch_goes_on_past_bad_files(tmp_path, model_args, capsys):
    _png(tmp_path / "in" / "good.png")
    (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    code = run(
        [
            "upscale",
            str(tmp_path / "in"),
            str(tmp_path / "missing.png"),
            "-o",
            str(tmp_path / "out"),
            *model_args,
        ]
    )
    captured = capsys.readouterr()
    assert code == 1
    assert (tmp_path / "out" / "good_x4.png").is_file()
    assert "broken.png" in captured.err and "missing.png" in captured.err
    assert "2 failed" in captured.err


def test_unwritable_output_folder(tmp_path, model_args, capsys):
    src = _png(tmp_path / "a.png")
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the output folder should be")
    assert run(["upscale", str(src), "-o", str(blocker), *model_args]) == 1
    assert "not_a_folder" in capsys.readouterr().err


def test_never_overwrites_an_input(tmp_path, model_args, capsys):
    src = _png(tmp_path / "a.png")
    original = src.read_bytes()
    assert run(["upscale", str(src), "--suffix", "", *model_args]) == 1
    assert "overwrite" in capsys.readouterr().err
    assert src.read_bytes() == original


def test_alpha_gray_and_16_bit(tmp_path, model_args):
    rgba = _png(tmp_path / "rgba.png", mode="RGBA")
    gray = _png(tmp_path / "gray.png", mode="L")
    deep = tmp_path / "deep.png"
    Image.fromarray(np.arange(24 * 20, dtype=np.uint16).reshape(20, 24) * 97).save(deep)  # 16-bit gray
    assert (
        run(["upscale", str(rgba), str(gray), str(deep), "-o", str(tmp_path / "out"), "-q", *model_args]) == 0
    )
    out_rgba = Image.open(tmp_path / "out" / "rgba_x4.png")
    assert out_rgba.mode == "RGBA"
    src_alpha = np.asarray(Image.open(rgba))[..., 3].astype(float)
    assert abs(np.asarray(out_rgba)[..., 3].mean() - src_alpha.mean()) < 8  # alpha carried over (resampled)
    assert Image.open(tmp_path / "out" / "gray_x4.png").mode == "L"
    out_deep = Image.open(tmp_path / "out" / "deep_x4.png")
    assert out_deep.mode.startswith("I") and np.asarray(out_deep).max() > 255


def test_format_and_quality(tmp_path, model_args):
    src = _png(tmp_path / "a.png")
    assert run(["upscale", str(src), "--format", "jpg", "--quality", "80", "-q", *model_args]) == 0
    assert Image.open(tmp_path / "a_x4.jpg").format == "JPEG"


def test_exit_codes_for_bad_options(tmp_path, model_args, capsys):
    src = _png(tmp_path / "a.png")
    assert run(["upscale", str(src), "-x", "3", *model_args]) == 1
    assert "-x must be 4, 2 or 8" in capsys.readouterr().err
    assert run(["upscale", str(src), "--dtype", "fp8", *model_args]) == 1
    assert run(["upscale", str(src), *model_args, "--overlap", "64"]) == 1  # overlap >= tile
    assert "--overlap 64 must be smaller than --tile 32" in capsys.readouterr().err
    assert run(["upscale"]) == 2  # missing INPUT: usage error
    assert run(["upscale", str(src), "--model", str(tmp_path / "nope.safetensors")]) == 1
    assert "nope.safetensors" in capsys.readouterr().err


def test_default_model_comes_from_the_registry_through_the_hub(
    tmp_path, fake_hub, monkeypatch, tiny_model_files, pipeline_args
):
    """`upscale -x 4` with no --model fetches the registry's default (rsd-x4) from the Hub, then works offline."""
    from huggingface_hub import constants
    from safetensors.torch import load_file, save_file

    monkeypatch.setenv("SR1STEP_CACHE", str(tmp_path / "sr1step-cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    for var in ("HF_HUB_OFFLINE", "HF_TOKEN", "SR1STEP_REGISTRY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setenv("HF_ENDPOINT", fake_hub.url)
    # a sorryhyun-style student file where the registry says rsd-x4 lives
    student = tmp_path / "rsd_student_final.safetensors"
    save_file(
        load_file(str(tiny_model_files["unet"])),
        str(student),
        metadata={"noise_mode": "concat", "noise_channels": "1", "cond_lq": "pixel", "branch": "ema"},
    )
    fake_hub.commit(
        "sorryhyun/Distilled-ResShift-4x", {"rsd_student_final.safetensors": student.read_bytes()}
    )
    src = _png(tmp_path / "a.png")
    args = ["upscale", str(src), "-x", "4", *pipeline_args, "-q"]
    assert run([*args, "-o", str(tmp_path / "o1")]) == 0
    assert Image.open(tmp_path / "o1" / "a_x4.png").size == (96, 80)
    downloads = len(fake_hub.requests_matching("rsd_student_final"))
    assert downloads >= 1
    # second run: from the cache, offline, same result
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert run([*args, "-o", str(tmp_path / "o2"), "--offline"]) == 0
    assert len(fake_hub.requests_matching("rsd_student_final")) == downloads
    assert np.array_equal(
        np.asarray(Image.open(tmp_path / "o1" / "a_x4.png")),
        np.asarray(Image.open(tmp_path / "o2" / "a_x4.png")),
    )
