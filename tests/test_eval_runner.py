"""`sr1step eval` end to end: pairing, scoring, results files, the table, resume, the dataset registry and the
learned metrics loaded offline from a cache of random-weight files."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from eval_fixtures import (
    CLIP_IMPORT_ERROR,
    FAST_LEARNED_METRICS,
    build_iqa_weight_cache,
    make_fake_dataset_hub,
    make_lr_hr_folders,
    make_sr_hr_folders,
    png_bytes,
    smooth_rgb,
    write_png,
    zip_bytes,
)
from PIL import Image

from sr1step.cli import run
from sr1step.errors import ConfigError, DatasetError, Sr1stepError
from sr1step.eval import datasets as DS
from sr1step.eval.metrics import METRICS, psnr_y, ssim_y
from sr1step.eval.runner import EvalResult, Evaluator, UpscaleOptions, model_label, read_rgb8

NAMES = ["img_a.png", "img_b.png", "img_c.png"]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: ")
    return err[0]


# ------------------------------------------------------------------------------------------ scoring folders


def test_scoring_existing_images_writes_csv_summary_json_and_table(tmp_path, capsys):
    sr_dir, hr_dir = make_sr_hr_folders(tmp_path / "pairs", NAMES)
    out = tmp_path / "results"
    assert run(["eval", "--sr-dir", str(sr_dir), "--hr-dir", str(hr_dir), "--out", str(out), "--json"]) == 0
    stdout = capsys.readouterr().out
    record = json.loads(stdout)  # exactly one JSON document on stdout, nothing else
    run_dir = out / "pairs" / "sr"
    assert json.loads((run_dir / "summary.json").read_text()) == record

    rows = read_csv(run_dir / "per_image.csv")
    assert list(rows[0]) == ["image", "sr", "hr", "psnr", "ssim"]
    assert [r["image"] for r in rows] == ["img_a", "img_b", "img_c"]
    expected = {"psnr": [], "ssim": []}
    for row, name in zip(rows, NAMES, strict=True):
        sr, hr = read_rgb8(sr_dir / name), read_rgb8(hr_dir / name)
        expected["psnr"].append(psnr_y(sr, hr))
        expected["ssim"].append(ssim_y(sr, hr))
        assert float(row["psnr"]) == expected["psnr"][-1]  # written at full precision
        assert float(row["ssim"]) == expected["ssim"][-1]
        assert Path(row["sr"]) == sr_dir / name and Path(row["hr"]) == hr_dir / name

    assert record["images"] == 3 and record["dataset"] == "pairs" and record["model"] == "sr"
    assert record["metrics"]["psnr"] == pytest.approx(np.mean(expected["psnr"]), abs=1e-12)
    assert record["metrics"]["ssim"] == pytest.approx(np.mean(expected["ssim"]), abs=1e-12)
    assert set(record["versions"]) >= {"sr1step", "torch", "pyiqa"}
    assert record["model_info"] is None and record["warnings"] == []
    assert record["metric_settings"]["psnr"]["implementation"] == "sr1step"
    assert record["paths"]["hr_dir"] == str(hr_dir.resolve())

    # Human mode: the table on stdout, progress and the results path on stderr.
    assert run(["eval", "--sr-dir", str(sr_dir), "--hr-dir", str(hr_dir), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "PSNR ↑" in captured.out and "SSIM ↑" in captured.out
    assert f"{record['metrics']['psnr']:.2f}" in captured.out
    assert "results" in captured.err


def test_several_sr_folders_are_compared_in_one_table(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "160")
    sr_dir, hr_dir = make_sr_hr_folders(tmp_path / "pairs", NAMES)
    worse = tmp_path / "worse"
    for name in NAMES:
        noisy = read_rgb8(sr_dir / name).astype(int) + np.random.default_rng(1).integers(-40, 41, (64, 64, 3))
        write_png(worse / name, np.clip(noisy, 0, 255).astype(np.uint8))
    argv = [
        "eval",
        "--sr-dir",
        str(sr_dir),
        "--sr-dir",
        str(worse),
        "--hr-dir",
        str(hr_dir),
        "--out",
        str(tmp_path),
    ]
    assert run([*argv, "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["model"] for r in records] == ["sr", "worse"]
    assert records[0]["metrics"]["psnr"] > records[1]["metrics"]["psnr"]


BOLD = "\x1b[1m"


def render(table) -> str:
    """The table as a colour terminal shows it (bold = ESC[1m)."""
    import io

    from rich.console import Console

    console = Console(file=io.StringIO(), force_terminal=True, color_system="standard", width=120)
    console.print(table)
    return console.file.getvalue()


def _result(model: str, scores: dict[str, float | None]) -> EvalResult:
    return EvalResult("set", model, Path("."), 1, scores, {})


def test_table_marks_the_best_value_per_column_direction_aware():
    from sr1step.cli.evaluate import results_table

    results = [
        _result("a", {"psnr": 25.0, "lpips": 0.30, "fid": None}),
        _result("b", {"psnr": 26.0, "lpips": 0.20, "fid": 12.0}),
        _result("c", {"psnr": 26.001, "lpips": 0.25, "fid": 15.0}),
    ]
    table = results_table(results, ["psnr", "lpips", "fid"], "t")
    assert [c.header for c in table.columns] == ["model", "PSNR ↑", "LPIPS ↓", "FID ↓"]
    text = render(table)

    def bold(value: str) -> int:  # right-justified cells keep their padding inside the bold span
        return len(re.findall(re.escape(BOLD) + r" *" + re.escape(value), text))

    # PSNR: higher is better, and 26.00 vs 26.00 at the printed precision is a tie: both bold.
    assert (bold("26.00"), bold("25.00")) == (2, 0)
    assert (bold("0.2000"), bold("0.2500"), bold("0.3000")) == (1, 0, 0)  # LPIPS: lower is better
    assert (bold("12.00"), bold("15.00")) == (1, 0) and "n/a" in text
    text = render(results_table(results[:1], ["psnr", "lpips"], "t"))
    assert (bold("25.00"), bold("0.3000")) == (0, 0)  # one row: nothing to compare


# ------------------------------------------------------------------------------------------ pairing errors


def _break(kind: str, sr_dir: Path, hr_dir: Path) -> str:
    """Damage a clean pair of folders; returns a fragment the one-line error must contain."""
    if kind == "missing":
        (sr_dir / "img_b.png").unlink()
        return f"1 HR image(s) in {hr_dir} have no SR image in {sr_dir}: img_b"
    if kind == "extra":
        write_png(sr_dir / "img_z.png", smooth_rgb(np.random.default_rng(0), 64, 64))
        return f"1 SR image(s) in {sr_dir} have no HR image in {hr_dir}: img_z"
    if kind == "size":
        write_png(sr_dir / "img_c.png", smooth_rgb(np.random.default_rng(0), 64, 60))
        return f"size mismatch for 'img_c': SR {sr_dir / 'img_c.png'} is 60×64, HR {hr_dir / 'img_c.png'} is 64×64"
    if kind == "duplicate":
        Image.open(sr_dir / "img_a.png").save(sr_dir / "img_a.jpg")
        return f"SR folder {sr_dir} has two images named 'img_a': img_a.jpg, img_a.png"
    if kind == "empty":
        for path in sr_dir.iterdir():
            path.unlink()
        return f"SR folder {sr_dir} holds no images"
    if kind == "absent":
        for path in hr_dir.iterdir():
            path.unlink()
        hr_dir.rmdir()
        return f"HR folder {hr_dir} does not exist"
    if kind == "corrupt":
        (sr_dir / "img_a.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
        return f"{sr_dir / 'img_a.png'}: cannot decode image"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing", "extra", "size", "duplicate", "empty", "absent", "corrupt"])
def test_pairing_errors_are_one_line_with_exit_code_1(tmp_path, capsys, kind):
    sr_dir, hr_dir = make_sr_hr_folders(tmp_path, NAMES)
    fragment = _break(kind, sr_dir, hr_dir)
    code = run(["eval", "--sr-dir", str(sr_dir), "--hr-dir", str(hr_dir), "--out", str(tmp_path / "out")])
    assert code == 1
    assert fragment in one_error_line(capsys)
    assert not (tmp_path / "out").exists()  # nothing written for a set that does not pair


def test_names_pair_across_extensions_and_non_images_are_ignored(tmp_path, capsys):
    sr_dir, hr_dir = make_sr_hr_folders(tmp_path, NAMES)
    Image.open(hr_dir / "img_a.png").save(hr_dir / "img_a.bmp")  # lossless: same pixels, other extension
    (hr_dir / "img_a.png").unlink()
    (hr_dir / "notes.txt").write_text("not an image")
    (sr_dir / ".DS_Store").write_bytes(b"\0")
    assert (
        run(["eval", "--sr-dir", str(sr_dir), "--hr-dir", str(hr_dir), "--out", str(tmp_path), "--json"]) == 0
    )
    assert json.loads(capsys.readouterr().out)["images"] == 3


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        ([], "give --model"),
        (["--model", "m", "--sr-dir", "."], "use one or the other"),
        (["--dataset", "realsr-crop", "--lr-dir", ".", "--model", "m"], "drop --lr-dir/--hr-dir"),
        (["--model", "m"], "--model needs the LR images"),
        (["--sr-dir", ".", "--lr-dir", "."], "--lr-dir is for --model runs"),
        (
            ["--sr-dir", "a/sr", "--sr-dir", "b/sr"],
            "two runs would share the results folder <out>/<dataset>/sr",
        ),
    ],
)
def test_usage_errors_exit_2(capsys, argv, fragment):
    assert run(["eval", *argv]) == 2
    assert fragment in capsys.readouterr().err


def test_bad_metric_names_are_refused_before_any_dataset_download(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SR1STEP_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: a download attempt would fail
    assert run(["eval", "--dataset", "div2k-val", "--sr-dir", str(tmp_path), "--metrics", "psnr,bogus"]) == 1
    assert "unknown metric 'bogus'" in one_error_line(capsys)
    assert not (tmp_path / "empty-cache").exists()


def test_an_unavailable_device_is_one_clear_error(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    sr_dir, hr_dir = make_sr_hr_folders(tmp_path, NAMES)
    assert run(["eval", "--sr-dir", str(sr_dir), "--hr-dir", str(hr_dir), "--device", "cuda"]) == 1
    assert "--device cuda: no CUDA device is available" in one_error_line(capsys)


def test_reference_metrics_without_ground_truth_are_refused(tmp_path, capsys):
    sr_dir, _ = make_sr_hr_folders(tmp_path, NAMES)
    assert run(["eval", "--sr-dir", str(sr_dir), "--metrics", "psnr,niqe", "--out", str(tmp_path)]) == 1
    assert "metric(s) psnr need ground truth" in one_error_line(capsys)
    assert run(["eval", "--sr-dir", str(sr_dir), "--metrics", "psnr,bogus"]) == 1
    assert "unknown metric 'bogus'" in one_error_line(capsys)


# ------------------------------------------------------------------------------------------ model runs


class BicubicUpscaler:
    """A real (classical) ×s upscaler with the pipeline's calling convention, for the runner's cache logic."""

    def __init__(
        self, scale: int, sha256: str = "0" * 64, fail_after: int | None = None, wrong_size: bool = False
    ):
        self.scale, self.calls, self.fail_after, self.wrong_size = scale, [], fail_after, wrong_size
        self.info = {"model": "bicubic", "sha256": sha256, "scale": scale, "seed": None, "tile": 0}

    def __call__(self, image: Image.Image) -> Image.Image:
        if self.fail_after is not None and len(self.calls) == self.fail_after:
            raise KeyboardInterrupt
        self.calls.append(image.size)
        size = (image.width * self.scale + (1 if self.wrong_size else 0), image.height * self.scale)
        return image.resize(size, Image.Resampling.BICUBIC)


def factory_of(upscaler: BicubicUpscaler, seen: list | None = None):
    def factory(model_spec: str, **kwargs):
        if seen is not None:
            seen.append((model_spec, kwargs))
        return upscaler

    return factory


@pytest.fixture
def lr_hr(tmp_path) -> tuple[Path, Path]:
    return make_lr_hr_folders(tmp_path / "set", [f"im{i}.png" for i in range(5)], hr_size=32)


def _evaluate(tmp_path, lr_hr, upscaler, options=UpscaleOptions(seed=1), out="out", seen=None) -> EvalResult:
    evaluator = Evaluator(["psnr", "ssim"], out_root=tmp_path / out)
    return evaluator.evaluate_model(
        dataset="set", model_spec="models/bicubic.safetensors", lr_dir=lr_hr[0], hr_dir=lr_hr[1],
        options=options, upscaler_factory=factory_of(upscaler, seen),
    )  # fmt: skip


def test_model_run_caches_outputs_and_resumes_after_an_interruption(tmp_path, lr_hr):
    sr_dir = tmp_path / "out" / "set" / "bicubic" / "sr"
    with pytest.raises(KeyboardInterrupt):
        _evaluate(tmp_path, lr_hr, BicubicUpscaler(4, fail_after=2))
    assert sorted(p.name for p in sr_dir.iterdir()) == ["im0.png", "im1.png"]  # complete files only, no temps
    assert not (tmp_path / "out" / "set" / "bicubic" / "summary.json").exists()
    first_bytes = (sr_dir / "im0.png").read_bytes()

    seen: list = []
    resumed = BicubicUpscaler(4)
    result = _evaluate(tmp_path, lr_hr, resumed, seen=seen)
    assert len(resumed.calls) == 3  # only the missing images
    assert seen[0][0] == "models/bicubic.safetensors" and seen[0][1]["seed"] == 1 and seen[0][1]["scale"] == 4
    assert (sr_dir / "im0.png").read_bytes() == first_bytes
    assert result.images == 5 and result.summary["model_info"]["sha256"] == "0" * 64

    reference = _evaluate(tmp_path, lr_hr, BicubicUpscaler(4), out="uninterrupted")
    assert result.scores == reference.scores
    for path in sr_dir.iterdir():
        other = tmp_path / "uninterrupted" / "set" / "bicubic" / "sr" / path.name
        assert np.array_equal(read_rgb8(path), read_rgb8(other))

    # Everything cached: the model is not even loaded; the recorded info still reaches the summary.
    again = _evaluate(tmp_path, lr_hr, BicubicUpscaler(4, fail_after=0))
    assert again.scores == result.scores and again.summary["model_info"]["sha256"] == "0" * 64


def test_cached_outputs_of_other_settings_or_another_model_file_are_not_reused(tmp_path, lr_hr):
    _evaluate(tmp_path, lr_hr, BicubicUpscaler(4), options=UpscaleOptions(seed=1))
    with pytest.raises(DatasetError, match=r"made with other settings \(seed: 1 → 2\)"):
        _evaluate(tmp_path, lr_hr, BicubicUpscaler(4), options=UpscaleOptions(seed=2))
    (tmp_path / "out" / "set" / "bicubic" / "sr" / "im3.png").unlink()
    changed = f"sha256: {'0' * 64} → {'f' * 64}"
    with pytest.raises(DatasetError, match=f"outputs of another model or precision \\({changed}\\)"):
        _evaluate(tmp_path, lr_hr, BicubicUpscaler(4, sha256="f" * 64))


def test_lr_hr_scale_mismatch_fails_before_any_upscaling(tmp_path, lr_hr):
    upscaler = BicubicUpscaler(2)
    with pytest.raises(
        DatasetError,
        match=r"size mismatch for 'im0': LR .* is 8×8, HR .* is 32×32 \(expected 2× the LR size: 16×16\)",
    ):
        _evaluate(tmp_path, lr_hr, upscaler, options=UpscaleOptions(scale=2))
    assert upscaler.calls == []


def test_an_upscaler_returning_the_wrong_size_is_an_error(tmp_path, lr_hr):
    with pytest.raises(Sr1stepError, match=r"gave 33×32, expected 32×32"):
        _evaluate(tmp_path, lr_hr, BicubicUpscaler(4, wrong_size=True))


def test_no_reference_model_run_needs_no_hr(tmp_path, lr_hr):
    evaluator = Evaluator(["psnr"], out_root=tmp_path)
    with pytest.raises(ConfigError, match="need ground truth"):
        evaluator.evaluate_model(
            dataset="x", model_spec="m", lr_dir=lr_hr[0], hr_dir=None, options=UpscaleOptions(),
            upscaler_factory=factory_of(BicubicUpscaler(4)),
        )  # fmt: skip


@pytest.mark.parametrize(
    ("spec", "label"),
    [
        ("rsd-x4", "rsd-x4"),
        ("/models/run 3/student.safetensors", "student"),
        ("weights.pth", "weights"),
        ("hf://owner/repo", "owner--repo"),
        ("hf://owner/repo/sub/model.safetensors@v1.0", "owner--repo--sub--model"),
    ],
)
def test_model_labels_are_safe_folder_names(spec, label):
    assert model_label(spec) == label


@pytest.mark.slow
def test_end_to_end_with_a_real_exported_model_including_resume(tmp_path, capsys, monkeypatch):
    """The real pipeline: tiny random-weight ResShift UNet + VQ exported with sr1step.checkpoints, a generated
    set with LR made by bicubic downscaling, two models compared, Ctrl-C mid-run, then a resumed run."""
    from tiny import tiny_unet, tiny_vq

    from sr1step.checkpoints import InferenceSpec, export_safetensors
    from sr1step.pipeline import Upscaler

    models = tmp_path / "models"
    unet_a = export_safetensors(tiny_unet(seed=0), models / "tiny_a.safetensors", InferenceSpec(scale=4))
    unet_b = export_safetensors(tiny_unet(seed=1), models / "tiny_b.safetensors", InferenceSpec(scale=4))
    vq = export_safetensors(tiny_vq(), models / "tiny_vq.safetensors")
    lr_dir, hr_dir = make_lr_hr_folders(tmp_path / "set", [f"im{i}.png" for i in range(4)], hr_size=64)
    out = tmp_path / "results"
    argv = ["eval", "--lr-dir", str(lr_dir), "--hr-dir", str(hr_dir), "--vae", str(vq), "--tile", "0",
            "--device", "cpu", "--seed", "7", "--out", str(out)]  # fmt: skip

    real_call = Upscaler.__call__
    calls: list[int] = []

    def interrupted_on_third(self, image, seed=None):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return real_call(self, image, seed)

    monkeypatch.setattr(Upscaler, "__call__", interrupted_on_third)
    assert run([*argv, "--model", str(unet_a)]) == 130
    sr_a = out / "set" / "tiny_a" / "sr"
    assert sorted(p.name for p in sr_a.iterdir()) == ["im0.png", "im1.png"]
    capsys.readouterr()

    calls.clear()
    monkeypatch.setattr(
        Upscaler, "__call__", lambda self, image, seed=None: calls.append(1) or real_call(self, image, seed)
    )
    assert run([*argv, "--model", str(unet_a), "--model", str(unet_b), "--json"]) == 0
    assert len(calls) == 2 + 4  # the two missing images of tiny_a, all four of tiny_b
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["model"] for r in records] == ["tiny_a", "tiny_b"]
    info = records[0]["model_info"]
    assert info["sha256"] and info["seed"] == 7 and info["tile"] == 0 and info["scale"] == 4
    for record in records:
        rows = read_csv(Path(record["paths"]["sr_dir"]).parent / "per_image.csv")
        assert [r["image"] for r in rows] == ["im0", "im1", "im2", "im3"]
        assert all(math.isfinite(float(r["psnr"])) for r in rows)

    # The resumed outputs equal an uninterrupted run's (per-image seeding, atomic writes).
    fresh = tmp_path / "fresh"
    assert run([*argv[:-1], str(fresh), "--model", str(unet_a), "--quiet"]) == 0
    for path in sorted(sr_a.iterdir()):
        assert np.array_equal(read_rgb8(path), read_rgb8(fresh / "set" / "tiny_a" / "sr" / path.name)), (
            path.name
        )

    # Pairing errors surface before the model is loaded.
    (hr_dir / "im3.png").unlink()
    assert run([*argv, "--model", str(unet_a)]) == 1
    assert "1 LR image(s) in" in one_error_line(capsys)


# ------------------------------------------------------------------------------------------ dataset registry


def test_every_registered_dataset_is_well_formed():
    assert set(DS.DATASETS) == {
        "realsr",
        "realset65",
        "imagenet-test",
        "realsr-crop",
        "drealsr-crop",
        "div2k-val",
    }
    for name, spec in DS.DATASETS.items():
        assert spec.name == name and spec.images > 0 and spec.scale == 4
        assert spec.metrics and all(m in METRICS for m in spec.metrics)
        assert spec.layouts and spec.sources
        assert all((hr is None) == (not spec.has_ground_truth) for _, hr in spec.layouts)
        if not spec.has_ground_truth:
            assert not any(METRICS[m].needs_reference for m in spec.metrics), name
        if spec.hub is not None:
            assert spec.hub.repo_id == "Iceclear/StableSR-TestSets" and spec.hub.filename.endswith(".zip")
        else:
            assert "Google Drive" in spec.where_to_get() or "GitHub" in spec.where_to_get()
    osediff = ["psnr", "ssim", "lpips", "dists", "niqe", "musiq", "maniqa", "clipiqa", "fid"]
    assert [list(DS.DATASETS[n].metrics) for n in ("realsr-crop", "drealsr-crop", "div2k-val")] == [
        osediff
    ] * 3
    assert list(DS.DATASETS["realsr"].metrics) == ["psnr", "ssim", "lpips", "clipiqa", "musiq"]
    assert list(DS.DATASETS["realset65"].metrics) == ["clipiqa", "musiq"]
    assert "fid" in DS.DATASETS["imagenet-test"].metrics


def _populate(root: Path, lr: str, hr: str | None, names=("x1.png",)) -> None:
    rng = np.random.default_rng(0)
    for name in names:
        write_png(root / lr / name, smooth_rgb(rng, 8, 8))
        if hr is not None:
            write_png(root / hr / name, smooth_rgb(rng, 32, 32))


@pytest.mark.parametrize("name", sorted(DS.DATASETS))
def test_each_dataset_resolves_from_data_root_in_every_accepted_layout(tmp_path, name):
    spec = DS.DATASETS[name]
    for index, (lr, hr) in enumerate(spec.layouts):
        root = tmp_path / str(index)
        _populate(root / name, lr, hr)
        found = DS.resolve_dataset(name, root)
        assert found.lr_dir == (root / name / lr if lr else root / name)
        assert found.hr_dir == (root / name / hr if hr else None)


def test_stablesr_sets_resolve_from_an_unpacked_archive_given_as_data_root(tmp_path):
    base = tmp_path / "unzipped"
    _populate(base / "StableSR_testsets" / "DrealSRVal_crop128", "lq", "gt")
    found = DS.resolve_dataset("drealsr-crop", base)
    assert found.hr_dir == base / "StableSR_testsets" / "DrealSRVal_crop128" / "gt"
    with pytest.raises(DatasetError, match="dataset 'realsr-crop' not found under --data-root"):
        DS.resolve_dataset("realsr-crop", base)


def test_a_folder_without_images_is_not_mistaken_for_realset65(tmp_path, monkeypatch):
    monkeypatch.setenv("SR1STEP_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache" / "datasets" / "other").mkdir(parents=True)
    with pytest.raises(DatasetError, match="'realset65' is not available locally"):
        DS.resolve_dataset("realset65")
    _populate(tmp_path / "cache" / "datasets" / "realset65", "", None)
    assert DS.resolve_dataset("realset65").lr_dir == tmp_path / "cache" / "datasets" / "realset65"


def test_manual_datasets_say_where_to_get_them_and_the_layout(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SR1STEP_CACHE", str(tmp_path / "cache"))
    code = run(["eval", "--dataset", "realsr", "--model", "m", "--out", str(tmp_path)])
    assert code == 1
    line = one_error_line(capsys)
    assert "Google Drive id 17ZMjo-zwFouxnm_aFM6CUHBwgRrLZqIM" in line
    assert "<root>/realsr/LR_x4/*.png and <root>/realsr/HR_x4/" in line
    assert str(tmp_path / "cache" / "datasets") in line
    assert run(["eval", "--dataset", "imagenet-test", "--model", "m", "--data-root", str(tmp_path)]) == 1
    line = one_error_line(capsys)
    assert f"not found under --data-root {tmp_path}" in line and "1NhmpON2dB2LjManfX6uIj8Pj_Jx6N-6l" in line
    assert run(["eval", "--dataset", "nope", "--model", "m"]) == 1
    assert "unknown dataset 'nope'; known datasets: realsr," in one_error_line(capsys)


def test_list_datasets(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    assert run(["eval", "--list-datasets"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in DS.DATASETS)
    assert run(["eval", "--list-datasets", "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["name"] for r in records] == list(DS.DATASETS)


def _stablesr_zip(rng: np.random.Generator) -> bytes:
    files = {}
    for member in ("RealSRVal_crop128", "DrealSRVal_crop128"):
        for name in ("Canon_001_LR4.png", "Nikon_002_LR4.png"):
            files[f"StableSR_testsets/{member}/test_LR/{name}"] = png_bytes(smooth_rgb(rng, 16, 16))
            files[f"StableSR_testsets/{member}/test_HR/{name}"] = png_bytes(smooth_rgb(rng, 64, 64))
    return zip_bytes(files)


def test_hub_datasets_download_once_through_huggingface_hub_and_unpack_into_the_cache(tmp_path, monkeypatch):
    from fakehub import FileServer

    monkeypatch.setenv("SR1STEP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with FileServer() as cdn, make_fake_dataset_hub(cdn) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        hub.commit(
            "Iceclear/StableSR-TestSets", {"StableSR_testsets.zip": _stablesr_zip(np.random.default_rng(0))}
        )

        with pytest.raises(DatasetError, match="--offline forbids downloading it"):
            DS.resolve_dataset("realsr-crop", offline=True)
        assert hub.requests == []  # offline: not a single request

        found = DS.resolve_dataset("realsr-crop")
        unpacked = (
            tmp_path / "cache" / "datasets" / "stablesr-testsets" / "StableSR_testsets" / "RealSRVal_crop128"
        )
        assert (found.lr_dir, found.hr_dir) == (unpacked / "test_LR", unpacked / "test_HR")
        assert sorted(p.name for p in found.hr_dir.iterdir()) == ["Canon_001_LR4.png", "Nikon_002_LR4.png"]
        assert len(cdn.requests_matching("/lfs/", "GET")) == 1
        assert not list((tmp_path / "cache" / "datasets").glob(".*partial"))

        # The sibling set comes out of the same archive; nothing is fetched again.
        count = len(hub.requests) + len(cdn.requests)
        assert DS.resolve_dataset("drealsr-crop").hr_dir.parent.name == "DrealSRVal_crop128"
        assert len(hub.requests) + len(cdn.requests) == count

        # Unpacked copy gone, archive still in the HF cache: offline re-unpacks it without a request.
        import shutil

        shutil.rmtree(tmp_path / "cache" / "datasets" / "stablesr-testsets")
        assert DS.resolve_dataset("realsr-crop", offline=True).lr_dir.is_dir()
        assert len(hub.requests) + len(cdn.requests) == count


def test_eval_scores_existing_images_against_a_hub_dataset(tmp_path, monkeypatch, capsys):
    from fakehub import FileServer

    monkeypatch.setenv("SR1STEP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    with FileServer() as cdn, make_fake_dataset_hub(cdn) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        hub.commit(
            "Iceclear/StableSR-TestSets", {"StableSR_testsets.zip": _stablesr_zip(np.random.default_rng(0))}
        )
        hr_dir = DS.resolve_dataset("realsr-crop").hr_dir
        sr_dir = tmp_path / "osediff"
        for path in hr_dir.iterdir():
            write_png(sr_dir / path.name, read_rgb8(path)[:, ::-1].copy())
        argv = ["eval", "--dataset", "realsr-crop", "--sr-dir", str(sr_dir), "--metrics", "psnr,ssim"]
        assert run([*argv, "--out", str(tmp_path / "res"), "--json"]) == 0
    captured = capsys.readouterr()
    record = json.loads(captured.out)
    assert record["dataset"] == "realsr-crop" and record["model"] == "osediff" and record["images"] == 2
    assert "holds 2 images; the published realsr-crop set has 100" in captured.err
    assert (tmp_path / "res" / "realsr-crop" / "osediff" / "per_image.csv").is_file()


def test_hub_errors_are_one_line(tmp_path, monkeypatch, capsys):
    from fakehub import FileServer

    monkeypatch.setenv("SR1STEP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    with FileServer() as cdn, make_fake_dataset_hub(cdn) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        assert run(["eval", "--dataset", "div2k-val", "--sr-dir", str(tmp_path)]) == 1
    line = one_error_line(capsys)
    assert "Iceclear/StableSR-TestSets/StableSR_testsets.zip" in line and "repository not found" in line


# ------------------------------------------------------------------------------------------ learned metrics


@pytest.fixture(scope="session")
def iqa_cache(tmp_path_factory):
    pytest.importorskip("pyiqa")
    return build_iqa_weight_cache(tmp_path_factory.mktemp("iqa-weights"))


def _learned_run(tmp_path: Path, metrics: list[str], capsys) -> dict:
    """One offline eval run in human mode; returns summary.json. Two 96×192 images (NIQE needs two 96-px blocks):
    SR 'same' is a copy of its HR image, SR 'noisy' is not."""
    sr_dir, hr_dir = make_sr_hr_folders(tmp_path / "pairs", ["same.png", "noisy.png"], size=192)
    for folder in (sr_dir, hr_dir):
        for path in folder.iterdir():
            Image.open(path).crop((0, 0, 192, 96)).save(path)
    (sr_dir / "same.png").write_bytes((hr_dir / "same.png").read_bytes())
    argv = ["eval", "--sr-dir", str(sr_dir), "--hr-dir", str(hr_dir), "--metrics", ",".join(metrics),
            "--offline", "--device", "cpu", "--out", str(tmp_path / "res")]  # fmt: skip
    assert run(argv) == 0
    table = capsys.readouterr().out
    assert "Loading pretrained" not in table  # pyiqa prints while loading; stdout carries results only
    run_dir = tmp_path / "res" / "pairs" / "sr"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert list(summary["metrics"]) == metrics
    assert all(isinstance(v, float) and math.isfinite(v) for v in summary["metrics"].values()), summary
    rows = {row["image"]: row for row in read_csv(run_dir / "per_image.csv")}
    per_image = [m for m in metrics if METRICS[m].kind != "set"]
    assert list(rows["same"]) == ["image", "sr", "hr", *per_image]
    for name in metrics:
        spec = METRICS[name]
        if spec.kind != "set":
            values = [float(row[name]) for row in rows.values()]
            assert all(math.isfinite(v) for v in values), name
            assert summary["metrics"][name] == pytest.approx(np.mean(values), abs=1e-12)
        if spec.pyiqa_name is not None:
            assert summary["metric_settings"][name] == {
                "implementation": "pyiqa", "pyiqa_name": spec.pyiqa_name, "options": spec.pyiqa_options
            }  # fmt: skip
        assert f"{name.upper()} {'↓' if spec.lower_is_better else '↑'}" in table
        assert f"{summary['metrics'][name]:.{spec.decimals}f}" in table
    summary["rows"] = rows
    return summary


@pytest.mark.slow
def test_learned_metrics_run_offline_from_a_cache_of_random_weights(tmp_path, iqa_cache, monkeypatch, capsys):
    """LPIPS, DISTS, NIQE, MUSIQ and FID (and CLIPIQA where openai-clip imports) load from files with the names
    and layouts pyiqa, torchvision and OpenAI-CLIP expect (random weights), with no network; per-image CSV,
    summary and table carry every metric. MANIQA has its own test below."""
    iqa_cache.apply(monkeypatch)
    monkeypatch.setenv("COLUMNS", "220")
    learned = [m for m in FAST_LEARNED_METRICS if not (m == "clipiqa" and CLIP_IMPORT_ERROR)]
    summary = _learned_run(tmp_path, ["psnr", "ssim", *learned], capsys)
    assert summary["lower_is_better"] == ["lpips", "dists", "niqe", "fid"] and summary["warnings"] == []
    same, noisy = summary["rows"]["same"], summary["rows"]["noisy"]
    # The full-reference metrics really compare the pair: identical images score perfectly whatever the weights.
    assert float(same["lpips"]) == 0.0 and float(noisy["lpips"]) > 0.0
    assert float(same["dists"]) == pytest.approx(0.0, abs=1e-6) and float(noisy["dists"]) > 1e-4
    assert float(same["psnr"]) == pytest.approx(80.0)
    # No-reference metrics look at the SR image alone: the two different images score differently.
    assert float(same["niqe"]) != float(noisy["niqe"]) and float(same["musiq"]) != float(noisy["musiq"])


@pytest.mark.slow
@pytest.mark.skipif(CLIP_IMPORT_ERROR is not None, reason=str(CLIP_IMPORT_ERROR))
def test_clipiqa_runs_offline_from_a_random_rn50(tmp_path, iqa_cache, monkeypatch, capsys):
    iqa_cache.apply(monkeypatch)
    summary = _learned_run(tmp_path, ["clipiqa"], capsys)
    for row in summary["rows"].values():
        assert 0.0 <= float(row["clipiqa"]) <= 1.0  # a mean of softmax probabilities, whatever the weights


@pytest.mark.slow
def test_maniqa_pipal_runs_offline_from_a_cache_with_timm_hub_weights(
    tmp_path, iqa_cache, monkeypatch, capsys
):
    """MANIQA builds timm's ViT-B/8 from the Hugging Face cache (offline), then strictly loads its own checkpoint.

    For run time only, this test scores 1 crop instead of the papers' 20 (20 crops through ViT-B/8 take ~20-40 s
    on two CPU cores); loading, the call and the results files are the same code path.
    """
    import dataclasses

    from eval_fixtures import add_maniqa

    from sr1step.eval import metrics as M

    add_maniqa(iqa_cache)
    iqa_cache.apply(monkeypatch)
    spec = M.METRICS["maniqa"]
    assert spec.pyiqa_options == {"train_dataset": "pipal"}  # the papers' setting: pyiqa's 20 test crops
    one_crop = dataclasses.replace(spec, pyiqa_options={**spec.pyiqa_options, "test_sample": 1})
    monkeypatch.setitem(M.METRICS, "maniqa", one_crop)
    sr_dir, _ = make_sr_hr_folders(tmp_path, ["a.png", "b.png"], size=128)
    argv = ["eval", "--sr-dir", str(sr_dir), "--metrics", "maniqa", "--offline", "--device", "cpu",
            "--name", "tiny", "--out", str(tmp_path / "res"), "--json"]  # fmt: skip
    assert run(argv) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["metric_settings"]["maniqa"]["pyiqa_name"] == "maniqa-pipal"
    pyiqa_version = tuple(int(part) for part in record["versions"]["pyiqa"].split(".")[:3])
    assert any("uniform grid" in w for w in record["warnings"]) == (pyiqa_version >= (0, 1, 12))
    rows = read_csv(tmp_path / "res" / "tiny" / "sr" / "per_image.csv")
    values = [float(row["maniqa"]) for row in rows]
    assert len(values) == 2 and all(math.isfinite(v) for v in values)
    assert record["metrics"]["maniqa"] == pytest.approx(np.mean(values), abs=1e-12)


def test_learned_metric_offline_miss_via_the_cli(tmp_path, monkeypatch, capsys):
    pytest.importorskip("pyiqa")
    from eval_fixtures import point_caches

    point_caches(monkeypatch, tmp_path / "torch", tmp_path / "hf", hub_offline=True)
    sr_dir, hr_dir = make_sr_hr_folders(tmp_path / "pairs", NAMES)
    argv = [
        "eval",
        "--sr-dir",
        str(sr_dir),
        "--hr-dir",
        str(hr_dir),
        "--metrics",
        "psnr,dists,fid",
        "--offline",
    ]
    assert run([*argv, "--out", str(tmp_path / "res")]) == 1
    line = one_error_line(capsys)
    assert "--offline: metric weights are not cached" in line
    for name in ("DISTS_weights-f5e65c96.pth", "vgg16-397923af.pth", "pt_inception-2015-12-05-6726825d.pth"):
        assert name in line
    assert not (tmp_path / "res").exists()
