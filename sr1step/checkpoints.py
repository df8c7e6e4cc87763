"""Reading, detecting, loading and exporting checkpoints (spandrel-style: the file says what it is).

Accepted inputs:

* official ResShift / SinSR ``.pth`` (flat dict, ``state_dict`` wrapper, ``module.`` / ``_orig_mod.`` prefixes),
  RSD ``ema_model_*.pth`` (7-channel first conv), the VQ-f4 ``autoencoder_vq_f4.pth``;
* sorryhyun-style ``.safetensors`` (metadata ``noise_mode``, ``noise_channels``, ``cond_lq``, ...) and their
  ``.pth`` form (an ``ema`` key plus optional top-level settings);
* sr1step's own self-describing ``.safetensors`` (metadata ``format = sr1step``: config + inference settings).

``.pth`` files are read with ``torch.load(weights_only=True)``: pickled code is never executed. The architecture
and every hyper-parameter are inferred from key names and shapes (and metadata where present); a file that does
not fit gets an error naming the file and the first missing/unexpected key or shape mismatch.
"""

from __future__ import annotations

import importlib
import json
import math
import re
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from sr1step import __version__
from sr1step.errors import CheckpointError, ConfigError
from sr1step.fsio import atomic_path
from sr1step.models.resshift_unet import ResShiftUNet, ResShiftUNetConfig, lq_channels
from sr1step.models.vq_autoencoder import VQAutoencoder, VQAutoencoderConfig

FORMAT_NAME = "sr1step"
FORMAT_VERSION = "1"
# Buffers the official Swin layers carry in their checkpoints: regenerated if absent, values never used.
_REGENERABLE_BUFFERS = ("relative_position_index", "attn_mask")
_WRAPPER_KEYS = ("state_dict", "ema", "model", "params_ema", "net", "module")


# --------------------------------------------------------------------------------------------- descriptors


@dataclass(frozen=True)
class InferenceSpec:
    """How a ResShift-family denoiser is called at inference time.

    family:            ``rsd`` | ``sinsr`` | ``resshift`` | ``tad-sr`` | ``sorryhyun`` | ``resshift-x2cfg`` | ...
    steps:             network evaluations (1 for one-step students, T for a ResShift teacher)
    schedule:          ResShift schedule parameters (``ResShiftSchedule`` kwargs)
    scale:             SR factor, or None when the file does not say (sorryhyun files)
    prior_noise_scale: ``kappa_sqrt_eta`` (official z_T = z_y + κ·sqrt(η_T)·ε) or ``kappa`` (sorryhyun: κ·ε)
    lq_mode:           what the ``lq`` input is: ``lr`` (the padded LR tile, official), ``pixel`` (the bicubic HR
                       tile resized to latent size; sorryhyun), ``latent`` (z_y itself; sorryhyun legacy)
    decode_quantize:   snap the predicted latent to the codebook before decoding (official) or not (sorryhyun)
    vae:               registry name or path of the autoencoder the model needs
    """

    family: str = "sinsr"
    steps: int = 1
    schedule: dict = field(
        default_factory=lambda: {
            "steps": 15,
            "min_noise_level": 0.04,
            "kappa": 2.0,
            "etas_end": 0.99,
            "power": 0.3,
        }
    )
    scale: int | None = 4
    prior_noise_scale: str = "kappa_sqrt_eta"
    lq_mode: str = "lr"
    decode_quantize: bool = True
    vae: str = "vq-f4"

    def __post_init__(self) -> None:
        if self.prior_noise_scale not in ("kappa_sqrt_eta", "kappa"):
            raise ConfigError(
                f"prior_noise_scale must be 'kappa_sqrt_eta' or 'kappa', got {self.prior_noise_scale!r}"
            )
        if self.lq_mode not in ("lr", "pixel", "latent"):
            raise ConfigError(f"lq_mode must be 'lr', 'pixel' or 'latent', got {self.lq_mode!r}")
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")
        if self.scale is not None and self.scale not in (1, 2, 4, 8):
            raise ConfigError(f"scale must be 1, 2, 4 or 8, got {self.scale}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> InferenceSpec:
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown inference settings: {', '.join(unknown)}")
        return cls(**values)


@dataclass
class ModelDescriptor:
    """What a checkpoint is: its architecture, the constructor config, and how to run it."""

    arch: str  # "resshift-unet" | "vq-autoencoder" | other registered architectures
    config: dict
    source: str
    inference: InferenceSpec | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # True when the inference settings were read from the file's own metadata (sr1step or sorryhyun format),
    # False when they were guessed from the weights' layout alone.
    inference_from_metadata: bool = False

    def summary(self) -> str:
        if self.arch == "resshift-unet":
            cfg = self.config
            noise = (
                f", noise {cfg['noise_channels']}ch {cfg['noise_mode']}" if cfg.get("noise_channels") else ""
            )
            fam = self.inference.family if self.inference else "?"
            return f"ResShift Swin-UNet ({fam}, {cfg['model_channels']} ch{noise})"
        if self.arch == "vq-autoencoder":
            return f"VQ autoencoder (f{2 ** (len(self.config['ddconfig']['ch_mult']) - 1)}, {self.config['n_embed']} codes)"
        return self.arch


@dataclass
class LoadedModel:
    module: nn.Module
    descriptor: ModelDescriptor


# --------------------------------------------------------------------------------------------- reading


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - not a dict
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(exc)})") from None
    return tensors, metadata


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _sniff(path: Path) -> str:
    with open(path, "rb") as handle:
        head = handle.read(16)
    if not head:
        raise CheckpointError(f"{path}: file is empty")
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return "torch"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    return "unknown"


def read_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read a checkpoint file → (canonical state dict, metadata strings). No code is executed."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    kind = _sniff(path)
    if kind == "safetensors" or (kind == "unknown" and path.suffix == ".safetensors"):
        tensors, metadata = _read_safetensors(path)
        return canonicalize(tensors, path), metadata
    if kind == "unknown":
        raise CheckpointError(f"{path}: not a checkpoint (neither a PyTorch .pth nor a safetensors file)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for bad files; all mean "unreadable"
        message = _first_line(exc)
        if "Weights only load failed" in message or "Unsupported global" in str(exc):
            raise CheckpointError(
                f"{path}: refusing to load: the file contains pickled Python objects other than tensors "
                "(only weights are loaded, code is never executed)"
            ) from None
        if isinstance(exc, zipfile.BadZipFile) or "zip" in message.lower() or "EOF" in message:
            raise CheckpointError(f"{path}: truncated or corrupt PyTorch file ({message})") from None
        raise CheckpointError(f"{path}: cannot read PyTorch file ({message})") from None
    metadata = _pth_metadata(obj)
    return canonicalize(obj, path), metadata


def _pth_metadata(obj: Any) -> dict[str, str]:
    """Top-level scalar settings some exporters put beside the weights (sorryhyun: noise_mode, cond_lq, ...)."""
    if not isinstance(obj, dict):
        return {}
    return {
        k: str(v) for k, v in obj.items() if isinstance(k, str) and isinstance(v, (str, int, float, bool))
    }


def canonicalize(obj: Any, path: str | Path = "<state dict>") -> dict[str, Tensor]:
    """Unwrap ``state_dict`` / ``ema`` / ``model`` containers and strip ``module.`` / ``_orig_mod.`` prefixes."""
    seen = 0
    while isinstance(obj, dict) and seen < 4:
        tensors = [v for v in obj.values() if isinstance(v, Tensor)]
        if tensors and len(tensors) >= len(obj) // 2:
            break
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj, seen = inner, seen + 1
    if not isinstance(obj, dict) or not any(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: does not contain a state dict of tensors")
    state = {}
    for key, value in obj.items():
        if not isinstance(value, Tensor):
            continue
        name = str(key)
        changed = True
        while changed:
            changed = False
            for prefix in ("module.", "_orig_mod."):
                if name.startswith(prefix):
                    name, changed = name[len(prefix) :], True
        if name in state:
            raise CheckpointError(f"{path}: key {name!r} appears twice once prefixes are stripped")
        state[name] = value
    return state


# --------------------------------------------------------------------------------------------- detection

Detector = Callable[[dict[str, Tensor], dict[str, str], str], "ModelDescriptor | None"]
_DETECTORS: list[tuple[str, Detector]] = []


def register_detector(name: str, detector: Detector, before: str | None = None) -> None:
    """Add an architecture detector; the first one that returns a descriptor wins (specific ones first)."""
    if any(existing == name for existing, _ in _DETECTORS):
        raise ValueError(f"detector {name!r} is already registered")
    index = len(_DETECTORS)
    if before is not None:
        index = next(i for i, (existing, _) in enumerate(_DETECTORS) if existing == before)
    _DETECTORS.insert(index, (name, detector))


# Architectures whose detector registers when its module is imported: imported on demand by their metadata arch.
_DETECTOR_MODULES = {"yonos-sd": "sr1step.models.yonos"}


def detect(state: dict[str, Tensor], metadata: dict[str, str], source: str) -> ModelDescriptor:
    module = _DETECTOR_MODULES.get(metadata.get("arch", ""))
    if module is not None:
        importlib.import_module(module)
    for _, detector in _DETECTORS:
        descriptor = detector(state, metadata, source)
        if descriptor is not None:
            return descriptor
    sample = ", ".join(sorted(state)[:3])
    raise CheckpointError(
        f"{source}: unsupported checkpoint: no known architecture has these keys (first keys: {sample}); "
        "sr1step loads ResShift-family UNets (ResShift, SinSR, RSD, TAD-SR, sorryhyun students) and VQ autoencoders"
    )


def _shape(state: dict[str, Tensor], key: str, source: str) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"{source}: missing key {key!r}")
    return tuple(state[key].shape)


def _infer_unet_config(state: dict[str, Tensor], metadata: dict[str, str], source: str) -> ResShiftUNetConfig:
    mc, first_in = _shape(state, "input_blocks.0.0.weight", source)[:2]
    out_channels = _shape(state, "out.2.weight", source)[0]
    in_channels = out_channels  # the latent goes in and comes out: same channel count in every ResShift model

    stages = sum(1 for k in state if re.fullmatch(r"feature_extractor\.\d+\.op\.weight", k))

    # Walk the encoder: ResBlocks grouped into levels separated by Downsample blocks.
    levels: list[list[int]] = [[]]
    swin_levels: set[int] = set()
    index = 1
    while (
        f"input_blocks.{index}.0.in_layers.0.weight" in state or f"input_blocks.{index}.0.op.weight" in state
    ):
        prefix = f"input_blocks.{index}.0"
        if f"{prefix}.op.weight" in state:
            levels.append([])
        else:
            levels[-1].append(_shape(state, f"{prefix}.out_layers.3.weight", source)[0])
            if f"input_blocks.{index}.1.patch_embed.proj.weight" in state:
                swin_levels.add(len(levels) - 1)
        index += 1
    if not levels[-1]:
        raise CheckpointError(f"{source}: cannot read the UNet level structure from input_blocks")
    channel_mult = [lvl[0] // mc for lvl in levels]
    num_res_blocks = [len(lvl) for lvl in levels]

    swin_prefix = next(
        (
            k[: -len("patch_embed.proj.weight")]
            for k in sorted(state)
            if k.endswith("patch_embed.proj.weight")
        ),
        None,
    )
    if swin_prefix is None:
        raise CheckpointError(f"{source}: no Swin layers found (expected '*.patch_embed.proj.weight')")
    embed = _shape(state, swin_prefix + "patch_embed.proj.weight", source)[0]
    table_rows, heads = _shape(state, swin_prefix + "blocks.0.attn.relative_position_bias_table", source)
    window = (round(math.sqrt(table_rows)) + 1) // 2
    depth = sum(1 for k in state if k.startswith(swin_prefix + "blocks.") and k.endswith(".norm1.weight"))
    hidden = _shape(state, swin_prefix + "blocks.0.mlp.fc1.weight", source)[0]
    emb_out = _shape(state, "input_blocks.1.0.emb_layers.1.weight", source)[0]

    # The construction size only shows in the stored shift masks; released models use 64.
    image_size = 64
    mask_key = next(
        (k for k in sorted(state) if k.startswith("input_blocks.") and k.endswith("attn_mask")), None
    )
    if mask_key is not None:
        block = int(mask_key.split(".")[1])
        level = sum(1 for i in range(1, block) if f"input_blocks.{i}.0.op.weight" in state)
        image_size = window * round(math.sqrt(state[mask_key].shape[0])) * 2**level
    attention_resolutions = sorted((image_size // 2**lvl for lvl in swin_levels), reverse=True)

    base = ResShiftUNetConfig(
        image_size=image_size,
        in_channels=in_channels,
        model_channels=mc,
        out_channels=out_channels,
        attention_resolutions=attention_resolutions,
        channel_mult=channel_mult,
        num_res_blocks=num_res_blocks,
        conv_resample=True,
        num_head_channels=embed // heads,
        use_scale_shift_norm=emb_out == 2 * channel_mult[0] * mc,
        swin_depth=depth,
        swin_embed_dim=embed,
        window_size=window,
        mlp_ratio=hidden / embed,
        cond_lq=True,
        lq_size=image_size * 2**stages,
    )
    if "noise_proj.weight" in state:
        noise_channels, noise_mode = _shape(state, "noise_proj.weight", source)[1], "add"
        extra_in = first_in - in_channels - lq_channels(base)
    else:
        noise_mode = "concat"
        extra_in = first_in - in_channels - lq_channels(base)
        noise_channels = extra_in
        extra_in = 0
    if extra_in != 0 or noise_channels < 0:
        raise CheckpointError(
            f"{source}: first conv takes {first_in} input planes, which does not fit a ResShift UNet with "
            f"{in_channels} latent + {lq_channels(base)} LR planes"
        )
    declared = metadata.get("noise_channels")
    if declared is not None and int(declared) != noise_channels:
        raise CheckpointError(
            f"{source}: metadata says noise_channels={declared} but the weights have {noise_channels}"
        )
    if metadata.get("noise_mode") and metadata["noise_mode"] != noise_mode:
        raise CheckpointError(
            f"{source}: metadata says noise_mode={metadata['noise_mode']} but the weights are {noise_mode}"
        )
    return replace(base, noise_channels=noise_channels, noise_mode=noise_mode)


def _infer_unet_inference(
    cfg: ResShiftUNetConfig, metadata: dict[str, str]
) -> tuple[InferenceSpec, list[str]]:
    notes: list[str] = []
    if "noise_mode" in metadata or metadata.get("arch") == "resshift_swinunet_stochastic":
        # sorryhyun / ComfyUI-Distilled-ResShift students: κ·ε prior, no codebook snap, scale not recorded.
        lq_mode = metadata.get("cond_lq", "latent")
        if "cond_lq" not in metadata:
            notes.append("no 'cond_lq' in the metadata: assuming 'latent' (files before 2026-07-11)")
        spec = InferenceSpec(
            family="sorryhyun",
            steps=1,
            scale=None,
            prior_noise_scale="kappa",
            lq_mode=lq_mode,
            decode_quantize=False,
        )
        return spec, notes
    if cfg.lq_stages:
        spec = InferenceSpec(
            family="resshift-x2cfg", steps=4, schedule=_preset("s4"), scale=4 // 2**cfg.lq_stages
        )
        notes.append("official x2-config layout: sampled with the 4-step teacher schedule")
        return spec, notes
    if cfg.noise_channels:
        return InferenceSpec(family="rsd", steps=1), notes
    notes.append(
        "6-channel ResShift layout: run as a one-step SinSR-style model unless told it is a ResShift "
        "teacher (registry entry or --steps)"
    )
    return InferenceSpec(family="sinsr", steps=1), notes


def _preset(name: str) -> dict:
    from sr1step.diffusion import SCHEDULE_PRESETS

    return dict(SCHEDULE_PRESETS[name])


def _own_metadata(metadata: dict[str, str], source: str) -> tuple[dict, InferenceSpec | None] | None:
    if metadata.get("format") != FORMAT_NAME:
        return None
    try:
        config = json.loads(metadata["config"])
        inference = json.loads(metadata["inference"]) if metadata.get("inference") else None
    except (KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{source}: sr1step metadata is damaged ({_first_line(exc)})") from None
    return config, InferenceSpec.from_dict(inference) if inference is not None else None


def _detect_resshift_unet(
    state: dict[str, Tensor], metadata: dict[str, str], source: str
) -> ModelDescriptor | None:
    if not {"time_embed.0.weight", "input_blocks.0.0.weight", "out.2.weight"} <= state.keys():
        return None
    if not any(k.endswith("patch_embed.proj.weight") for k in state):
        return None  # a plain (non-Swin) guided-diffusion UNet
    own = _own_metadata(metadata, source)
    notes: list[str] = []
    if own is not None and metadata.get("arch") == "resshift-unet":
        cfg = ResShiftUNetConfig.from_dict(own[0])
        inference = own[1]
    else:
        if "config" in metadata and own is None:
            # Fixture-style files: constructor arguments as JSON. Trust but check against the shapes.
            try:
                cfg = ResShiftUNetConfig.from_dict(json.loads(metadata["config"]))
            except (json.JSONDecodeError, ConfigError) as exc:
                raise CheckpointError(
                    f"{source}: metadata 'config' is not a ResShift UNet config ({exc})"
                ) from None
        else:
            cfg = _infer_unet_config(state, metadata, source)
        inference, notes = _infer_unet_inference(cfg, metadata)
    from_metadata = (own is not None and own[1] is not None) or inference.family == "sorryhyun"
    return ModelDescriptor(
        "resshift-unet", cfg.to_dict(), source, inference, dict(metadata), notes, from_metadata
    )


def _infer_vq_config(state: dict[str, Tensor], source: str) -> VQAutoencoderConfig:
    ch, in_channels = _shape(state, "encoder.conv_in.weight", source)[:2]
    levels = sorted({int(m.group(1)) for k in state if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    ch_mult = [_shape(state, f"encoder.down.{i}.block.0.conv1.weight", source)[0] // ch for i in levels]
    num_res_blocks = len({k.split(".")[4] for k in state if k.startswith("encoder.down.0.block.")})
    z_channels = _shape(state, "decoder.conv_in.weight", source)[1]
    enc_out = _shape(state, "encoder.conv_out.weight", source)[0]
    resolution = 256
    attn = [resolution // 2**i for i in levels if f"encoder.down.{i}.attn.0.q.weight" in state]
    n_embed, embed_dim = _shape(state, "quantize.embedding.weight", source)
    dd = {
        "double_z": enc_out == 2 * z_channels,
        "z_channels": z_channels,
        "resolution": resolution,
        "in_channels": in_channels,
        "out_ch": _shape(state, "decoder.conv_out.weight", source)[0],
        "ch": ch,
        "ch_mult": ch_mult,
        "num_res_blocks": num_res_blocks,
        "attn_resolutions": attn,
        "dropout": 0.0,
    }
    return VQAutoencoderConfig.from_dict({"embed_dim": embed_dim, "n_embed": n_embed, "ddconfig": dd})


def _detect_vq(state: dict[str, Tensor], metadata: dict[str, str], source: str) -> ModelDescriptor | None:
    if not {"encoder.conv_in.weight", "decoder.conv_out.weight", "quantize.embedding.weight"} <= state.keys():
        return None
    own = _own_metadata(metadata, source)
    if own is not None and metadata.get("arch") == "vq-autoencoder":
        cfg = VQAutoencoderConfig.from_dict(own[0])
    elif "config" in metadata and own is None:
        try:
            cfg = VQAutoencoderConfig.from_dict(json.loads(metadata["config"]))
        except (json.JSONDecodeError, ConfigError, TypeError) as exc:
            raise CheckpointError(
                f"{source}: metadata 'config' is not a VQ autoencoder config ({exc})"
            ) from None
    else:
        cfg = _infer_vq_config(state, source)
    return ModelDescriptor("vq-autoencoder", cfg.to_dict(), source, None, dict(metadata))


register_detector("resshift-unet", _detect_resshift_unet)
register_detector("vq-autoencoder", _detect_vq)


# --------------------------------------------------------------------------------------------- building


_BUILDERS: dict[str, Callable[[dict], nn.Module]] = {
    "resshift-unet": ResShiftUNet.from_config,
    "vq-autoencoder": VQAutoencoder.from_config,
}


def register_builder(arch: str, builder: Callable[[dict], nn.Module]) -> None:
    _BUILDERS[arch] = builder


def load_state_strict(module: nn.Module, state: dict[str, Tensor], source: str, what: str) -> None:
    """Strict load with a one-line error naming the first missing/unexpected key or shape mismatch.

    The Swin buffers official files carry (``relative_position_index``, ``attn_mask``) are regenerated by the
    module when a file lacks them, and ignored when the module does not keep them.
    """
    expected = module.state_dict()
    state = dict(state)
    for key in list(state):
        if key not in expected and key.endswith(_REGENERABLE_BUFFERS):
            del state[key]
    for key, value in expected.items():
        if key not in state and key.endswith(_REGENERABLE_BUFFERS):
            state[key] = value
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        raise CheckpointError(
            f"{source}: does not fit {what}: missing key {missing[0]!r} ({len(missing)} missing)"
        )
    if unexpected:
        raise CheckpointError(
            f"{source}: does not fit {what}: unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected)"
        )
    for key, value in expected.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise CheckpointError(
                f"{source}: does not fit {what}: {key!r} has shape {tuple(state[key].shape)}, "
                f"expected {tuple(value.shape)}"
            )
        if key.endswith("attn_mask"):
            state[key] = value  # never read at run time; keep the module's own values
    module.load_state_dict(state, strict=True)


def build(descriptor: ModelDescriptor, state: dict[str, Tensor]) -> nn.Module:
    builder = _BUILDERS.get(descriptor.arch)
    if builder is None:
        raise CheckpointError(f"{descriptor.source}: no builder for architecture {descriptor.arch!r}")
    try:
        module = builder(descriptor.config)
    except (ConfigError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{descriptor.source}: invalid {descriptor.arch} config ({exc})") from None
    load_state_strict(module, state, descriptor.source, descriptor.summary())
    return module.eval()


def load_model(path: str | Path, expect: str | None = None) -> LoadedModel:
    """Read, detect and build a checkpoint. ``expect`` (an arch name) turns a wrong kind of file into an error."""
    state, metadata = read_checkpoint(path)
    descriptor = detect(state, metadata, str(path))
    if expect is not None and descriptor.arch != expect:
        raise CheckpointError(f"{path}: is a {descriptor.summary()}, expected a {expect} checkpoint")
    return LoadedModel(build(descriptor, state), descriptor)


# --------------------------------------------------------------------------------------------- export


def describe_module(module: nn.Module, inference: InferenceSpec | None = None) -> tuple[str, dict]:
    """(arch, config) of a module sr1step knows how to rebuild."""
    if isinstance(module, ResShiftUNet):
        return "resshift-unet", module.config.to_dict()
    if isinstance(module, VQAutoencoder):
        return "vq-autoencoder", module.config.to_dict()
    if hasattr(module, "export_config"):
        return module.export_arch, module.export_config()
    raise CheckpointError(f"cannot export a {type(module).__name__}: sr1step does not know how to rebuild it")


def export_safetensors(
    module: nn.Module,
    path: str | Path,
    inference: InferenceSpec | None = None,
    metadata: dict[str, str] | None = None,
    state: dict[str, Tensor] | None = None,
) -> Path:
    """Write a self-describing safetensors file (config + inference settings in metadata), atomically."""
    path = Path(path)
    arch, config = describe_module(module, inference)
    header = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "arch": arch,
        "config": json.dumps(config, sort_keys=True),
        "sr1step_version": __version__,
    }
    if inference is not None:
        header["inference"] = json.dumps(inference.to_dict(), sort_keys=True)
    for key, value in (metadata or {}).items():
        if key in header:
            raise ConfigError(f"metadata key {key!r} is reserved by the sr1step format")
        header[key] = str(value)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in (state or module.state_dict()).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    return path


def convert_checkpoint(
    src: str | Path,
    dst: str | Path,
    metadata: dict[str, str] | None = None,
    inference: InferenceSpec | None = None,
) -> Path:
    """Any supported checkpoint → sr1step safetensors (weights unchanged, config and settings in metadata)."""
    loaded = load_model(src)
    spec = inference or loaded.descriptor.inference
    extra = {"source_file": Path(src).name}
    extra.update(metadata or {})
    return export_safetensors(loaded.module, dst, spec, extra)
