"""Checkpoint reading, detection, strict loading, export and their error messages."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny import tiny_unet, tiny_vq

from sr1step.checkpoints import (
    InferenceSpec,
    convert_checkpoint,
    detect,
    export_safetensors,
    load_model,
    read_checkpoint,
)
from sr1step.errors import CheckpointError
from sr1step.models import ResShiftUNet, VQAutoencoder

# --------------------------------------------------------------------------- real-size layouts vs manifests


def _manifest(resshift_fixtures: Path, name: str) -> dict:
    return json.loads((resshift_fixtures / name).read_text())


def _entries(module: torch.nn.Module) -> list[tuple[str, tuple[int, ...], str]]:
    return [(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in module.state_dict().items()]


def _manifest_entries(manifest: dict) -> list[tuple[str, tuple[int, ...], str]]:
    return [(e["key"], tuple(e["shape"]), e["dtype"]) for e in manifest["entries"]]


@pytest.mark.parametrize("name", ["manifest_unet_x4.json", "manifest_unet_x2cfg.json"])
def test_real_size_unet_matches_manifest(resshift_fixtures, name):
    manifest = _manifest(resshift_fixtures, name)
    with torch.device("meta"):
        unet = ResShiftUNet(**manifest["config"])
    ours, theirs = _entries(unet), _manifest_entries(manifest)
    assert len(ours) == len(theirs)
    for mine, official in zip(ours, theirs, strict=True):  # same order, key, shape and dtype
        assert mine == official
    params = sum(p.numel() for p in unet.parameters())
    assert params == manifest["params"]


def test_real_size_vq_matches_manifest(resshift_fixtures):
    manifest = _manifest(resshift_fixtures, "manifest_vq_f4.json")
    with torch.device("meta"):
        vq = VQAutoencoder(**manifest["config"])
    assert _entries(vq) == _manifest_entries(manifest)
    assert sum(p.numel() for p in vq.parameters()) == manifest["params"] == 55_322_782


@pytest.mark.parametrize(
    ("name", "arch", "family"),
    [
        ("manifest_unet_x4.json", "resshift-unet", "sinsr"),
        ("manifest_unet_x2cfg.json", "resshift-unet", "resshift-x2cfg"),
        ("manifest_vq_f4.json", "vq-autoencoder", None),
    ],
)
def test_detect_real_layouts_from_shapes(resshift_fixtures, name, arch, family):
    manifest = _manifest(resshift_fixtures, name)
    state = {
        e["key"]: torch.empty(e["shape"], dtype=getattr(torch, e["dtype"]), device="meta")
        for e in manifest["entries"]
    }
    descriptor = detect(state, {}, name)
    assert descriptor.arch == arch
    expected = dict(manifest["config"])
    if arch == "resshift-unet":
        expected.update(noise_channels=0, noise_mode="concat")
        assert descriptor.inference.family == family
    got = dict(descriptor.config)
    for key, value in expected.items():
        if key == "ddconfig":
            assert {k: got[key][k] for k in value if k != "resolution"} == {
                k: v for k, v in value.items() if k != "resolution"
            }
        else:
            assert got[key] == value, key


def test_detect_rsd_student_layout(resshift_fixtures):
    """RSD students differ only in the 7-plane first conv."""
    manifest = _manifest(resshift_fixtures, "manifest_unet_x4.json")
    state = {e["key"]: torch.empty(e["shape"], device="meta") for e in manifest["entries"]}
    state["input_blocks.0.0.weight"] = torch.empty(160, 7, 3, 3, device="meta")
    descriptor = detect(state, {}, "ema_model_2800.pth")
    assert descriptor.config["noise_channels"] == 1 and descriptor.config["noise_mode"] == "concat"
    assert descriptor.inference.family == "rsd"
    assert descriptor.inference.decode_quantize and descriptor.inference.prior_noise_scale == "kappa_sqrt_eta"


# --------------------------------------------------------------------------- variants, round trips


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _same_output(a: torch.nn.Module, b: torch.nn.Module, noise_channels: int = 0) -> None:
    torch.manual_seed(1)
    x, lq = torch.randn(1, 3, 16, 32), torch.randn(1, 3, 16, 32)
    noise = torch.randn(1, noise_channels, 16, 32) if noise_channels else None
    t = torch.tensor([14])
    with torch.no_grad():
        assert torch.equal(a(x, t, lq, noise), b(x, t, lq, noise))


@pytest.mark.parametrize(
    "wrap",
    [
        lambda s: s,
        lambda s: {"state_dict": s},
        lambda s: {f"module.{k}": v for k, v in s.items()},
        lambda s: {f"_orig_mod.{k}": v for k, v in s.items()},
        lambda s: {"state_dict": {f"module._orig_mod.{k}": v for k, v in s.items()}},
    ],
    ids=["flat", "state_dict", "module", "orig_mod", "nested"],
)
def test_official_pth_variants(tmp_path, wrap):
    unet = tiny_unet()
    path = tmp_path / "resshift.pth"
    torch.save(wrap(_state(unet)), path)
    loaded = load_model(path)
    assert loaded.descriptor.arch == "resshift-unet"
    assert loaded.descriptor.inference.family == "sinsr"
    _same_output(unet, loaded.module)


def test_rsd_ema_pth(tmp_path):
    unet = tiny_unet(noise_channels=1)
    path = tmp_path / "ema_model_2800.pth"
    torch.save({f"module.{k}": v for k, v in _state(unet).items()}, path)
    loaded = load_model(path)
    assert loaded.module.config.noise_channels == 1
    assert loaded.descriptor.inference.family == "rsd"
    _same_output(unet, loaded.module, noise_channels=1)


def test_buffers_optional(tmp_path, small_unet, parity_cases):
    """Files with or without the Swin buffers load; the stored mask values are never used.

    (Without ``attn_mask`` buffers the construction size cannot be read from the file; the released value 64 is
    assumed, which is what the fixture model uses.)
    """
    state = _state(small_unet)
    without = {k: v for k, v in state.items() if not k.endswith(("relative_position_index", "attn_mask"))}
    assert len(without) < len(state)
    garbage = {k: (torch.full_like(v, 7.0) if k.endswith("attn_mask") else v) for k, v in state.items()}
    torch.save(without, tmp_path / "a.pth")
    torch.save(garbage, tmp_path / "b.pth")
    x, t, lq = parity_cases["unet_sq.x"], parity_cases["unet_sq.t"], parity_cases["unet_sq.lq"]
    with torch.no_grad():
        for name in ("a.pth", "b.pth"):
            out = load_model(tmp_path / name).module(x, t, lq)
            assert (out - parity_cases["unet_sq.out"]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("cond_lq", ["pixel", "latent", None])
def test_sorryhyun_concat_safetensors(tmp_path, cond_lq):
    unet = tiny_unet(noise_channels=1)
    metadata = {
        "noise_mode": "concat",
        "noise_channels": "1",
        "step": "18000",
        "branch": "ema",
        "arch": "resshift_swinunet_stochastic",
        "format": "pt",
    }
    if cond_lq:
        metadata["cond_lq"] = cond_lq
    path = tmp_path / "rsd_student_final.safetensors"
    save_file(_state(unet), str(path), metadata=metadata)
    loaded = load_model(path)
    spec = loaded.descriptor.inference
    assert spec.family == "sorryhyun"
    assert spec.lq_mode == (cond_lq or "latent")
    assert spec.prior_noise_scale == "kappa" and not spec.decode_quantize and spec.scale is None
    if cond_lq is None:
        assert any("cond_lq" in note for note in loaded.descriptor.notes)
    _same_output(unet, loaded.module, noise_channels=1)


def test_sorryhyun_add_mode_and_pth_form(tmp_path):
    unet = tiny_unet(noise_channels=3, noise_mode="add")
    assert "noise_proj.weight" in unet.state_dict()
    save_file(
        _state(unet), str(tmp_path / "add.safetensors"), metadata={"noise_mode": "add", "noise_channels": "3"}
    )
    loaded = load_model(tmp_path / "add.safetensors")
    assert loaded.module.config.noise_mode == "add" and loaded.module.config.noise_channels == 3
    _same_output(unet, loaded.module, noise_channels=3)
    # the node's .pth form: {"ema": ..., "student": ..., settings}
    torch.save(
        {
            "ema": _state(unet),
            "student": _state(unet),
            "noise_mode": "add",
            "noise_channels": 3,
            "cond_lq": "pixel",
        },
        tmp_path / "train.pth",
    )
    loaded = load_model(tmp_path / "train.pth")
    assert loaded.descriptor.inference.lq_mode == "pixel"
    _same_output(unet, loaded.module, noise_channels=3)


def test_x2_config_layout_roundtrip(tmp_path):
    unet = tiny_unet(lq_size=32)  # LR at twice the latent size → feature_extractor, 35-plane first conv
    assert "feature_extractor.2.op.weight" in unet.state_dict()
    torch.save(_state(unet), tmp_path / "x2.pth")
    loaded = load_model(tmp_path / "x2.pth")
    assert loaded.module.config.lq_size == 32
    assert loaded.descriptor.inference.scale == 2
    x, lq, t = torch.randn(1, 3, 16, 16), torch.randn(1, 3, 32, 32), torch.tensor([3])
    with torch.no_grad():
        assert torch.equal(unet(x, t, lq), loaded.module(x, t, lq))


def test_official_pth_to_safetensors_roundtrip(tmp_path):
    """official-layout .pth → load → export self-describing safetensors → load alone, same outputs."""
    unet = tiny_unet(noise_channels=1)
    src = tmp_path / "ema_model_100.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in _state(unet).items()}}, src)
    spec = InferenceSpec(family="rsd", steps=1, scale=4)
    dst = convert_checkpoint(
        src, tmp_path / "out" / "student.safetensors", metadata={"note": "x"}, inference=spec
    )
    reloaded = load_model(dst)
    assert reloaded.descriptor.inference == spec
    assert reloaded.descriptor.metadata["note"] == "x"
    assert reloaded.descriptor.metadata["source_file"] == "ema_model_100.pth"
    assert reloaded.module.config == unet.config
    _same_output(unet, reloaded.module, noise_channels=1)
    # the .pth and the export hold identical tensors
    original, _ = read_checkpoint(src)
    exported, _ = read_checkpoint(dst)
    assert original.keys() == exported.keys()
    assert all(torch.equal(original[k], exported[k]) for k in original)


def test_vq_roundtrip(tmp_path):
    vq = tiny_vq()
    torch.save(_state(vq), tmp_path / "autoencoder_vq_f4.pth")
    loaded = load_model(tmp_path / "autoencoder_vq_f4.pth", expect="vq-autoencoder")
    out = export_safetensors(loaded.module, tmp_path / "vq.safetensors")
    again = load_model(out, expect="vq-autoencoder")
    img = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(vq(img), again.module(img))


def test_fixture_files_load_strict(resshift_fixtures):
    unet = load_model(resshift_fixtures / "unet_small.safetensors")
    vq = load_model(resshift_fixtures / "vq_small.safetensors")
    assert unet.descriptor.arch == "resshift-unet" and vq.descriptor.arch == "vq-autoencoder"
    assert unet.module.config.swin_embed_dim == 64 and vq.module.config.n_embed == 64


# --------------------------------------------------------------------------- errors


def _err(path: Path, **kwargs) -> str:
    with pytest.raises(CheckpointError) as info:
        load_model(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_error_missing_and_empty(tmp_path):
    assert "no such file" in _err(tmp_path / "nope.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    assert "empty" in _err(tmp_path / "empty.pth")


def test_error_not_a_checkpoint(tmp_path):
    (tmp_path / "photo.pth").write_bytes(b"\xff\xd8\xff\xe0 not a checkpoint at all")
    assert "not a checkpoint" in _err(tmp_path / "photo.pth")


def test_error_truncated_files(tmp_path):
    torch.save(_state(tiny_unet()), tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    assert "corrupt" in _err(tmp_path / "cut.pth") or "cannot read" in _err(tmp_path / "cut.pth")
    save_file(_state(tiny_vq()), str(tmp_path / "full.safetensors"))
    data = (tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    assert "safetensors" in _err(tmp_path / "cut.safetensors")


class _Payload:
    def __reduce__(self):
        return (print, ("pickled code ran",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_refuses_pickled_code(tmp_path, capsys):
    with open(tmp_path / "evil.pth", "wb") as handle:
        pickle.dump({"weight": _Payload()}, handle)
    assert "refusing" in _err(tmp_path / "evil.pth")
    assert "pickled code ran" not in capsys.readouterr().out


def test_error_no_state_dict(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pth")
    assert "state dict" in _err(tmp_path / "list.pth")


def test_error_missing_key(tmp_path):
    state = _state(tiny_unet())
    del state["output_blocks.1.0.in_layers.2.weight"]
    torch.save(state, tmp_path / "m.pth")
    assert "missing key 'output_blocks.1.0.in_layers.2.weight'" in _err(tmp_path / "m.pth")


def test_error_unexpected_key(tmp_path):
    state = _state(tiny_unet())
    state["output_blocks.1.0.extra.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "u.pth")
    assert "unexpected key 'output_blocks.1.0.extra.weight'" in _err(tmp_path / "u.pth")


def test_error_shape_mismatch(tmp_path):
    state = _state(tiny_unet())
    state["out.2.bias"] = torch.zeros(3)
    state["middle_block.0.in_layers.2.bias"] = torch.zeros(7)
    torch.save(state, tmp_path / "s.pth")
    message = _err(tmp_path / "s.pth")
    assert "'middle_block.0.in_layers.2.bias' has shape (7,)" in message and "expected (64,)" in message


def test_error_wrong_kind_and_unknown_arch(tmp_path):
    torch.save(_state(tiny_vq()), tmp_path / "vq.pth")
    assert "expected a resshift-unet" in _err(tmp_path / "vq.pth", expect="resshift-unet")
    torch.save({"conv.weight": torch.zeros(3, 3)}, tmp_path / "other.pth")
    assert "unsupported checkpoint" in _err(tmp_path / "other.pth")


def test_error_metadata_contradicts_weights(tmp_path):
    save_file(
        _state(tiny_unet(noise_channels=1)),
        str(tmp_path / "bad.safetensors"),
        metadata={"noise_mode": "concat", "noise_channels": "3"},
    )
    assert "noise_channels=3" in _err(tmp_path / "bad.safetensors")
