"""Parity with the official ResShift code: the fixtures were produced by it (random weights, CPU, float32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sr1step import diffusion as D

ATOL = 1e-4
SCHEDULE_KEYS = (
    "sqrt_etas",
    "etas",
    "etas_prev",
    "alpha",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("case", ["unet_sq", "unet_wide", "unet_tall"])
def test_unet_forward(small_unet, parity_cases, case):
    with torch.no_grad():
        out = small_unet(parity_cases[f"{case}.x"], parity_cases[f"{case}.t"], parity_cases[f"{case}.lq"])
    assert _max_err(out, parity_cases[f"{case}.out"]) <= ATOL


def test_vq_encode_decode(small_vq, parity_cases):
    with torch.no_grad():
        z = small_vq.encode(parity_cases["vq.img"])
        dec_quant = small_vq.decode(parity_cases["vq.z"])
        dec_noquant = small_vq.decode(parity_cases["vq.z"], quantize=False)
    assert _max_err(z, parity_cases["vq.z"]) <= ATOL
    assert _max_err(dec_quant, parity_cases["vq.dec_quant"]) <= ATOL
    assert _max_err(dec_noquant, parity_cases["vq.dec_noquant"]) <= ATOL
    # quantization must actually matter, or the test above would not check it
    assert _max_err(dec_quant, dec_noquant) > 1e-2


def test_vq_chunked_attention_is_exact(small_vq, parity_cases, monkeypatch):
    """Query chunking (for big tiles) gives the same result as one block."""
    from sr1step.models import vq_autoencoder

    with torch.no_grad():
        whole = small_vq.decode(parity_cases["vq.z"], quantize=False)
        monkeypatch.setattr(vq_autoencoder, "ATTENTION_QUERY_CHUNK", 7)
        monkeypatch.setattr(vq_autoencoder, "QUANTIZE_CHUNK", 5)
        chunked_attn = vq_autoencoder.chunked_attention
        q = torch.randn(2, 50, 16)
        k, v = torch.randn(2, 50, 16), torch.randn(2, 50, 16)
        full = torch.softmax(q @ k.transpose(1, 2) / 4.0, dim=-1) @ v
        assert _max_err(chunked_attn(q, k, v, chunk=7), full) < 1e-5
        chunked = small_vq.decode(parity_cases["vq.z"], quantize=False)
        quant = small_vq.decode(parity_cases["vq.z"])
    assert _max_err(whole, chunked) < 1e-5
    assert _max_err(quant, parity_cases["vq.dec_quant"]) <= ATOL


@pytest.mark.parametrize("name", ["s15", "s4"])
def test_schedules(parity_cases, name):
    schedule = D.ResShiftSchedule.preset(name)
    for key in SCHEDULE_KEYS:
        ref = parity_cases[f"sched_{name}.{key}"].numpy()
        got = getattr(schedule, key)
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-12, err_msg=f"{name}.{key}")


def _lr(parity_cases) -> torch.Tensor:
    return parity_cases["onestep.lr_u8"].float() / 255 * 2 - 1


def test_one_step(small_unet, small_vq, parity_cases):
    schedule = D.ResShiftSchedule.preset("s15")
    lr = _lr(parity_cases)
    with torch.no_grad():
        zy = small_vq.encode(F.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False))
        x0 = D.one_step(schedule, D.unet_denoiser(small_unet, lr), zy, parity_cases["onestep.eps"])
        sr = small_vq.decode(x0).clamp(-1, 1)
    assert _max_err(zy, parity_cases["onestep.z_y"]) <= ATOL
    assert _max_err(x0, parity_cases["onestep.x0"]) <= ATOL
    sr_u8 = torch.round(255 * (sr * 0.5 + 0.5).clamp(0, 1)).to(torch.uint8)
    diff = (sr_u8.int() - parity_cases["onestep.sr_u8"].int()).abs()
    assert diff.max().item() <= 1
    assert (diff > 0).float().mean().item() < 1e-3  # rare ±1 rounding flips only


@pytest.mark.parametrize("name", ["s15", "s4"])
def test_full_sampling(small_unet, small_vq, parity_cases, name):
    schedule = D.ResShiftSchedule.preset(name)
    lr = _lr(parity_cases)
    step_noises = parity_cases[f"sample_{name}.step_noises"]
    assert step_noises.shape[0] == schedule.steps
    with torch.no_grad():
        zy = small_vq.encode(F.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False))
        final = D.sample(
            schedule,
            D.unet_denoiser(small_unet, lr),
            zy,
            parity_cases[f"sample_{name}.eps_prior"],
            step_noise=lambda i: step_noises[i],
        )
        sr = small_vq.decode(final).clamp(-1, 1)
    assert _max_err(final, parity_cases[f"sample_{name}.final_latent"]) <= ATOL
    assert _max_err(sr, parity_cases[f"sample_{name}.sr"]) <= ATOL


def test_training_loss(small_unet, small_vq, parity_cases):
    schedule = D.ResShiftSchedule.preset("s15")
    lq = parity_cases["loss.lq"]
    with torch.no_grad():
        z0 = small_vq.encode(parity_cases["loss.hr"])
        zy = small_vq.encode(F.interpolate(lq, scale_factor=4, mode="bicubic", align_corners=False))
        mse, pred, z_t = D.training_loss(
            schedule,
            D.unet_denoiser(small_unet, lq),
            z0,
            zy,
            parity_cases["loss.t"],
            parity_cases["loss.noise"],
        )
    assert _max_err(z_t, parity_cases["loss.z_t"]) <= ATOL
    assert _max_err(pred, parity_cases["loss.pred_z0"]) <= ATOL
    assert _max_err(mse, parity_cases["loss.mse"]) <= ATOL
