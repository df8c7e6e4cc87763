"""Schedule values from the reference tables and the sampler contracts (no fixtures needed)."""

from __future__ import annotations

import math

import pytest
import torch

from sr1step import diffusion as D
from sr1step.errors import ConfigError


def test_reference_constants():
    s15 = D.ResShiftSchedule.preset("s15")
    assert s15.etas[14] == pytest.approx(0.9801, abs=1e-12)
    assert s15.kappa * s15.sqrt_etas[14] == pytest.approx(1.98, abs=1e-12)
    assert 1 / math.sqrt(s15.kappa**2 * s15.etas[14] + 1) == pytest.approx(0.4508164918, abs=1e-10)
    assert s15.sqrt_etas[1] == pytest.approx(0.1171650823, abs=1e-10)
    s4 = D.ResShiftSchedule.preset("s4")
    assert list(s4.sqrt_etas.round(10)) == pytest.approx([0.1, 0.5200963722, 0.7613819906, 0.99], abs=1e-10)
    assert s4.posterior_log_variance_clipped[0] == s4.posterior_log_variance_clipped[1]


def test_schedule_errors():
    with pytest.raises(ConfigError, match="unknown schedule 's7'"):
        D.ResShiftSchedule.preset("s7")
    with pytest.raises(ConfigError, match="at least 2 steps"):
        D.ResShiftSchedule(steps=1)


def test_scale_input_and_prior():
    s = D.ResShiftSchedule.preset("s15")
    zy, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(D.prior_sample(s, zy, eps), zy + 1.98 * eps)
    torch.testing.assert_close(D.prior_sample(s, zy, eps, "kappa"), zy + 2.0 * eps)
    torch.testing.assert_close(D.scale_input(s, zy, 14), zy * 0.4508164918)
    with pytest.raises(ConfigError):
        D.prior_sample(s, zy, eps, "sqrt")


def test_q_sample_endpoints():
    s = D.ResShiftSchedule.preset("s15")
    z0, zy, noise = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4), torch.zeros(1, 3, 4, 4)
    # with zero noise, z_t moves from (almost) z0 at t=0 to (almost) zy at t=T-1
    torch.testing.assert_close(D.q_sample(s, z0, zy, 0, noise), z0 + 0.0004 * (zy - z0))
    torch.testing.assert_close(D.q_sample(s, z0, zy, 14, noise), z0 + 0.9801 * (zy - z0))


def test_one_step_calls_denoiser_once_at_last_step():
    s = D.ResShiftSchedule.preset("s15")
    calls = []

    def denoiser(x_in, t):
        calls.append((x_in.clone(), t.clone()))
        return torch.zeros_like(x_in)

    zy, eps = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    D.one_step(s, denoiser, zy, eps)
    assert len(calls) == 1 and calls[0][1].tolist() == [14]
    torch.testing.assert_close(calls[0][0], (zy + 1.98 * eps) * 0.4508164918)


def test_sample_with_perfect_denoiser_lands_on_x0():
    """If the denoiser always returns the true x0, the last posterior step (t=0, no noise) returns it exactly."""
    s = D.ResShiftSchedule.preset("s4")
    x0 = torch.randn(1, 3, 4, 4)
    steps = []
    out = D.sample(
        s,
        lambda x, t: x0,
        torch.randn(1, 3, 4, 4),
        torch.randn(1, 3, 4, 4),
        callback=lambda info: steps.append(info["t"]),
    )
    assert steps == [3, 2, 1, 0]
    torch.testing.assert_close(out, x0)


def test_eps_from_x0_recovers_the_noise():
    s = D.ResShiftSchedule.preset("s15")
    x0, zy, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    t = torch.tensor([0, 9])
    z_t = D.q_sample(s, x0, zy, t, eps)
    torch.testing.assert_close(D.eps_from_x0(s, z_t, x0, zy, t), eps, atol=2e-4, rtol=1e-4)


def test_ddim_matches_the_reference_recursion():
    """z_{t−1} = k ẑ0 + m z_t + j z_y with the SinSR coefficients, computed here in float64 by hand."""
    s = D.ResShiftSchedule.preset("s15")
    zy, eps = torch.randn(1, 3, 4, 4, dtype=torch.float64), torch.randn(1, 3, 4, 4, dtype=torch.float64)

    def denoiser(x_in, t):  # a simple input-dependent "network"
        return 0.5 * x_in.tanh() + 0.1 * t.view(-1, 1, 1, 1)

    z = zy + s.kappa * s.sqrt_etas[14] * eps
    for t in range(14, 0, -1):
        x0 = denoiser(z / (s.kappa**2 * s.etas[t] + 1) ** 0.5, torch.tensor([t]))
        e, ep = s.etas[t], s.etas[t - 1]
        z = (
            (1 - ep + (ep * e) ** 0.5 - (ep / e) ** 0.5) * x0
            + (ep / e) ** 0.5 * z
            + (ep - (ep * e) ** 0.5) * zy
        )
    expected = denoiser(z / (s.kappa**2 * s.etas[0] + 1) ** 0.5, torch.tensor([0]))
    got = D.sample_ddim(s, denoiser, zy.float(), eps.float())
    torch.testing.assert_close(got, expected.float(), atol=1e-5, rtol=1e-5)
