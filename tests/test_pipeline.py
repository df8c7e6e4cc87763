"""The tiled one-step pipeline: official parity, seams, determinism, tiny images, memory-bounded retries."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny import LocalUNet, LocalVQ, tiny_unet, tiny_vq

from sr1step.checkpoints import InferenceSpec
from sr1step.errors import ConfigError
from sr1step.pipeline import TileSettings, Upscaler
from sr1step.tiling import BlockNoise, blend_window, plan_tiles, reflect_index, tile_starts


def _rsd_upscaler(**tiles) -> Upscaler:
    return Upscaler(
        tiny_unet(noise_channels=1),
        tiny_vq(),
        InferenceSpec(family="rsd"),
        tiles=TileSettings(**tiles),
        seed=3,
    )


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth test image (gradients + a few discs), so seams would stand out against it."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([xx, yy, 0.5 + 0.5 * np.sin(6 * xx + 3 * yy)], axis=-1)
    for _ in range(4):
        cy, cx, r = rng.uniform(0, 1, 3) * [h / max(h, w), w / max(h, w), 0.2]
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r**2] = rng.uniform(0, 1, 3)
    return (img * 255).round().astype(np.uint8)


# ------------------------------------------------------------------------------------------- official parity


def test_untiled_upscale_reproduces_official_one_step(small_unet, small_vq, parity_cases):
    """``upscale`` of the fixture LR with the same noise reproduces onestep.sr_u8 (rare ±1 rounding flips)."""
    up = Upscaler(small_unet, small_vq, InferenceSpec(family="sinsr"), tiles=TileSettings(tile=0))
    lr = parity_cases["onestep.lr_u8"][0].permute(1, 2, 0).numpy()
    result = up.upscale_array(lr, noise={"prior": parity_cases["onestep.eps"][0]})
    expected = parity_cases["onestep.sr_u8"][0].permute(1, 2, 0).numpy()
    diff = np.abs(result.image.astype(int) - expected.astype(int))
    assert result.image.shape == (256, 256, 3) and result.image.dtype == np.uint8
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


def test_tiled_with_one_tile_equals_untiled(small_unet, small_vq, parity_cases):
    """A tile as large as the image is the untiled path (same noise, same output)."""
    lr = parity_cases["onestep.lr_u8"][0].permute(1, 2, 0).numpy()
    noise = {"prior": parity_cases["onestep.eps"][0]}
    whole = Upscaler(small_unet, small_vq, InferenceSpec(), tiles=TileSettings(tile=0)).upscale_array(
        lr, noise=noise
    )
    tiled = Upscaler(small_unet, small_vq, InferenceSpec(), tiles=TileSettings(tile=64, overlap=16))
    assert np.array_equal(tiled.upscale_array(lr, noise=noise).image, whole.image)


# ------------------------------------------------------------------------------------------- tiling


def test_tile_starts_official_rule():
    assert tile_starts(1000, 512, 448) == [0, 448, 488]
    assert tile_starts(512, 512, 448) == [0]
    assert tile_starts(300, 512, 448) == [0]
    assert tile_starts(101, 32, 24, align=2) == [0, 24, 48, 70]  # 69 rounded up to the 2-px grid


def test_plan_tiles_static_shape_and_coverage():
    grid = plan_tiles(70, 90, tile=32, overlap=8, multiple=16)
    assert (grid.padded_h, grid.padded_w) == (32, 32)
    covered = np.zeros((70, 90), bool)
    for t in grid.tiles:
        covered[t.y : t.y + t.h, t.x : t.x + t.w] = True
    assert covered.all()
    small = plan_tiles(8, 8, tile=256, overlap=32, multiple=64)
    assert len(small.tiles) == 1 and (small.padded_h, small.padded_w) == (64, 64)
    with pytest.raises(ValueError, match="overlap"):
        plan_tiles(100, 100, tile=32, overlap=32, multiple=16)


def test_reflect_index_handles_pads_larger_than_the_image():
    assert reflect_index(0, 7, 3).tolist() == [0, 1, 2, 1, 0, 1, 2]
    assert reflect_index(0, 4, 1).tolist() == [0, 0, 0, 0]
    assert reflect_index(-2, 4, 5).tolist() == [2, 1, 0, 1]


def test_blend_window_ramps_only_towards_neighbours():
    grid = plan_tiles(64, 64, tile=32, overlap=16, multiple=16)
    first = grid.tiles[0]  # top-left: neighbours right and below
    w = blend_window(first, 1, 16, margin=4)
    assert w[0, 0] == 1 and w[-1, -1] < 1e-5 and w[0, -1] < 1e-5  # margins at the sides with neighbours
    assert w[0, 31 - 3] < 1e-5 and 0 < w[0, 31 - 6] < 1 and w[0, 31 - 12] == 1
    assert torch.all(blend_window(first, 1, 16, kind="uniform") == 1)
    with pytest.raises(ValueError, match="margin"):
        blend_window(first, 1, 16, margin=8)


def test_block_noise_is_position_keyed():
    noise = BlockNoise(seed=7, block=8)
    big = noise.region("prior", 3, -5, 3, 30, 20)
    part = noise.region("prior", 3, 4, 10, 9, 6)
    assert torch.equal(big[:, 9:18, 7:13], part)
    assert not torch.equal(noise.region("student", 3, 4, 10, 9, 6), part)
    assert not torch.equal(BlockNoise(seed=8, block=8).region("prior", 3, 4, 10, 9, 6), part)


# ------------------------------------------------------------------------------------------- seams


def test_tiled_equals_untiled_for_a_model_whose_receptive_field_fits_the_margin():
    """Shared noise + margin-aware cosine blend: tiles reproduce the untiled run (no seams at all)."""
    img = _image(56, 120)

    def run(**tiles):
        up = Upscaler(
            LocalUNet(), LocalVQ(), InferenceSpec(family="rsd"), tiles=TileSettings(**tiles), seed=4
        )
        return up.upscale_array(img, out_dtype=np.float32).image

    whole = run(tile=0)
    tiled = run(tile=32, overlap=16, margin=6, tile_batch=3)
    assert np.abs(tiled - whole).max() < 1e-4
    # the check is sensitive: the official scheme (independent noise per tile, box average) differs visibly
    official = run(tile=32, overlap=16, blend="uniform", noise="per-tile")
    assert np.abs(official - whole).max() > 0.05


# ------------------------------------------------------------------------------------------- behaviour


def test_seed_determinism_and_tile_batch_invariance():
    img = _image(40, 56)
    a = _rsd_upscaler(tile=32, overlap=8).upscale_array(img, seed=5).image
    b = _rsd_upscaler(tile=32, overlap=8).upscale_array(img, seed=5).image
    c = _rsd_upscaler(tile=32, overlap=8).upscale_array(img, seed=6).image
    batched = _rsd_upscaler(tile=32, overlap=8, tile_batch=4).upscale_array(img, seed=5).image
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.abs(a.astype(int) - batched.astype(int)).max() <= 1  # batched convs may round differently


@pytest.mark.parametrize("shape", [(8, 8), (1, 5), (17, 33), (64, 16)])
def test_tiny_and_odd_images(shape):
    img = _image(*shape)
    out = _rsd_upscaler(tile=32, overlap=8).upscale_array(img).image
    assert out.shape == (shape[0] * 4, shape[1] * 4, 3)


def test_sixteen_bit_and_float_outputs():
    img16 = _image(16, 16).astype(np.uint16) * 257
    up = _rsd_upscaler(tile=0)
    out16 = up.upscale_array(img16, out_dtype=np.uint16, seed=1).image
    out8 = up.upscale_array(img16, out_dtype=np.uint8, seed=1).image
    outf = up.upscale_array(img16, out_dtype=np.float32, seed=1).image
    assert out16.dtype == np.uint16 and out8.dtype == np.uint8 and outf.dtype == np.float32
    assert np.abs(out16 / 65535.0 - outf).max() < 1e-4
    assert np.abs(out8 / 255.0 - outf).max() <= 0.5 / 255 + 1e-6


def test_teacher_multi_step_sampling_uses_all_steps(small_unet, small_vq, parity_cases):
    calls = []
    original = small_unet.forward

    def counting(x, t, lq=None, noise=None):
        calls.append(int(t[0]))
        return original(x, t, lq, noise)

    spec = InferenceSpec(
        family="resshift",
        steps=4,
        schedule={"steps": 4, "min_noise_level": 0.2, "kappa": 2.0, "etas_end": 0.99, "power": 0.3},
    )
    up = Upscaler(small_unet, small_vq, spec, tiles=TileSettings(tile=0))
    up.unet.forward = counting
    try:
        up.upscale_array(parity_cases["onestep.lr_u8"][0].permute(1, 2, 0).numpy(), seed=0)
    finally:
        del up.unet.forward
    assert calls == [3, 2, 1, 0]


def test_out_of_memory_halves_the_tile_and_retries(monkeypatch):
    up = _rsd_upscaler(tile=64, overlap=8)
    original = up._forward_tiles
    seen = []
    warnings = []
    up.warn = warnings.append

    def flaky(lr_tiles, tiles, noise):
        seen.append(lr_tiles.shape[-1])
        if lr_tiles.shape[-1] > 32:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(lr_tiles, tiles, noise)

    monkeypatch.setattr(up, "_forward_tiles", flaky)
    result = up.upscale_array(_image(70, 70), seed=1)
    assert result.tile == 32 and seen[0] == 64 and set(seen[1:]) == {32}
    assert any("retrying with tile 32" in w for w in warnings)


def test_scale_mismatch_is_an_error():
    with pytest.raises(ConfigError, match="×4 model"):
        Upscaler(tiny_unet(), tiny_vq(), InferenceSpec(scale=4), scale=2)


def test_pil_call_keeps_mode_and_alpha():
    from PIL import Image

    up = _rsd_upscaler(tile=0)
    rgba = Image.fromarray(np.dstack([_image(12, 10), np.full((12, 10), 128, np.uint8)]), "RGBA")
    out = up(rgba, seed=1)
    assert out.mode == "RGBA" and out.size == (40, 48)
    assert np.asarray(out)[..., 3].min() == 128 == np.asarray(out)[..., 3].max()
    gray = Image.fromarray(_image(12, 10)[..., 0], "L")
    assert up(gray, seed=1).mode == "L"
