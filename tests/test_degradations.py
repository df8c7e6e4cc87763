"""Tests for the Real-ESRGAN second-order degradation, its kernels, noise, JPEG and the training-pair pool."""

from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sr1step.distill.degradations import (
    DegradationConfig,
    TrainingPairPool,
    apply_plan,
    degrade,
    filter2d,
    gaussian_kernels,
    gaussian_noise,
    generalized_gaussian_kernels,
    identity_kernels,
    jpeg_compress,
    jpeg_quant_tables,
    plateau_kernels,
    poisson_noise,
    random_blur_kernels,
    random_final_sinc_kernels,
    reflect_pad,
    sample_plan,
    sinc_kernels,
    usm_sharpen,
)
from sr1step.errors import ConfigError

# Every switchable stage off and area resizing only: what is left is the final resize to the LR size.
ALL_STAGES_OFF = dict(
    blur1=False,
    resize1=False,
    noise1=False,
    jpeg1=False,
    second_order=False,
    blur2=False,
    resize2=False,
    noise2=False,
    final_sinc=False,
    final_jpeg=False,
    resize_modes=("area",),
)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _natural_image(height: int, width: int, seed: int = 0, coloured_shapes: bool = False) -> np.ndarray:
    """A natural-ish uint8 RGB image: smooth colour fields, hard-edged shapes and fine luma texture.

    The shapes change only the luminance by default (smooth chroma, which 4:2:0 JPEG keeps almost exactly);
    ``coloured_shapes`` fills them with random colours, giving sharp chroma edges.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    image = np.full((height, width, 3), 0.5)
    for channel in range(3):
        for _ in range(4):
            fx, fy = rng.uniform(0.3, 3, 2)
            phase = rng.uniform(0, 6)
            image[..., channel] += rng.uniform(0.03, 0.1) * np.sin(2 * np.pi * (fx * xx + fy * yy) + phase)
    luma = np.zeros((height, width))
    for _ in range(5):
        cy, cx, radius = rng.uniform(0, 1, 3) * [1, 1, 0.25]
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
        if coloured_shapes:
            image[inside] = rng.uniform(0.1, 0.9, 3)
        else:
            luma[inside] = rng.uniform(-0.25, 0.25)
    texture = rng.normal(0, 0.03, (height, width))
    luma += (texture + np.roll(texture, 1, 0) + np.roll(texture, 1, 1)) / 2
    return (np.clip(image + luma[..., None], 0, 1) * 255).round().astype(np.uint8)


def _to_batch(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 255


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return 10 * math.log10(1 / float(((a - b) ** 2).mean()))


def _pillow_jpeg(image: np.ndarray, quality: int) -> torch.Tensor:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=quality, subsampling=2)  # 2 = 4:2:0
    buffer.seek(0)
    return _to_batch(np.asarray(Image.open(buffer).convert("RGB")))


def _is_8bit(images: torch.Tensor) -> bool:
    return bool(((images * 255) - (images * 255).round()).abs().max() < 1e-4)


# ----------------------------------------------------------------------------------------------- config


def test_config_defaults_are_the_reference_values():
    config = DegradationConfig()
    assert config.scale == 4 and config.use_sharp is False
    assert config.kernel_sizes == (3, 5, 7, 9, 11, 13, 15, 17, 19)
    assert config.kernel_sizes2 == config.final_sinc_sizes == (3, 5, 7, 9, 11, 13)
    assert config.kernel_prob == config.kernel_prob2 == (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    assert (config.sinc_prob, config.sinc_prob2, config.final_sinc_prob) == (0.1, 0.1, 0.8)
    assert (config.blur_sigma, config.blur_sigma2) == ((0.2, 3.0), (0.2, 1.5))
    assert config.betag_range == config.betag_range2 == (0.5, 4.0)
    assert config.betap_range == config.betap_range2 == (1.0, 2.0)
    assert (config.resize_prob, config.resize_range) == ((0.2, 0.7, 0.1), (0.15, 1.5))
    assert (config.resize_prob2, config.resize_range2) == ((0.3, 0.4, 0.3), (0.3, 1.2))
    assert (config.gaussian_noise_prob, config.noise_range, config.poisson_scale_range) == (
        0.5,
        (1, 30),
        (0.05, 3),
    )
    assert (config.gaussian_noise_prob2, config.noise_range2, config.poisson_scale_range2) == (
        0.5,
        (1, 25),
        (0.05, 2.5),
    )
    assert config.gray_noise_prob == config.gray_noise_prob2 == 0.4
    assert config.jpeg_range == config.jpeg_range2 == (30, 95)
    assert (config.second_order_prob, config.second_blur_prob, config.final_resize_first_prob) == (
        0.5,
        0.8,
        0.5,
    )
    assert config.resize_modes == ("area", "bilinear", "bicubic") and config.pool_batches == 10


def test_config_from_dict_takes_lists_and_rejects_unknown_keys():
    config = DegradationConfig.from_dict({"jpeg_range": [40, 90], "noise2": False})
    assert config.jpeg_range == (40, 90) and config.noise2 is False
    assert DegradationConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="jpeg_rang"):
        DegradationConfig.from_dict({"jpeg_rang": [40, 90]})


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"sinc_prob": 1.5}, "sinc_prob"),
        ({"kernel_prob": (0.5, 0.5, 0.0, 0.0, 0.0, 0.1)}, "kernel_prob"),
        ({"kernel_list": ("iso", "box")}, "box"),
        ({"kernel_sizes": (3, 4)}, "kernel_sizes"),
        ({"resize_prob": (0.5, 0.5)}, "resize_prob"),
        ({"resize_range": (1.2, 1.5)}, "resize_range"),
        ({"jpeg_range2": (30, 120)}, "jpeg_range2"),
        ({"noise_range": (30, 1)}, "noise_range"),
        ({"resize_modes": ("nearest",)}, "nearest"),
        ({"scale": 0}, "scale"),
        ({"sinc_prob": "0.1"}, "wrong type"),
    ],
)
def test_config_rejects_bad_values(override, message):
    with pytest.raises(ConfigError, match=message):
        DegradationConfig(**override)


# ------------------------------------------------------------------------------------------- pipeline


def test_degrade_shapes_ranges_and_8bit_levels():
    gt = torch.rand(4, 3, 64, 64)
    for seed in range(6):  # several seeds cover both final orders and the second-order gate
        lq, gt_out = degrade(gt, DegradationConfig(), _generator(seed))
        assert lq.shape == (4, 3, 16, 16) and lq.dtype == torch.float32
        assert lq.min() >= 0 and lq.max() <= 1 and _is_8bit(lq)
        assert torch.equal(gt_out, gt)  # no sharpening in RSD
    lq, _ = degrade(torch.rand(1, 3, 256, 256), DegradationConfig(), _generator(0))
    assert lq.shape == (1, 3, 64, 64)  # RSD's sizes: 256 GT → 64 LR


def test_degrade_is_deterministic_under_a_seed():
    gt = torch.rand(3, 3, 64, 64)
    first, _ = degrade(gt, DegradationConfig(), _generator(7))
    again, _ = degrade(gt, DegradationConfig(), _generator(7))
    other, _ = degrade(gt, DegradationConfig(), _generator(8))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_degrade_rejects_bad_input():
    with pytest.raises(ConfigError, match="not divisible"):
        degrade(torch.rand(1, 3, 30, 32), DegradationConfig(), _generator(0))
    with pytest.raises(ConfigError, match=r"\(B, 3, H, W\)"):
        degrade(torch.rand(3, 32, 32), DegradationConfig(), _generator(0))
    # The second resize goes down from the 1×1 LR size of a 4×4 GT: nothing is left.
    always_down = DegradationConfig(
        **ALL_STAGES_OFF
        | {"second_order": True, "second_order_prob": 1.0, "resize2": True, "resize_prob2": (0, 1, 0)}
    )
    with pytest.raises(ConfigError, match="larger GT crops"):
        degrade(torch.rand(1, 3, 4, 4), always_down, _generator(0))


def test_all_stages_off_is_a_plain_area_downscale():
    gt = torch.rand(2, 3, 64, 64)
    lq, _ = degrade(gt, DegradationConfig(**ALL_STAGES_OFF), _generator(0))
    expected = (F.avg_pool2d(gt, 4) * 255).round() / 255
    torch.testing.assert_close(lq, expected, atol=1e-6, rtol=0)


def test_plan_does_not_depend_on_stage_switches():
    full = sample_plan(3, DegradationConfig(), _generator(3))
    switched = sample_plan(
        3,
        DegradationConfig(**ALL_STAGES_OFF | {"resize_modes": ("area", "bilinear", "bicubic")}),
        _generator(3),
    )
    for field in dataclasses.fields(full):
        a, b = getattr(full, field.name), getattr(switched, field.name)
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), field.name
        elif field.name.startswith("noise"):
            assert a.seed == b.seed and torch.equal(a.sigma, b.sigma), field.name
        else:
            assert a == b, field.name


# Each stage alone, with its probabilities forced so that it fires, must change the LQ of the all-off baseline.
STAGE_ALONE = {
    "blur1": {"blur1": True},
    "resize1": {"resize1": True, "resize_prob": (0.0, 1.0, 0.0)},
    "noise1": {"noise1": True},
    "jpeg1": {"jpeg1": True, "jpeg_range": (30, 40)},
    "blur2": {"second_order": True, "second_order_prob": 1.0, "blur2": True, "second_blur_prob": 1.0},
    "resize2": {"second_order": True, "second_order_prob": 1.0, "resize2": True, "resize_prob2": (0, 1, 0)},
    "noise2": {"second_order": True, "second_order_prob": 1.0, "noise2": True},
    "final_sinc": {"final_sinc": True, "final_sinc_prob": 1.0},
    "final_jpeg": {"final_jpeg": True, "jpeg_range2": (30, 40)},
}


@pytest.mark.parametrize("stage", sorted(STAGE_ALONE))
def test_each_stage_alone_changes_the_lq(stage):
    gt = torch.from_numpy(np.stack([_natural_image(64, 64, s) for s in range(2)])).permute(0, 3, 1, 2) / 255
    baseline, _ = degrade(gt, DegradationConfig(**ALL_STAGES_OFF), _generator(5))
    changed, _ = degrade(gt, DegradationConfig(**ALL_STAGES_OFF | STAGE_ALONE[stage]), _generator(5))
    assert changed.shape == baseline.shape
    # Measured: 47 % (blur2, weak sigma before a ×4 downscale) to 98 % (final JPEG) of the LQ values change.
    assert (changed != baseline).float().mean() > 0.3


@pytest.mark.parametrize("stage", ["blur1", "noise1", "jpeg1", "final_sinc", "final_jpeg"])
def test_switching_a_stage_off_changes_only_that_stage(stage):
    forced = {"final_sinc_prob": 1.0, "second_order_prob": 0.0}
    gt = _to_batch(_natural_image(64, 64, 1))
    full, _ = degrade(gt, DegradationConfig(**forced), _generator(11))
    without, _ = degrade(gt, DegradationConfig(**forced, **{stage: False}), _generator(11))
    assert not torch.equal(full, without)


def test_gaussian_noise_stage_adds_noise_of_the_drawn_strength():
    # Only noise1 (Gaussian, colour, sigma 20 levels) before an area ×4 downscale: the 16 averaged iid samples
    # leave sigma / 4 in the LQ (the 1/255 quantisation adds a negligible 0.3/255).
    noise_only = {"noise1": True, "gaussian_noise_prob": 1.0, "noise_range": (20, 20), "gray_noise_prob": 0.0}
    gt = 0.3 + 0.4 * torch.rand(2, 3, 128, 128)  # away from 0 and 1 so clipping does not bias the noise
    clean, _ = degrade(gt, DegradationConfig(**ALL_STAGES_OFF), _generator(2))
    noisy, _ = degrade(gt, DegradationConfig(**ALL_STAGES_OFF | noise_only), _generator(2))
    measured = float((noisy - clean).std())
    assert measured == pytest.approx(20 / 255 / 4, rel=0.1)


def test_sharpening_of_the_gt():
    gt = _to_batch(_natural_image(64, 64, 2))
    lq, sharpened = degrade(gt, DegradationConfig(**ALL_STAGES_OFF, use_sharp=True), _generator(0))
    assert not torch.equal(sharpened, gt) and sharpened.min() >= 0 and sharpened.max() <= 1

    # Sharpening raises local contrast; the LQ is made from the sharpened GT.
    def detail(x: torch.Tensor) -> float:
        return float((x[..., 1:] - x[..., :-1]).abs().mean())

    assert detail(sharpened) > detail(gt)
    torch.testing.assert_close(lq, (F.avg_pool2d(sharpened, 4) * 255).round() / 255, atol=1e-6, rtol=0)
    flat = torch.full((1, 3, 32, 32), 0.4)
    torch.testing.assert_close(usm_sharpen(flat), flat)


def test_plan_frequencies_follow_the_configured_probabilities():
    config = DegradationConfig()
    generator = _generator(0)
    plans = [sample_plan(4, config, generator) for _ in range(300)]
    directions = [p.resize1.direction for p in plans]
    for direction, probability in zip(("up", "down", "keep"), config.resize_prob, strict=True):
        assert directions.count(direction) / len(plans) == pytest.approx(probability, abs=0.07)
    assert all(1 <= p.resize1.scale <= 1.5 for p in plans if p.resize1.direction == "up")
    assert all(0.15 <= p.resize1.scale <= 1 for p in plans if p.resize1.direction == "down")
    assert all(0.3 <= p.resize2.scale <= 1.2 for p in plans)
    assert np.mean([p.second_order for p in plans]) == pytest.approx(0.5, abs=0.08)
    assert np.mean([p.blur2 for p in plans]) == pytest.approx(0.8, abs=0.07)
    assert np.mean([p.final_resize_first for p in plans]) == pytest.approx(0.5, abs=0.08)
    assert np.mean([p.noise1.gaussian for p in plans]) == pytest.approx(0.5, abs=0.08)
    assert {p.final_mode for p in plans} == {"area", "bilinear", "bicubic"}
    gray = torch.cat([p.noise1.gray for p in plans]).float().mean()
    assert float(gray) == pytest.approx(0.4, abs=0.05)
    sigma = torch.cat([p.noise1.sigma for p in plans]) * 255
    assert sigma.min() >= 1 and sigma.max() <= 30
    quality = torch.cat([p.jpeg_quality1 for p in plans])
    assert quality.min() >= 30 and quality.max() <= 95
    # The final sinc is used with p = 0.8: the identity kernel has a single 1 at the centre.
    identity = torch.cat([(p.sinc_kernel.flatten(1).max(dim=1).values == 1) for p in plans]).float().mean()
    assert float(identity) == pytest.approx(0.2, abs=0.05)


def test_apply_plan_reuses_a_plan_exactly():
    gt = torch.rand(2, 3, 64, 64)
    plan = sample_plan(2, DegradationConfig(), _generator(4))
    first, _ = apply_plan(gt, plan, DegradationConfig())
    second, _ = apply_plan(gt, plan, DegradationConfig())
    assert torch.equal(first, second)
    with pytest.raises(ConfigError, match="plan is for 2 images, got a batch of 3"):
        apply_plan(torch.rand(3, 3, 64, 64), plan, DegradationConfig())


# -------------------------------------------------------------------------------------------- kernels


def _kernel_variances(kernels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    axis = torch.arange(kernels.shape[-1]) - kernels.shape[-1] // 2
    var_x = (kernels * axis.view(1, 1, -1) ** 2).sum(dim=(1, 2))
    var_y = (kernels * axis.view(1, -1, 1) ** 2).sum(dim=(1, 2))
    return var_x, var_y


def test_gaussian_kernel_formula_symmetry_and_support():
    sigma = torch.tensor([1.5])
    kernel = gaussian_kernels(7, sigma, sigma, torch.zeros(1), pad_to=11)[0]
    assert kernel.shape == (11, 11)
    assert float(kernel.sum()) == pytest.approx(1.0, abs=1e-6)
    # Only the centred 7×7 window is non-zero; inside it the value follows exp(-r²/2σ²).
    assert kernel[:2].abs().sum() == 0 and kernel[:, :2].abs().sum() == 0 and kernel[2:9, 2:9].min() > 0
    assert float(kernel[5, 6] / kernel[5, 5]) == pytest.approx(math.exp(-0.5 / 1.5**2), rel=1e-5)
    assert float(kernel[6, 6] / kernel[5, 5]) == pytest.approx(math.exp(-1.0 / 1.5**2), rel=1e-5)
    for symmetric in (kernel.T, kernel.flip(0), kernel.flip(1), torch.rot90(kernel)):
        torch.testing.assert_close(symmetric, kernel)


def test_anisotropic_kernels_follow_sigma_and_rotation():
    sx, sy = torch.tensor([2.5]), torch.tensor([0.8])
    wide = gaussian_kernels(15, sx, sy, torch.zeros(1))
    var_x, var_y = _kernel_variances(wide)
    assert float(var_x) > 4 * float(var_y)
    rotated = gaussian_kernels(15, sx, sy, torch.tensor([math.pi / 2]))
    torch.testing.assert_close(rotated, gaussian_kernels(15, sy, sx, torch.zeros(1)), atol=1e-6, rtol=0)
    # beta = 1 turns the generalized Gaussian into the Gaussian.
    theta = torch.tensor([0.4])
    torch.testing.assert_close(
        generalized_gaussian_kernels(15, sx, sy, theta, torch.ones(1)), gaussian_kernels(15, sx, sy, theta)
    )


def test_plateau_kernel_is_flatter_at_the_top_than_the_gaussian():
    sigma, theta = torch.tensor([2.0]), torch.zeros(1)
    plateau = plateau_kernels(15, sigma, sigma, theta, torch.tensor([2.0]))[0]
    gaussian = gaussian_kernels(15, sigma, sigma, theta)[0]
    # 1/(q^β+1) with β = 2 at q = 1/σ² (one pixel off centre): nearly the peak value.
    assert float(plateau[7, 8] / plateau[7, 7]) == pytest.approx(1 / (0.25**2 + 1), rel=1e-5)
    assert float(plateau[7, 8] / plateau[7, 7]) > float(gaussian[7, 8] / gaussian[7, 7])


def _response(kernel: torch.Tensor, wx: float, wy: float) -> float:
    """Frequency response of a centrally symmetric kernel (real) at (wx, wy) radians per sample."""
    axis = torch.arange(kernel.shape[-1]) - kernel.shape[-1] // 2
    ys, xs = torch.meshgrid(axis, axis, indexing="ij")
    return float((kernel * torch.cos(wx * xs + wy * ys)).sum())


def test_sinc_kernel_matches_the_jinc_formula():
    special = pytest.importorskip("scipy.special")
    cutoff = 1.3
    kernel = sinc_kernels(9, torch.tensor([cutoff]))[0].double()
    axis = np.arange(9) - 4
    radius = np.hypot(*np.meshgrid(axis, axis))
    with np.errstate(invalid="ignore", divide="ignore"):
        expected = cutoff * special.j1(cutoff * radius) / (2 * np.pi * radius)
    expected[4, 4] = cutoff**2 / (4 * np.pi)
    expected /= expected.sum()
    np.testing.assert_allclose(kernel.numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("cutoff", [math.pi / 3, math.pi / 2])
def test_sinc_kernel_passes_below_and_stops_above_its_cutoff(cutoff):
    kernel = sinc_kernels(21, torch.tensor([cutoff]))[0]
    diagonal = 1 / math.sqrt(2)
    # Truncated to 21 taps the jinc has ripples of a few percent; 0.15 separates pass from stop clearly.
    for wx, wy in ((1, 0), (0, 1), (diagonal, diagonal)):
        assert _response(kernel, 0.5 * cutoff * wx, 0.5 * cutoff * wy) == pytest.approx(1.0, abs=0.15)
        assert _response(kernel, cutoff * wx, cutoff * wy) == pytest.approx(0.5, abs=0.1)
        assert abs(_response(kernel, 1.5 * cutoff * wx, 1.5 * cutoff * wy)) < 0.15


def test_random_blur_kernels_sum_to_one_with_requested_sizes():
    config = DegradationConfig(sinc_prob=0.3)
    kernels = random_blur_kernels(400, config, 1, _generator(0))
    assert kernels.shape == (400, 19, 19)
    torch.testing.assert_close(kernels.sum(dim=(1, 2)), torch.ones(400), atol=1e-5, rtol=0)
    support = (kernels != 0).any(dim=1).sum(dim=1)  # non-zero columns = the drawn size
    assert set(support.tolist()) == set(config.kernel_sizes)
    assert (kernels < 0).any()  # sinc kernels have negative lobes
    second = random_blur_kernels(50, config, 2, _generator(0))
    assert second.shape == (50, 13, 13)


def test_random_blur_kernel_types_follow_the_list():
    iso = DegradationConfig(kernel_list=("iso",), kernel_prob=(1.0,), sinc_prob=0.0)
    kernels = random_blur_kernels(64, iso, 1, _generator(1))
    torch.testing.assert_close(kernels, kernels.transpose(1, 2))
    assert (kernels >= 0).all()
    aniso = DegradationConfig(kernel_list=("aniso",), kernel_prob=(1.0,), sinc_prob=0.0)
    kernels = random_blur_kernels(64, aniso, 1, _generator(1))
    assert not torch.allclose(kernels, kernels.transpose(1, 2))
    sinc_only = DegradationConfig(sinc_prob=1.0, kernel_sizes=(21,))
    kernels = random_blur_kernels(64, sinc_only, 1, _generator(1))
    assert (kernels.flatten(1).min(dim=1).values < 0).all()


def test_final_sinc_kernels_are_sinc_or_identity():
    always = random_final_sinc_kernels(32, DegradationConfig(final_sinc_prob=1.0), _generator(0))
    assert always.shape == (32, 13, 13) and (always.flatten(1).max(dim=1).values < 1).all()
    never = random_final_sinc_kernels(8, DegradationConfig(final_sinc_prob=0.0), _generator(0))
    assert torch.equal(never, identity_kernels(8, 13))


# ------------------------------------------------------------------------------------------ filtering


def test_filter2d_applies_each_sample_its_own_kernel_with_reflect_padding():
    images = torch.rand(2, 3, 12, 10)
    kernels = torch.stack(
        [identity_kernels(1, 5)[0], gaussian_kernels(5, torch.ones(1), torch.ones(1), torch.zeros(1))[0]]
    )
    out = filter2d(images, kernels)
    torch.testing.assert_close(out[0], images[0])
    reference = F.conv2d(
        F.pad(images[1:], (2, 2, 2, 2), mode="reflect"), kernels[1].expand(3, 1, 5, 5), groups=3
    )
    torch.testing.assert_close(out[1:], reference)


def test_reflect_pad_goes_beyond_the_image_size():
    image = torch.arange(3.0).view(1, 1, 1, 3).expand(1, 1, 3, 3)
    padded = reflect_pad(image, 5)
    expected = np.pad(image[0, 0].numpy(), 5, mode="reflect")
    np.testing.assert_array_equal(padded[0, 0].numpy(), expected)
    torch.testing.assert_close(reflect_pad(image, 2), F.pad(image, (2, 2, 2, 2), mode="reflect"))


# ---------------------------------------------------------------------------------------------- noise


def test_gaussian_noise_strength_and_gray_channels():
    images = torch.full((2, 3, 96, 96), 0.5)
    noise = gaussian_noise(images, torch.tensor([0.05, 0.1]), torch.tensor([False, True]), _generator(0))
    assert float(noise[0].std()) == pytest.approx(0.05, rel=0.05)
    assert float(noise[1].std()) == pytest.approx(0.1, rel=0.05)
    assert torch.equal(noise[1, 0], noise[1, 1]) and torch.equal(noise[1, 0], noise[1, 2])
    correlation = np.corrcoef(noise[0, 0].flatten().numpy(), noise[0, 1].flatten().numpy())[0, 1]
    assert abs(correlation) < 0.05


@pytest.mark.parametrize(("levels", "vals"), [(np.arange(64, 192), 128), (np.array([80, 120, 160]), 4)])
def test_poisson_noise_variance_scales_with_intensity_and_scale(levels, vals):
    # Real-ESRGAN's Poisson noise: (Poisson(x·v)/v − x)·scale, v = distinct 8-bit levels rounded up to a power
    # of two, so var = scale²·x/v at every pixel and the mean is 0.
    rng = np.random.default_rng(0)
    codes = rng.choice(levels, size=(2, 3, 128, 128))
    codes[:, 0, 0, : len(levels)] = levels  # every level present in each sample
    images = torch.from_numpy(codes).float() / 255
    scale = torch.tensor([0.5, 2.0])
    noise = poisson_noise(images, scale, torch.tensor([False, False]), _generator(1))
    for i in range(2):
        normalised = noise[i] ** 2 / images[i]
        assert float(normalised.mean()) == pytest.approx(float(scale[i]) ** 2 / vals, rel=0.05)
        assert abs(float(noise[i].mean())) < 0.01 * float(scale[i])
    gray = poisson_noise(images, scale, torch.tensor([True, True]), _generator(1))
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])


# ----------------------------------------------------------------------------------------------- JPEG


def test_jpeg_tables_follow_libjpeg_quality_scaling():
    luma, chroma = jpeg_quant_tables(torch.tensor([50.0, 100.0, 10.0]))
    assert (
        luma[0, 0, 0] == 16 and chroma[0, 0, 0] == 17 and luma[0, 7, 7] == 99
    )  # quality 50 = the base tables
    assert (luma[1] == 1).all() and (chroma[1] == 1).all()  # quality 100
    assert luma[2, 0, 0] == 80 and chroma[2, 7, 7] == 255  # 16·5 and 99·5 clamped to 255


# The torch JPEG is compared with Pillow (libjpeg-turbo) at the same quality and 4:2:0 subsampling, on images with
# sharp colour and luminance edges. The two differ only where a DCT coefficient lies near a rounding boundary
# (libjpeg's fixed-point DCT vs a float DCT), flipping a few quantised values: measured PSNR(ours, Pillow) is
# 44.8-48.2 dB on these cases, while the JPEG error itself (PSNR vs the original) is 27.5-33 dB. Plausible mistakes
# measured on the same cases stay at or below 40.4 dB: luma/chroma tables swapped, quality off by 5, nearest
# instead of "fancy" chroma upsampling, chroma decimated instead of averaged, transposed DCT. 43 dB sits between
# the two with about 2 dB on either side.
@pytest.mark.parametrize(("height", "width"), [(128, 128), (100, 76)])
@pytest.mark.parametrize("quality", [30, 50, 75, 95])
def test_jpeg_matches_pillow(height, width, quality):
    image = _natural_image(height, width, seed=quality, coloured_shapes=True)
    original = _to_batch(image)
    ours = jpeg_compress(original, quality)
    pillow = _pillow_jpeg(image, quality)
    assert _is_8bit(ours)
    assert _psnr(ours, pillow) > 43
    assert _psnr(ours, original) == pytest.approx(_psnr(pillow, original), abs=0.5)


def test_jpeg_quality_100_is_near_lossless_and_quality_orders_the_error():
    original = _to_batch(_natural_image(64, 64, seed=3))
    # Only the 4:2:0 chroma averaging and 8-bit roundings remain at quality 100 (Pillow: 45-50 dB here).
    assert _psnr(jpeg_compress(original, 100), original) > 44
    errors = [_psnr(jpeg_compress(original, q), original) for q in (20, 50, 80, 95)]
    assert errors == sorted(errors)


def test_jpeg_quality_per_sample():
    images = torch.cat([_to_batch(_natural_image(48, 48, seed=s)) for s in range(2)])
    batched = jpeg_compress(images, torch.tensor([35.0, 90.0]))
    torch.testing.assert_close(batched[0:1], jpeg_compress(images[0:1], 35.0))
    torch.testing.assert_close(batched[1:2], jpeg_compress(images[1:2], 90.0))


# ----------------------------------------------------------------------------------------------- pool


def _tagged_batch(start: int, size: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """LQ/GT batches whose every pixel holds the pair's id, so alignment and provenance can be checked."""
    ids = torch.arange(start, start + size, dtype=torch.float32)
    return ids.view(-1, 1, 1, 1).expand(-1, 3, 2, 2).clone(), ids.view(-1, 1, 1, 1).expand(
        -1, 3, 8, 8
    ).clone()


def test_pool_fills_then_mixes_pairs_from_earlier_batches():
    pool = TrainingPairPool(capacity=12, seed=0)
    for step in range(3):  # filling: the incoming batch comes straight back
        lq, gt = _tagged_batch(step * 4)
        out_lq, out_gt = pool.exchange(lq, gt)
        assert torch.equal(out_lq, lq) and torch.equal(out_gt, gt)
    assert len(pool) == 12
    seen: set[int] = set()
    for step in range(3, 10):
        out_lq, out_gt = pool.exchange(*_tagged_batch(step * 4))
        ids = out_lq[:, 0, 0, 0]
        assert torch.equal(ids, out_gt[:, 0, 0, 0])  # LQ and GT stay paired
        assert (ids < step * 4).all()  # an output pair was stored by an earlier call
        seen.update(int(i) for i in ids)
    assert len(seen) > 8  # pairs drawn from across the pool, not one batch


def test_pool_state_dict_resumes_exactly():
    reference = TrainingPairPool(capacity=8, seed=5)
    for step in range(5):
        reference.exchange(*_tagged_batch(step * 4))
    resumed = TrainingPairPool(capacity=8, seed=999)
    resumed.load_state_dict(reference.state_dict())
    for step in range(5, 12):
        expected = reference.exchange(*_tagged_batch(step * 4))
        got = resumed.exchange(*_tagged_batch(step * 4))
        assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1])


def test_pool_errors_and_passthrough():
    with pytest.raises(ConfigError, match="not a multiple"):
        TrainingPairPool(capacity=10).exchange(*_tagged_batch(0, 4))
    pool = TrainingPairPool(capacity=8)
    pool.exchange(*_tagged_batch(0, 4))
    with pytest.raises(ConfigError, match="holds"):
        pool.exchange(torch.zeros(4, 3, 3, 3), torch.zeros(4, 3, 12, 12))
    with pytest.raises(ConfigError, match="capacity 8"):
        TrainingPairPool(capacity=16).load_state_dict(pool.state_dict())
    lq, gt = _tagged_batch(0, 3)
    out = TrainingPairPool(capacity=0).exchange(lq, gt)
    assert out[0] is lq and out[1] is gt
