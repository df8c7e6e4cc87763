"""YONOS-SR on CPU with a tiny random diffusers base: the model, the scale-distillation target, the whole
×2 → ×4 → decoder chain through the shared trainer, export → ``upscale``, and exact resume across stages.

The base is a real diffusers folder (UNet2DConditionModel, AutoencoderKL, a CLIP text encoder and tokenizer, an
SD-style PNDM scheduler config) of random weights, written to a temporary folder: no network.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from distill_fixtures import make_workspace  # noqa: E402
from PIL import Image  # noqa: E402

from sr1step.checkpoints import load_model, read_checkpoint  # noqa: E402
from sr1step.cli import run  # noqa: E402
from sr1step.distill.config import resolve_config  # noqa: E402
from sr1step.distill.data import derive_seed  # noqa: E402
from sr1step.distill.degradations import degrade  # noqa: E402
from sr1step.distill.trainer import DistEnv, TrainContext, Trainer, list_checkpoints  # noqa: E402
from sr1step.distill.yonos import DEGRADE_TAG, YonosMethod, loss_weight, lr_versions  # noqa: E402
from sr1step.errors import ConfigError, Sr1stepError  # noqa: E402
from sr1step.models.yonos import YonosSR, YonosUpscaler, locate_base  # noqa: E402

CPU = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
TOKENS = 8


def write_tiny_base(folder: Path) -> Path:
    """A Stable-Diffusion-layout folder with tiny random weights (VAE ×2, UNet latents in multiples of 2)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=2,
        norm_num_groups=4,
    ).save_pretrained(folder / "unet")
    AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=32,
    ).save_pretrained(folder / "vae")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for letter in "abcdefghijklmnopqrstuvwxyz":
        vocab[letter] = len(vocab)
        vocab[letter + "</w>"] = len(vocab)
    tokenizer_dir = folder / "tokenizer"
    tokenizer_dir.mkdir(parents=True)
    (tokenizer_dir / "vocab.json").write_text(json.dumps(vocab))
    (tokenizer_dir / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(
        str(tokenizer_dir / "vocab.json"),
        str(tokenizer_dir / "merges.txt"),
        model_max_length=TOKENS,
        pad_token="!",
    ).save_pretrained(tokenizer_dir)
    CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=TOKENS,
            projection_dim=16,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=2,
        )
    ).save_pretrained(folder / "text_encoder")
    (folder / "scheduler").mkdir()
    # SD 2 base ships a PNDM config: only its β schedule is taken
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(
            {
                "_class_name": "PNDMScheduler",
                "beta_start": 0.00085,
                "beta_end": 0.012,
                "beta_schedule": "scaled_linear",
                "num_train_timesteps": 1000,
                "prediction_type": "epsilon",
                "set_alpha_to_one": False,
                "skip_prk_steps": True,
                "steps_offset": 1,
            }
        )
    )
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads and lose much to them on a busy 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return write_tiny_base(tmp_path_factory.mktemp("yonos") / "tiny-sd")


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("yonos_data"), images=4)


def yonos_config(ws, base: Path, **extra: object):
    settings = {
        "data.dirs": f'["{ws["hr"]}"]',
        "yonos.base": str(base),
        "data.gt_size": 32,
        "data.degradation_grouping": "sample",
        "train.batch": 2,
        "train.microbatch": 1,
        "train.num_workers": 0,
        "train.lr": 1e-3,
        "train.ema_rate": 0.5,
        "train.save_freq": 2,
        "train.val_freq": 1000,
        "train.keep_checkpoints": 10,
        "yonos.stage_iterations": 2,
        "yonos.decoder_iterations": 2,
        "yonos.decoder_lr": 1e-3,
        "yonos.decoder_gan_weight": 0.1,
        "yonos.decoder_gan_channels": 8,
        "yonos.latent_tile": 16,
    }
    settings.update(extra)
    return resolve_config("yonos-sr", None, [f"{key}={value}" for key, value in settings.items()])


def _log_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "log.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _states(run_dir: Path) -> dict[int, dict]:
    return {
        step: torch.load(path, map_location="cpu", weights_only=False)["method_state"]
        for step, path in list_checkpoints(run_dir)
    }


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------- the model


def test_widened_conv_in_is_zero_initialised_and_matches_the_base(base):
    from diffusers import UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    model = YonosSR.from_base(str(base), scale=2)
    reference = UNet2DConditionModel.from_pretrained(base, subfolder="unet").eval()
    weight = model.unet.conv_in.weight
    assert weight.shape[1] == 8 and model.unet.config.in_channels == 8
    assert torch.equal(weight[:, :4], reference.conv_in.weight) and not weight[:, 4:].any()
    # the stored context is the empty prompt through the base's text encoder (no encoder kept)
    tokenizer = AutoTokenizer.from_pretrained(base / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(base / "text_encoder")
    ids = tokenizer("", padding="max_length", max_length=TOKENS, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(model.prompt_embeds, encoder(ids)[0])
    assert not any("text" in name for name, _ in model.named_modules())
    torch.manual_seed(1)
    z_t = torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999])
    context = model.prompt_embeds.expand(3, -1, -1)
    with torch.no_grad():
        expected = reference(z_t, t, encoder_hidden_states=context).sample
        for z_lr in (torch.zeros_like(z_t), 5 * torch.randn_like(z_t)):
            out = model.unet(torch.cat([z_t, z_lr], 1), t, encoder_hidden_states=context).sample
            torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_predict_x0_converts_each_parameterisation(base, prediction):
    from diffusers import DDPMScheduler

    model = YonosSR.from_base(str(base), scale=4, prediction=prediction)
    abar = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
    torch.manual_seed(2)
    z_t, z_lr = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 999])
    with torch.no_grad():
        out = model.unet(
            torch.cat([z_t, z_lr], 1), t, encoder_hidden_states=model.prompt_embeds.expand(2, -1, -1)
        ).sample
        x0 = model.predict_x0(z_t, t, z_lr)
        one = model.one_step(z_lr[1:], z_t[1:])
    alpha, sigma = abar[t].sqrt().view(-1, 1, 1, 1), (1 - abar[t]).sqrt().view(-1, 1, 1, 1)
    expected = {
        "epsilon": (z_t - sigma * out) / alpha,
        "v_prediction": alpha * z_t - sigma * out,
        "sample": out,
    }
    torch.testing.assert_close(x0, expected[prediction], rtol=1e-5, atol=1e-5)
    # one DDIM step from t = T with z_T = the noise is the x0 prediction there
    torch.testing.assert_close(one, x0[1:], rtol=1e-4, atol=1e-4)  # batch 1 vs 2: float order


def test_one_step_can_start_from_the_noised_lr_latent(base):
    model = YonosSR.from_base(str(base), scale=4, one_step_start="lr")
    torch.manual_seed(4)
    z_lr, noise = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    t = torch.tensor([999])
    abar = model.alphas_cumprod[999].float()
    with torch.no_grad():
        expected = model.predict_x0(abar.sqrt() * z_lr + (1 - abar).sqrt() * noise, t, z_lr)
        torch.testing.assert_close(model.one_step(z_lr, noise), expected)


def test_schedule_and_settings_are_checked(base):
    zero = YonosSR.from_base(str(base), scale=4, schedule="zero_snr")
    assert float(zero.alphas_cumprod[-1]) == 0.0 and float(zero.snr(torch.tensor([999]))) == 0.0
    with pytest.raises(ConfigError, match="zero_snr"):
        YonosSR.from_base(str(base), scale=4, schedule="zero_snr", prediction="epsilon")
    with pytest.raises(ConfigError, match="prediction"):
        YonosSR.from_base(str(base), scale=4, prediction="flow")
    with pytest.raises(ConfigError, match="no such diffusers folder"):
        YonosSR.from_base(str(base / "missing"), scale=4)
    with pytest.raises(ConfigError, match="not a file"):
        locate_base("hf://owner/repo/unet/config.json", offline=True, progress=False)
    snr = torch.tensor([0.01, 0.5, 3.0, 100.0])
    assert loss_weight(snr, "snr_trunc").tolist() == pytest.approx([1.0, 1.0, 3.0, 100.0])
    assert loss_weight(snr, "min_snr", 5.0).tolist() == pytest.approx([0.01, 0.5, 3.0, 5.0])
    assert loss_weight(snr, "uniform").tolist() == [1.0] * 4


def test_incomplete_base_folder_names_the_missing_file(base, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(base, broken)
    (broken / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ConfigError, match="missing vae/diffusion_pytorch_model.safetensors"):
        YonosSR.from_base(str(broken), scale=4)


def test_base_from_the_hub_downloads_only_what_it_needs(base, fake_hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_ENDPOINT", fake_hub.url)
    for var in ("HF_HUB_OFFLINE", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    files = {p.relative_to(base).as_posix(): p.read_bytes() for p in base.rglob("*") if p.is_file()}
    files["unet/diffusion_pytorch_model.fp16.safetensors"] = b"not wanted"
    commit = fake_hub.commit("owner/tiny-sd", files)
    folder, provenance = locate_base("hf://owner/tiny-sd", offline=False, progress=False)
    assert provenance == {"base": "hf://owner/tiny-sd", "base_commit": commit}
    assert not (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").exists()
    online = YonosSR.from_base("hf://owner/tiny-sd", scale=4)
    # offline, the cached snapshot is enough
    offline = YonosSR.from_base("hf://owner/tiny-sd", scale=4, offline=True)
    assert _same(online.state_dict(), offline.state_dict())
    with pytest.raises(Sr1stepError, match="owner/absent"):
        YonosSR.from_base("hf://owner/absent", scale=4)


# --------------------------------------------------------------------------------------------- the losses


def _method_at(ws, base, tmp_path, stage: int, **extra) -> tuple[YonosMethod, TrainContext]:
    ctx = TrainContext(yonos_config(ws, base, **extra), CPU, tmp_path, lpips_pretrained=False)
    method = YonosMethod()
    method.setup(ctx)
    ctx.setup_data()
    for next_stage in range(1, stage + 1):
        method.start_stage(next_stage)
    return method, ctx


def test_scale_distillation_target_is_the_teacher_x0_on_the_half_scale_lr(ws, base, tmp_path):
    method, ctx = _method_at(ws, base, tmp_path, stage=1)
    model, teacher = method.model, method.teacher
    # make z_lr matter (the new channels start at zero) and the teacher differ from the student
    with torch.no_grad():
        teacher.conv_in.weight[:, 4:].normal_(0, 0.5)
        model.unet.conv_in.weight[:, 4:].normal_(0, 0.5)
    batch = ctx.fetch()
    terms = method.unet_terms(batch)
    size = tuple(batch.hr.shape[-2:])
    assert terms["lr"].shape[-2:] == (8, 8) and terms["lr_teacher"].shape[-2:] == (16, 16)
    # the teacher's LR: the same HR degraded at ×2 with the sample's keyed draw (shared with the student's ×4)
    degradation = dataclasses.replace(ctx.config.data.degradation, scale=2, use_sharp=False)
    for j, key in enumerate(batch.keys):
        expected, _ = degrade(
            (batch.hr[j : j + 1] + 1) / 2,
            degradation,
            torch.Generator().manual_seed(derive_seed(key, DEGRADE_TAG)),
        )
        torch.testing.assert_close(terms["lr_teacher"][j : j + 1], expected * 2 - 1, rtol=0, atol=1e-6)
    # the same noisy HR latent and t for student and teacher
    with torch.no_grad():
        z_h = model.encode_images(batch.hr)
        noise = ctx.random.randn(batch.keys, z_h.shape[1:], "yonos/noise")
        torch.testing.assert_close(terms["z_t"], model.add_noise(z_h, noise, terms["t"]))
        half = model.encode_lr(terms["lr_teacher"], size)
        target = model.predict_x0(terms["z_t"], terms["t"], half, unet=teacher)
        torch.testing.assert_close(terms["target"], target, rtol=0, atol=1e-6)
        student_scale = model.predict_x0(terms["z_t"], terms["t"], terms["z_lr"], unet=teacher)
    # the half-scale input is what the teacher saw
    assert (terms["target"] - student_scale).abs().max() > 1e-3
    assert (terms["target"] - z_h).abs().max() > 1e-3  # not the ground truth
    loss, logs = method.unet_loss(batch)
    weight = model.snr(terms["t"]).clamp(min=1.0)
    torch.testing.assert_close(loss, weight * ((terms["x0"] - target) ** 2).mean(dim=(1, 2, 3)))
    assert "unet/loss_sd" in logs


def test_first_stage_regresses_onto_the_hr_latent(ws, base, tmp_path):
    method, ctx = _method_at(ws, base, tmp_path, stage=0, **{"yonos.timesteps": "terminal"})
    assert method.teacher is None
    batch = ctx.fetch()
    terms = method.unet_terms(batch)
    assert terms["lr"].shape[-2:] == (16, 16) and terms["lr_teacher"] is None
    assert terms["t"].tolist() == [999, 999]
    torch.testing.assert_close(terms["target"], method.model.encode_images(batch.hr))


def test_lr_versions_share_one_draw_per_sample_unless_told_not_to():
    torch.manual_seed(3)
    hr = torch.rand(2, 3, 32, 32) * 2 - 1
    from sr1step.distill.degradations import DegradationConfig

    config = DegradationConfig()
    shared = lr_versions(hr, [11, 12], [4, 2], config, shared=True)
    again = lr_versions(hr[1:], [12], [4, 2], config, shared=True)
    independent = lr_versions(hr, [11, 12], [4, 2], config, shared=False)
    assert [x.shape[-1] for x in shared] == [8, 16]
    assert torch.equal(shared[0][1:], again[0]) and torch.equal(shared[1][1:], again[1])  # per sample, keyed
    assert torch.equal(shared[0], independent[0]) and not torch.equal(shared[1], independent[1])


def test_config_errors(ws, base, tmp_path):
    def setup(**extra):
        YonosMethod().setup(
            TrainContext(yonos_config(ws, base, **extra), CPU, tmp_path, lpips_pretrained=False)
        )

    with pytest.raises(ConfigError, match="model.scale 4 must be the last YONOS stage"):
        setup(**{"yonos.stages": "[2,4,8]"})
    with pytest.raises(ConfigError, match="double"):
        setup(**{"yonos.stages": "[2,8]", "model.scale": 8})
    with pytest.raises(ConfigError, match="train.iterations 7 does not fit"):
        setup(**{"train.iterations": 7})
    with pytest.raises(ConfigError, match="multiple of 4 px"):
        setup(**{"data.gt_size": 34, "yonos.stages": "[2]", "model.scale": 2})
    with pytest.raises(ConfigError, match="paired"):
        setup(**{"data.paired_lq": str(tmp_path), "data.paired_gt": str(tmp_path)})
    with pytest.raises(ConfigError, match="--vae"):
        setup(**{"model.vae": "vq-f4"})
    with pytest.raises(ConfigError, match="yonos.loss_weighting"):
        setup(**{"yonos.loss_weighting": "karras"})


# --------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def chain(ws, base, tmp_path_factory):
    """The tiny ×2 → ×4 → decoder run (2 iterations each), with validation."""
    run_dir = tmp_path_factory.mktemp("yonos_run") / "run"
    config = yonos_config(ws, base, **{"data.val_dir": str(ws["val"])})  # validated at the end
    trainer = Trainer(config, YonosMethod(), run_dir, env=CPU, lpips_pretrained=False, progress=False)
    exported = trainer.run()
    return {"trainer": trainer, "run_dir": run_dir, "exported": exported}


@pytest.mark.slow
def test_chain_switches_stages_freezes_the_unet_and_tunes_the_decoder(chain, base):
    trainer, run_dir = chain["trainer"], chain["run_dir"]
    assert trainer.step == 6 and trainer.config.train.iterations == 6
    rows = [row for row in _log_rows(run_dir) if row.get("stage")]
    assert [float(r["stage"]) for r in rows] == [0, 0, 1, 1, 2, 2]
    assert [float(r["scale"]) for r in rows] == [2, 2, 4, 4, 4, 4]
    values = [
        float(v) for row in _log_rows(run_dir) for k, v in row.items() if v and k not in ("step", "time")
    ]
    assert values and all(math.isfinite(v) for v in values)
    assert all(rows[i]["unet/loss_sr"] for i in (0, 1)) and all(rows[i]["unet/loss_sd"] for i in (2, 3))
    for key in ("decoder/l1", "decoder/lpips", "decoder/g_loss", "disc/loss"):
        assert all(rows[i][key] for i in (4, 5)), key
    assert any(row.get("val/psnr_y") for row in _log_rows(run_dir))
    states = _states(run_dir)
    assert sorted(states) == [2, 4, 6] and [states[s]["stage"] for s in (2, 4, 6)] == [0, 1, 2]
    # stage ×4 starts from the ×2 EMA, which is also its frozen teacher
    assert _same(states[4]["teacher"], states[2]["ema_unet"])
    # the decoder stage leaves the UNet alone and changes the decoder only
    assert _same(states[6]["ema_unet"], states[4]["ema_unet"]) and states[6]["student"] is None
    method = trainer.method
    assert not any(p.requires_grad for p in method.model.unet.parameters())
    base_vae = YonosSR.from_base(str(base), scale=4).vae.state_dict()
    tuned = states[6]["vae"]
    assert all(
        torch.equal(tuned[k], base_vae[k]) for k in tuned if not k.startswith(("decoder.", "post_quant"))
    )
    assert any(not torch.equal(tuned[k], base_vae[k]) for k in tuned if k.startswith("decoder."))
    assert any(
        not torch.equal(states[6]["ema_vae"][k], base_vae[k]) for k in tuned if k.startswith("decoder.")
    )


@pytest.mark.slow
def test_export_loads_in_upscale_with_tiling(chain, tmp_path, capsys):
    exported = chain["exported"]
    assert exported == chain["run_dir"] / "student.safetensors"
    _, metadata = read_checkpoint(exported)
    assert metadata["arch"] == "yonos-sd" and metadata["scale"] == "4" and metadata["stage"] == "decoder"
    assert metadata["decoder"] == "fine-tuned" and not any(
        k.startswith("text") for k in read_checkpoint(exported)[0]
    )
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(
        tmp_path / "in.png"
    )
    args = [
        "upscale",
        str(tmp_path / "in.png"),
        "--model",
        str(exported),
        "-o",
        str(tmp_path / "out"),
        "--seed",
        "0",
    ]
    capsys.readouterr()
    assert run([*args, "--json", "-q"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # the model's 16-latent tile is 8 LR px at ×4 (VAE ×2): a 24×20 image takes several tiles
    assert record["status"] == "ok" and record["tile"] == 8 and record["tiles"] > 4
    assert Image.open(tmp_path / "out" / "in_x4.png").size == (96, 80)
    assert run([*args, "-x", "2", "-q"]) == 1
    assert "×4 YONOS-SR model but ×2 was asked for; use -x 4" in capsys.readouterr().err


@pytest.mark.slow
def test_export_round_trip_gives_identical_outputs(chain, tmp_path):
    exported, method = chain["exported"], chain["trainer"].method
    loaded = load_model(exported)
    assert loaded.descriptor.arch == "yonos-sd" and isinstance(loaded.module, YonosSR)
    assert _same(loaded.module.state_dict(), method.inference_model().state_dict())
    lr = np.random.default_rng(1).random((12, 10, 3)).astype(np.float32)
    outputs = [
        YonosUpscaler(model, scale=4, device=torch.device("cpu"), seed=5).upscale_array(
            lr, out_dtype=np.float32
        )
        for model in (loaded.module, method.inference_model())
    ]
    assert outputs[0].image.shape == (48, 40, 3) and np.array_equal(outputs[0].image, outputs[1].image)
    # a fresh process finds the detector through the metadata arch alone
    probe = "import sys; from sr1step.checkpoints import load_model; m = load_model(sys.argv[1]); print(m.descriptor.arch, m.module.scale)"
    proc = subprocess.run(
        [sys.executable, "-c", probe, str(exported)],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["yonos-sd", "4"]


@pytest.mark.slow
def test_resume_across_stage_boundaries_continues_exactly(ws, base, tmp_path):
    """6 iterations at once == 2 iterations, a kill, then a resume through the ×4 and decoder boundaries."""

    class Killed(Exception):
        pass

    class DiesAtStep3(YonosMethod):
        def train_step(self, ctx, step):
            if step == 2:
                raise Killed
            return super().train_step(ctx, step)

    def trainer(run_dir: Path, method: YonosMethod) -> Trainer:
        return Trainer(
            yonos_config(ws, base), method, run_dir, env=CPU, lpips_pretrained=False, progress=False
        )

    trainer(tmp_path / "straight", YonosMethod()).run()
    with pytest.raises(Killed):
        trainer(tmp_path / "split", DiesAtStep3()).run()
    assert [step for step, _ in list_checkpoints(tmp_path / "split")] == [2]
    resumed = trainer(tmp_path / "split", YonosMethod())
    resumed.run(resume=True)
    assert resumed.step == 6
    a, b = _states(tmp_path / "straight")[6], _states(tmp_path / "split")[6]
    for part in ("ema_unet", "vae", "ema_vae", "disc"):
        assert _same(a[part], b[part]), part


@pytest.mark.slow
def test_distill_cli_runs_the_yonos_chain(ws, base, tmp_path, capsys):
    out = tmp_path / "cli-run"
    settings = {
        "data.gt_size": 32,
        "train.batch": 1,
        "train.num_workers": 0,
        "yonos.stage_iterations": 1,
        "yonos.decoder_iterations": 1,
        "yonos.latent_tile": 16,
    }
    args = [
        "distill",
        "--method",
        "yonos-sr",
        "--base",
        str(base),
        "--data",
        str(ws["hr"]),
        "--out",
        str(out),
    ]
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    capsys.readouterr()
    assert run([*args, "--lpips-random-backbone", "-q"]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["method"] == "yonos-sr" and saved["train"]["iterations"] == 3
    assert saved["yonos"]["base"] == str(base)
    assert read_checkpoint(out / "student.safetensors")[1]["stage"] == "decoder"
    assert run([*args, "--vae", "vq-f4", "-q"]) == 1
    assert "do not apply" in capsys.readouterr().err


DDP_LAUNCHER = """
import sys
import torch

# As in the RSD DDP test: SGD keeps parameters linear in the gradients, so 1 and 2 processes agree to float
# rounding (AdamW's first steps are ~lr·sign(g), which rounding can flip for near-zero gradients).
torch.optim.AdamW = lambda params, lr, betas, weight_decay: torch.optim.SGD(params, lr=lr)
from sr1step.cli import main

sys.argv = ["sr1step", *sys.argv[1:]]
main()
"""


@pytest.mark.slow
def test_ddp_two_processes_match_one_through_every_stage(ws, base, tmp_path):
    """torchrun (gloo, CPU): a new DDP wrapper per stage (×2, ×4, decoder + patch GAN) gives 1-process results."""
    settings = {
        "data.gt_size": 32,
        "data.degradation_grouping": "sample",
        "train.batch": 2,
        "train.microbatch": 1,
        "train.num_workers": 0,
        "train.lr": 0.05,
        "yonos.decoder_lr": 0.05,
        "yonos.stage_iterations": 1,
        "yonos.decoder_iterations": 1,
        "yonos.decoder_gan_weight": 0.5,
        "yonos.decoder_gan_channels": 8,
        "train.ema_rate": 0.5,
        # x0 directly with unit weights: no 1/α or SNR amplification of float rounding
        "yonos.prediction": "sample",
        "yonos.loss_weighting": "uniform",
    }
    args = ["distill", "--method", "yonos-sr", "--base", str(base), "--data", str(ws["hr"]), "-q"]
    args += ["--lpips-random-backbone"]
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    launcher = tmp_path / "launch.py"
    launcher.write_text(DDP_LAUNCHER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    common = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    for nproc in (1, 2):
        proc = subprocess.run(
            [
                *common,
                f"--nproc_per_node={nproc}",
                str(launcher),
                *args,
                "--out",
                str(tmp_path / f"p{nproc}"),
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    single, double = _states(tmp_path / "p1")[3], _states(tmp_path / "p2")[3]
    for part in ("ema_unet", "vae", "ema_vae", "disc"):
        for key in single[part]:
            torch.testing.assert_close(
                single[part][key], double[part][key], rtol=0, atol=1e-5, msg=part + key
            )
    base_model = YonosSR.from_base(str(base), scale=4)
    moved = max(
        (single["ema_unet"][k] - v).abs().max().item() for k, v in base_model.unet.state_dict().items()
    )
    assert moved > 1e-3
