"""YONOS-SR (arXiv 2401.17258): a Stable-Diffusion UNet and VAE that super-resolve in one DDIM step.

The denoiser is a diffusers ``UNet2DConditionModel`` whose first conv takes [z_t, z_lr] (the LR channels are new and
zero-initialised, so the widened UNet equals the base at step 0); z_lr is the VAE latent of the bicubic-upsampled
LR image, at the HR latent size. Cross-attention always sees one fixed prompt embedding, computed once from the
base's text encoder and stored as a buffer: inference needs no text encoder. Inference is one DDIM step from
t = T: the x0 prediction from pure noise (+ z_lr), decoded by the VAE. The paper leaves the SD version, prediction
type, schedule and LR injection open; the choices here are the reference's defaults (``distillation.md`` §6.9).

Exports are self-describing sr1step safetensors (``arch = "yonos-sd"``): UNet + full VAE (encoder and the
fine-tuned decoder) + prompt embedding, with the diffusers configs and settings in the metadata. Importing this
module registers their detector and builder with :mod:`sr1step.checkpoints`.

diffusers (and transformers, to build from a base) are the optional extra ``sr1step[sd]``, imported lazily.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sr1step.checkpoints import (
    FORMAT_NAME,
    LoadedModel,
    ModelDescriptor,
    register_builder,
    register_detector,
)
from sr1step.errors import CheckpointError, ConfigError, Sr1stepError
from sr1step.pipeline import TiledUpscaler, TileSettings, resolve_dtype
from sr1step.tiling import Tile

ARCH = "yonos-sd"
PREDICTIONS = ("epsilon", "v_prediction", "sample")
SCHEDULES = ("base", "zero_snr")
LR_UPSAMPLING = ("bicubic", "bilinear")
ONE_STEP_STARTS = ("noise", "lr")
EXPORT_KEYS = (
    "unet",
    "vae",
    "scheduler",
    "scale",
    "prompt_shape",
    "lr_upsample",
    "one_step_start",
    "latent_tile",
)

# What a diffusers base folder must provide (safetensors weights only: pickles are never loaded).
BASE_FILES = (
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
)
BASE_PATTERNS = (*BASE_FILES, "model_index.json", "tokenizer/*")
# The schedule keys taken from the base (the rest of its scheduler config is sampler-specific).
_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")

SD_INSTALL_HINT = "pip install 'sr1step[sd]'"


def _diffusers() -> Any:
    try:
        import diffusers
    except ModuleNotFoundError:
        raise ConfigError(f"YONOS-SR needs diffusers and transformers: {SD_INSTALL_HINT}") from None
    # diffusers imports bitsandbytes when it is installed (pyiqa pulls it in), whose CPU backend warns about an
    # optional kernel package at import: noise on stderr for sr1step, which never quantizes
    noisy = logging.getLogger("bitsandbytes")
    level = noisy.level
    noisy.setLevel(logging.ERROR)
    try:
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel  # noqa: F401 - import once here
    finally:
        noisy.setLevel(level)
    return diffusers


@contextlib.contextmanager
def _quiet_loading(*packages: str) -> Iterator[None]:
    """diffusers/transformers draw progress bars and warnings while loading: sr1step reports loading itself."""
    restore: list[Callable[[], None]] = []
    for package in packages:
        with contextlib.suppress(ImportError):
            hf_logging = importlib.import_module(f"{package}.utils.logging")
            if hf_logging.is_progress_bar_enabled():
                hf_logging.disable_progress_bar()
                restore.append(hf_logging.enable_progress_bar)
            level = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()
            restore.append(lambda hf_logging=hf_logging, level=level: hf_logging.set_verbosity(level))
    try:
        yield
    finally:
        for undo in restore:
            undo()


def _plain_config(config: Any) -> dict[str, Any]:
    """A diffusers config as JSON-ready values, without its private bookkeeping keys (``_class_name``, ...)."""
    return json.loads(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}))


def _dtype_of(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def make_scheduler_config(base: dict[str, Any], prediction: str, schedule: str) -> dict[str, Any]:
    """The DDIM config of a YONOS model: the base's β schedule, our prediction type and terminal-SNR choice."""
    if prediction not in PREDICTIONS:
        raise ConfigError(f"prediction must be one of {', '.join(PREDICTIONS)}, got {prediction!r}")
    if schedule not in SCHEDULES:
        raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if schedule == "zero_snr" and prediction == "epsilon":
        raise ConfigError(
            "schedule 'zero_snr' has α_T = 0, where an ε-prediction cannot give x0; use v_prediction"
        )
    kept = {k: base[k] for k in _SCHEDULE_KEYS if k in base}
    diffusers = _diffusers()
    scheduler = diffusers.DDIMScheduler(
        **kept,
        prediction_type=prediction,
        rescale_betas_zero_snr=schedule == "zero_snr",
        clip_sample=False,
        set_alpha_to_one=True,
        timestep_spacing="trailing",  # a 1-step DDIM then starts at t = T − 1, the last training step
    )
    return _plain_config(scheduler.config)


def _alphas_cumprod(scheduler_config: dict[str, Any]) -> Tensor:
    scheduler = _diffusers().DDIMScheduler(**scheduler_config)
    return scheduler.alphas_cumprod.to(torch.float64)


# --------------------------------------------------------------------------------------------- the model


class LatentDecoder(nn.Module):
    """The VAE's decoding half (post_quant_conv + decoder) on scaled latents; it shares the VAE's modules, so
    training it trains the VAE's decoder (YONOS-SR's decoder fine-tuning)."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.post_quant_conv = vae.post_quant_conv
        self.decoder = vae.decoder
        self.factor = float(vae.config.scaling_factor)
        self.shift = float(vae.config.get("shift_factor") or 0.0)

    def forward(self, z: Tensor) -> Tensor:
        z = (z.float() / self.factor + self.shift).to(_dtype_of(self.decoder))
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)


class YonosSR(nn.Module):
    """UNet (8-channel input) + VAE + fixed prompt embedding + DDIM schedule: the whole one-step SR model.

    Latents are VAE latents times the VAE scaling factor (SD: 0.18215). ``scale`` is the SR factor the model was
    trained for; it runs at others too (the LR is upsampled to any HR size first), which training stages use.
    """

    export_arch = ARCH

    def __init__(
        self,
        unet: nn.Module,
        vae: nn.Module,
        prompt_embeds: Tensor,
        scheduler_config: dict[str, Any],
        *,
        scale: int,
        lr_upsample: str = "bicubic",
        one_step_start: str = "noise",
        latent_tile: int = 64,
        provenance: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        latent_channels = int(vae.config.latent_channels)
        if int(unet.config.in_channels) != 2 * latent_channels:
            raise ConfigError(
                f"a YONOS UNet takes [z_t, z_lr] ({2 * latent_channels} channels), this one takes "
                f"{unet.config.in_channels}"
            )
        if int(unet.config.out_channels) != latent_channels:
            raise ConfigError(
                f"the UNet predicts {unet.config.out_channels} channels, the VAE has {latent_channels}"
            )
        width = unet.config.cross_attention_dim
        if prompt_embeds.ndim != 3 or prompt_embeds.shape[0] != 1 or prompt_embeds.shape[-1] != width:
            raise ConfigError(
                f"the prompt embedding must be (1, tokens, {width}), got {tuple(prompt_embeds.shape)}"
            )
        if lr_upsample not in LR_UPSAMPLING:
            raise ConfigError(f"lr_upsample must be one of {', '.join(LR_UPSAMPLING)}, got {lr_upsample!r}")
        if one_step_start not in ONE_STEP_STARTS:
            raise ConfigError(
                f"one_step_start must be one of {', '.join(ONE_STEP_STARTS)}, got {one_step_start!r}"
            )
        if scale < 1 or latent_tile < 1:
            raise ConfigError(f"scale and latent_tile must be >= 1, got {scale} and {latent_tile}")
        self.unet = unet
        self.vae = vae
        self.register_buffer("prompt_embeds", prompt_embeds.detach().float().clone())
        self.scheduler_config = dict(scheduler_config)
        self.prediction = str(self.scheduler_config["prediction_type"])
        if self.prediction not in PREDICTIONS:
            raise ConfigError(f"prediction type {self.prediction!r} is not one of {', '.join(PREDICTIONS)}")
        # float64 and not persistent: rebuilt from the config, never cast to a half dtype with the networks
        self.register_buffer("alphas_cumprod", _alphas_cumprod(self.scheduler_config), persistent=False)
        if self.prediction == "epsilon" and float(self.alphas_cumprod[-1]) <= 0:
            raise ConfigError("an ε-predicting model needs α_T > 0 (not a zero-terminal-SNR schedule)")
        self.scale = int(scale)
        self.lr_upsample = lr_upsample
        self.one_step_start = one_step_start
        self.latent_tile = int(latent_tile)
        self.provenance = dict(provenance or {})

    # ------------------------------------------------------------------------------------- geometry

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def vae_factor(self) -> int:
        """Pixels per latent position (SD: 8)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_multiple(self) -> int:
        """Latent sizes must be multiples of this (one halving per UNet down block but the last)."""
        return 2 ** (len(self.unet.config.down_block_types) - 1)

    @property
    def pixel_multiple(self) -> int:
        return self.vae_factor * self.latent_multiple

    @property
    def terminal_timestep(self) -> int:
        return len(self.alphas_cumprod) - 1

    # ------------------------------------------------------------------------------------- pieces

    def encode_images(self, images: Tensor) -> Tensor:
        """Images in [-1, 1] → scaled latents (the posterior mean, deterministic), float32."""
        factor = float(self.vae.config.scaling_factor)
        shift = float(self.vae.config.get("shift_factor") or 0.0)
        posterior = self.vae.encode(images.to(_dtype_of(self.vae))).latent_dist
        return (posterior.mean.float() - shift) * factor

    def encode_lr(self, lr: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        """z_lr: the LR in [-1, 1] upsampled to ``size`` (default ×scale) and encoded, float32."""
        if size is None:
            size = (lr.shape[-2] * self.scale, lr.shape[-1] * self.scale)
        up = F.interpolate(lr.float(), size=size, mode=self.lr_upsample, align_corners=False)
        return self.encode_images(up.clamp(-1, 1))

    def decode(self, z: Tensor) -> Tensor:
        """Scaled latents → images in about [-1, 1]."""
        return LatentDecoder(self.vae)(z)

    def _signal_noise(self, t: Tensor) -> tuple[Tensor, Tensor]:
        abar = self.alphas_cumprod.to(t.device)[t].view(-1, 1, 1, 1)
        return abar.sqrt().float(), (1 - abar).sqrt().float()

    def add_noise(self, z0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """z_t = α_t z0 + σ_t ε (variance preserving)."""
        alpha, sigma = self._signal_noise(t)
        return alpha * z0 + sigma * noise

    def snr(self, t: Tensor) -> Tensor:
        abar = self.alphas_cumprod.to(t.device)[t]
        return (abar / (1 - abar)).float()

    def predict_x0(self, z_t: Tensor, t: Tensor, z_lr: Tensor, unet: nn.Module | None = None) -> Tensor:
        """x̂0 of the UNet (``unet`` overrides, e.g. a teacher) from its ε, v or x0 output, float32."""
        unet = self.unet if unet is None else unet
        dtype = _dtype_of(unet)
        context = self.prompt_embeds.to(dtype).expand(z_t.shape[0], -1, -1)
        out = unet(torch.cat([z_t, z_lr], dim=1).to(dtype), t, encoder_hidden_states=context).sample.float()
        if self.prediction == "sample":
            return out
        alpha, sigma = self._signal_noise(t)
        z_t = z_t.float()
        if self.prediction == "epsilon":
            return (z_t - sigma * out) / alpha
        return alpha * z_t - sigma * out

    def forward(self, z_t: Tensor, t: Tensor, z_lr: Tensor) -> Tensor:
        return self.predict_x0(z_t, t, z_lr)

    def one_step(self, z_lr: Tensor, noise: Tensor, unet: nn.Module | None = None) -> Tensor:
        """One DDIM step from t = T: the x0 prediction from pure noise (or the noised LR latent) and z_lr."""
        t = torch.full((z_lr.shape[0],), self.terminal_timestep, dtype=torch.long, device=z_lr.device)
        noise = noise.float()
        z_T = noise if self.one_step_start == "noise" else self.add_noise(z_lr.float(), noise, t)
        return self.predict_x0(z_T, t, z_lr, unet)

    # ------------------------------------------------------------------------------------- export / build

    def export_config(self) -> dict[str, Any]:
        return {
            "unet": _plain_config(self.unet.config),
            "vae": _plain_config(self.vae.config),
            "scheduler": dict(self.scheduler_config),
            "scale": self.scale,
            "prompt_shape": list(self.prompt_embeds.shape),
            "lr_upsample": self.lr_upsample,
            "one_step_start": self.one_step_start,
            "latent_tile": self.latent_tile,
            "provenance": dict(self.provenance),
        }

    @classmethod
    def from_export_config(cls, config: dict[str, Any], *, initialise: bool = True) -> YonosSR:
        """The architecture of an export. ``initialise=False`` skips weight initialisation (a state dict follows)."""
        missing = [k for k in EXPORT_KEYS if k not in config]
        if missing:
            raise ConfigError(f"a YONOS-SR config needs {', '.join(missing)}")
        diffusers = _diffusers()
        skip_init = contextlib.nullcontext()
        if not initialise:
            from diffusers.models import modeling_utils

            no_init = getattr(modeling_utils, "no_init_weights", None)
            skip_init = no_init() if no_init is not None else contextlib.nullcontext()
        with _quiet_loading("diffusers"), skip_init:
            unet = diffusers.UNet2DConditionModel.from_config(config["unet"])
            vae = diffusers.AutoencoderKL.from_config(config["vae"])
        return cls(
            unet,
            vae,
            torch.zeros(*config["prompt_shape"]),
            config["scheduler"],
            scale=int(config["scale"]),
            lr_upsample=config["lr_upsample"],
            one_step_start=config["one_step_start"],
            latent_tile=int(config["latent_tile"]),
            provenance=config.get("provenance"),
        )

    @classmethod
    def from_base(
        cls,
        spec: str,
        *,
        scale: int,
        prediction: str = "v_prediction",
        schedule: str = "base",
        empty_prompt: str = "",
        lr_upsample: str = "bicubic",
        one_step_start: str = "noise",
        latent_tile: int = 64,
        offline: bool = False,
        progress: bool = False,
    ) -> YonosSR:
        """A fresh YONOS model from a Stable-Diffusion base: ``hf://owner/repo[@rev]`` or a local diffusers folder.

        The UNet's first conv is widened to [z_t, z_lr] with zero weights on the new channels; the prompt embedding
        is computed here once, and the text encoder is dropped.
        """
        folder, provenance = locate_base(spec, offline=offline, progress=progress)
        diffusers = _diffusers()
        try:
            import transformers
        except ModuleNotFoundError:
            raise ConfigError(
                f"building YONOS-SR from a base needs transformers: {SD_INSTALL_HINT}"
            ) from None
        scheduler_file = folder / "scheduler" / "scheduler_config.json"
        try:
            base_schedule = json.loads(scheduler_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{scheduler_file}: cannot read the base's scheduler config ({exc})") from None
        with _quiet_loading("diffusers", "transformers"):
            unet = _load_part(
                folder,
                "unet",
                lambda: diffusers.UNet2DConditionModel.from_pretrained(
                    folder, subfolder="unet", use_safetensors=True, local_files_only=True
                ),
            )
            vae = _load_part(
                folder,
                "vae",
                lambda: diffusers.AutoencoderKL.from_pretrained(
                    folder, subfolder="vae", use_safetensors=True, local_files_only=True
                ),
            )
            tokenizer = _load_part(
                folder,
                "tokenizer",
                lambda: transformers.AutoTokenizer.from_pretrained(
                    folder / "tokenizer", local_files_only=True
                ),
            )
            text_encoder = _load_part(
                folder,
                "text_encoder",
                lambda: transformers.CLIPTextModel.from_pretrained(
                    folder / "text_encoder", use_safetensors=True, local_files_only=True
                ),
            )
        if int(unet.config.in_channels) != int(vae.config.latent_channels):
            raise ConfigError(
                f"{folder}/unet: takes {unet.config.in_channels} channels, the VAE makes {vae.config.latent_channels}; "
                "a text-to-image Stable Diffusion base is expected"
            )
        prompt_embeds = encode_prompt(tokenizer, text_encoder, empty_prompt)
        del text_encoder
        widen_conv_in(unet, extra_channels=int(vae.config.latent_channels))
        provenance["empty_prompt"] = empty_prompt
        return cls(
            unet,
            vae,
            prompt_embeds,
            make_scheduler_config(base_schedule, prediction, schedule),
            scale=scale,
            lr_upsample=lr_upsample,
            one_step_start=one_step_start,
            latent_tile=latent_tile,
            provenance=provenance,
        ).eval()


def _load_part(folder: Path, part: str, load: Callable[[], Any]) -> Any:
    try:
        return load()
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{folder / part}: cannot load the base's {part} ({first})") from None


def widen_conv_in(unet: nn.Module, extra_channels: int) -> None:
    """Give the UNet's first conv ``extra_channels`` more inputs (appended last) with zero weights, in place."""
    old = unet.conv_in
    new = nn.Conv2d(
        old.in_channels + extra_channels,
        old.out_channels,
        old.kernel_size,
        stride=old.stride,
        padding=old.padding,
        bias=old.bias is not None,
    ).to(old.weight.device, old.weight.dtype)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : old.in_channels].copy_(old.weight)
        if old.bias is not None:
            new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=old.in_channels + extra_channels)


@torch.no_grad()
def encode_prompt(tokenizer: Any, text_encoder: nn.Module, prompt: str) -> Tensor:
    """The (1, tokens, width) cross-attention context of ``prompt`` as SD pipelines make it (last hidden state)."""
    ids = tokenizer(
        prompt,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return text_encoder(ids.to(next(text_encoder.parameters()).device))[0].float().cpu()


def locate_base(spec: str, *, offline: bool, progress: bool) -> tuple[Path, dict[str, str]]:
    """A local diffusers folder for ``spec`` (downloading the needed files of an ``hf://`` repo into the HF cache)."""
    provenance = {"base": spec}
    if spec.startswith("hf://"):
        from sr1step.weights.hub import hub_snapshot, parse_hf_spec

        hub = parse_hf_spec(spec)
        if hub.filename is not None:
            raise ConfigError(
                f"{spec}: the base is a diffusers repository (hf://owner/repo[@rev]), not a file"
            )
        folder = hub_snapshot(
            hub.repo,
            spec,
            allow_patterns=list(BASE_PATTERNS),
            revision=hub.revision,
            offline=offline,
            progress=progress,
        )
        provenance["base_commit"] = folder.name
    else:
        folder = Path(spec).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"{spec}: no such diffusers folder (and not an hf://owner/repo spec)")
    missing = [name for name in BASE_FILES if not (folder / name).is_file()]
    if not (folder / "tokenizer").is_dir():
        missing.append("tokenizer/")
    if missing:
        raise ConfigError(
            f"{folder}: not a Stable Diffusion base in diffusers layout with safetensors weights "
            f"(missing {missing[0]})"
        )
    return folder, provenance


# --------------------------------------------------------------------------------------------- checkpoints


def _detect(state: dict[str, Tensor], metadata: dict[str, str], source: str) -> ModelDescriptor | None:
    if metadata.get("format") != FORMAT_NAME or metadata.get("arch") != ARCH:
        return None
    try:
        config = json.loads(metadata["config"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{source}: YONOS-SR metadata is damaged ({exc})") from None
    missing = [k for k in EXPORT_KEYS if k not in config]
    if missing:
        raise CheckpointError(f"{source}: YONOS-SR metadata lacks {missing[0]!r}")
    return ModelDescriptor(ARCH, config, source, None, dict(metadata))


def _build(config: dict[str, Any]) -> nn.Module:
    try:
        return YonosSR.from_export_config(config, initialise=False)
    except ConfigError as exc:
        # build() turns ConfigErrors into "invalid config": a missing package is not that
        if "diffusers" in str(exc):
            raise CheckpointError(str(exc)) from None
        raise


register_detector(ARCH, _detect)
register_builder(ARCH, _build)


# --------------------------------------------------------------------------------------------- inference


def _lr_multiple(model: YonosSR, scale: int) -> int:
    """LR px per tile step: HR = LR·s must give whole latents that are multiples of the UNet's multiple."""
    return model.pixel_multiple // math.gcd(model.pixel_multiple, scale)


def default_tiles(model: YonosSR, scale: int) -> TileSettings:
    """The model's latent tile in LR px (64 latents = 512 HR px for SD), a quarter of it as overlap."""
    multiple = _lr_multiple(model, scale)
    exact = model.latent_tile * model.vae_factor // scale
    tile = max(multiple, exact // multiple * multiple)
    return TileSettings(tile=tile, overlap=tile // 4)


@dataclass(frozen=True)
class YonosInference:
    """What ``upscale`` reports about how the model runs (the ResShift ``InferenceSpec`` does not apply)."""

    family: str = "yonos-sr"
    steps: int = 1
    scale: int = 4


class YonosUpscaler(TiledUpscaler):
    """Tiled one-step inference of a :class:`YonosSR`: per LR tile, bicubic ×s → encode → 1 DDIM step → decode.

    Tiles are planned in LR px so that each latent tile is whole and aligned with the shared position-keyed noise
    field; the default tile is the model's latent tile (64 latents = 512 HR px for SD).
    """

    def __init__(
        self,
        model: YonosSR,
        *,
        scale: int,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        tiles: TileSettings | None = None,
        seed: int | None = None,
        info: dict[str, Any] | None = None,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        self.model = model
        self.scale = int(scale)
        self.device = device
        self.dtype = dtype
        self.seed = seed
        self.warn = warn or (lambda message: None)
        factor = model.vae_factor
        self.lr_multiple = _lr_multiple(model, self.scale)
        # tile starts on multiples of f/gcd(f, s) LR px fall on whole latent positions
        self.noise_align = factor // math.gcd(factor, self.scale)
        self.tiles = tiles if tiles is not None else default_tiles(model, self.scale)
        model.to(device)
        # The SD VAE overflows in fp16 (diffusers' force_upcast): it then stays in fp32; bf16 is fine.
        upcast = dtype == torch.float16 and bool(model.vae.config.get("force_upcast", False))
        with _quiet_loading("diffusers"):  # diffusers warns on every dtype cast of a model
            for part, wanted in ((model.unet, dtype), (model.vae, torch.float32 if upcast else dtype)):
                if _dtype_of(part) != wanted:
                    part.to(wanted)
        self.inference = YonosInference(scale=self.scale)
        self.info = dict(info or {})
        self.info.update(
            scale=self.scale,
            device=str(device),
            dtype=str(dtype).removeprefix("torch."),
            tile=self.tiles.tile,
            overlap=self.tiles.overlap,
            tile_batch=self.tiles.tile_batch,
            seed=seed,
            steps=1,
            family="yonos-sr",
        )

    @classmethod
    def from_loaded(
        cls,
        loaded: LoadedModel,
        *,
        resolved: Any,
        scale: int,
        device: torch.device,
        dtype: str,
        tile: int | None,
        overlap: int | None,
        tile_batch: int = 1,
        blend: str = "cosine",
        noise: str = "shared",
        seed: int | None,
        warn: Callable[[str], None],
    ) -> YonosUpscaler:
        """The upscaler of a loaded ``yonos-sd`` export (``Upscaler.from_pretrained`` dispatches here)."""
        model = loaded.module
        if not isinstance(model, YonosSR):
            raise CheckpointError(f"{resolved.path}: is not a YONOS-SR model")
        if scale != model.scale:
            raise ConfigError(
                f"{resolved.path}: is a ×{model.scale} YONOS-SR model but ×{scale} was asked for; use -x {model.scale}"
            )
        model.eval().requires_grad_(False)
        info = {
            "model": resolved.spec,
            "model_path": str(resolved.path),
            "sha256": resolved.sha256,
            "base": model.provenance.get("base"),
        }
        # tile/overlap not given: the model's own latent tile (64×64 latents)
        defaults = default_tiles(model, scale)
        tiles = TileSettings(
            tile=defaults.tile if tile is None else tile,
            overlap=defaults.overlap if overlap is None else overlap,
            tile_batch=tile_batch,
            blend=blend,
            noise=noise,
        )
        return cls(
            model,
            scale=scale,
            device=device,
            dtype=resolve_dtype(dtype, device),
            tiles=tiles,
            seed=seed,
            info=info,
            warn=warn,
        )

    @torch.no_grad()
    def _forward_tiles(self, lr_tiles: Tensor, tiles: list[Tile], noise: Any) -> Tensor:
        """Padded LR tiles (B, 3, ph, pw) in [-1, 1] → HR tiles (B, 3, ph·s, pw·s), float32 on the CPU."""
        model, s = self.model, self.scale
        lr_tiles = lr_tiles.to(self.device)
        height, width = lr_tiles.shape[-2] * s, lr_tiles.shape[-1] * s
        if height % model.pixel_multiple or width % model.pixel_multiple:
            raise Sr1stepError(
                f"HR tile {width}×{height} is not a multiple of {model.pixel_multiple} px (tile planning bug)"
            )
        z_lr = model.encode_lr(lr_tiles, (height, width))
        lat_h, lat_w = z_lr.shape[-2:]
        ratio = s / model.vae_factor  # latent px per LR px
        prior = torch.stack(
            [
                noise.region(
                    "prior",
                    model.latent_channels,
                    round(t.y * ratio),
                    round(t.x * ratio),
                    lat_h,
                    lat_w,
                    self.device,
                )
                for t in tiles
            ]
        )
        x0 = model.one_step(z_lr, prior)
        return model.decode(x0).float().clamp(-1, 1).cpu()
