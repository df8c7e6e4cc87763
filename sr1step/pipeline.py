"""One-step diffusion SR inference: the only inference path (used by ``upscale``, ``eval``, ``bench``, ``distill``).

Per LR tile (official SinSR/RSD semantics, x4)::

    bicubic ×s → VQ encode → z_T = z_y + κ·sqrt(η_T)·ε → one UNet call at t = T−1 (student noise where the model
    has an input for it) → VQ decode (codebook-quantized, as official) → crop → clamp → blend → 8/16-bit

Tiles are planned in LR space (:mod:`sr1step.tiling`), batched, reflect-padded to a static shape, and blended with a
raised-cosine ramp; noise comes from one position-keyed field shared by all tiles, so overlaps see identical noise
and there are no seams. Finished HR rows are quantized as soon as no later tile touches them, so the float
working set is one band of tiles, not the whole image. The official path (uniform average, independent noise per
tile, 512/448 tiles) is a configuration of the same code (``blend="uniform", noise="per-tile"``) for ``bench``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from sr1step import diffusion as D
from sr1step.checkpoints import InferenceSpec, LoadedModel, load_model
from sr1step.errors import CheckpointError, ConfigError, Sr1stepError
from sr1step.models import ResShiftUNet, VQAutoencoder
from sr1step.tiling import BlockNoise, FieldNoise, Tile, blend_window, crop_reflect, plan_tiles

ProgressCallback = Callable[[int, int], None]

# Upscalers of architectures outside the ResShift family: arch → "module:class" with a ``from_loaded`` builder.
OTHER_ARCHITECTURES = {"yonos-sd": "sr1step.models.yonos:YonosUpscaler"}

DEFAULT_TILE = (
    256  # LR px: a 1024² HR tile at ×4 (the VQ decoder at that size fits a few GB in half precision)
)
DEFAULT_OVERLAP = 32  # LR px


# --------------------------------------------------------------------------------------------- devices


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA, then MPS, then CPU. An explicit device that is not available is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    if device.type == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise ConfigError("--device mps: MPS is not available on this machine")
    return device


_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on CUDA with bf16 support, fp16 on other CUDA and MPS, fp32 on CPU."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if device.type == "mps" else torch.float32
    try:
        return _DTYPES[name]
    except KeyError:
        raise ConfigError(f"--dtype must be auto, bf16, fp16 or fp32, got {name!r}") from None


def _is_oom(exc: BaseException) -> bool:
    message = str(exc).lower()
    return (
        isinstance(exc, torch.OutOfMemoryError)
        or "out of memory" in message
        or "can't allocate memory" in message  # the CPU allocator's wording
    )


# --------------------------------------------------------------------------------------------- noise


class PerTileNoise:
    """Independent noise per tile from one running generator (the official samplers' behaviour)."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def region(
        self,
        kind: str,
        channels: int,
        y: int,
        x: int,
        h: int,
        w: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        return torch.randn(channels, h, w, generator=self.generator).to(device=device, dtype=dtype)


# --------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class TileSettings:
    tile: int = DEFAULT_TILE  # LR px; 0 = whole image
    overlap: int = DEFAULT_OVERLAP  # LR px
    tile_batch: int = 1
    blend: str = "cosine"  # "cosine" | "uniform" (official)
    noise: str = "shared"  # "shared" (position-keyed field) | "per-tile" (official)
    margin: int | None = (
        None  # LR px of each overlapping tile edge left out of the blend; None = overlap // 4
    )

    def __post_init__(self) -> None:
        if self.tile < 0 or self.overlap < 0 or self.tile_batch < 1:
            raise ConfigError("--tile and --overlap must be >= 0 and --tile-batch >= 1")
        if self.tile and self.overlap >= self.tile:
            raise ConfigError(f"--overlap {self.overlap} must be smaller than --tile {self.tile}")
        if self.blend not in ("cosine", "uniform"):
            raise ConfigError(f"blend must be 'cosine' or 'uniform', got {self.blend!r}")
        if self.noise not in ("shared", "per-tile"):
            raise ConfigError(f"noise must be 'shared' or 'per-tile', got {self.noise!r}")
        if self.margin is not None and self.overlap and not 0 <= 2 * self.margin < self.overlap:
            raise ConfigError(
                f"the tile margin {self.margin} must be less than half the overlap {self.overlap}"
            )

    @property
    def edge_margin(self) -> int:
        return self.overlap // 4 if self.margin is None else self.margin


@dataclass
class UpscaleResult:
    image: np.ndarray  # (H·s, W·s, 3) in the requested dtype
    tiles: int
    tile: int  # the tile size finally used (after out-of-memory retries)
    seconds: float


# --------------------------------------------------------------------------------------------- upscaler


class TiledUpscaler:
    """The model-independent half of inference: tiling, shared noise, blending, banded output, OOM retries.

    Subclasses set ``scale``, ``device``, ``dtype``, ``tiles``, ``seed``, ``info``, ``warn``, ``lr_multiple`` (LR
    tile sizes are multiples of it) and ``noise_align`` (tile starts are multiples of it, so latent grids line up),
    and implement :meth:`_forward_tiles`.
    """

    scale: int
    device: torch.device
    dtype: torch.dtype
    tiles: TileSettings
    seed: int | None
    info: dict[str, Any]
    warn: Callable[[str], None]
    lr_multiple: int
    noise_align: int

    # ------------------------------------------------------------------------------------- public calls

    def __call__(self, image: Any, seed: int | None = None) -> Any:
        """PIL image in, PIL image out (RGB/L, 8-bit; alpha upscaled with a classical resampler)."""
        from PIL import Image

        mode = image.mode
        alpha = None
        if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            alpha = rgba.getchannel("A")
            rgb = np.asarray(rgba.convert("RGB"))
        else:
            rgb = np.asarray(image.convert("RGB"))
        out = self.upscale_array(rgb, seed=seed).image
        result = Image.fromarray(out, "RGB")
        if mode in ("L", "LA", "I;16", "I"):
            result = result.convert("L")
        if alpha is not None:
            size = (alpha.width * self.scale, alpha.height * self.scale)
            result = result.convert("RGBA" if result.mode == "RGB" else "LA")
            result.putalpha(alpha.resize(size, Image.Resampling.BICUBIC))
        return result

    def upscale_array(
        self,
        rgb: np.ndarray,
        *,
        out_dtype: type = np.uint8,
        seed: int | None = None,
        noise: Any = None,
        progress: ProgressCallback | None = None,
    ) -> UpscaleResult:
        """(H, W, 3) uint8/uint16 or float in [0, 1] → (H·s, W·s, 3) of ``out_dtype`` (uint8, uint16 or float32).

        On CUDA out-of-memory the tile is halved (down to the network's multiple) and the image retried.
        """
        if rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ConfigError(f"expected an (H, W, 3) image, got shape {rgb.shape}")
        if rgb.dtype == np.uint8:
            unit = rgb.astype(np.float32) / 255.0
        elif rgb.dtype == np.uint16:
            unit = rgb.astype(np.float32) / 65535.0
        else:
            unit = np.clip(rgb.astype(np.float32), 0.0, 1.0)
        lr = torch.from_numpy(np.ascontiguousarray(unit)).permute(2, 0, 1)[None] * 2 - 1
        settings = self.tiles
        started = time.perf_counter()
        while True:
            try:
                out, count = self._run(lr, settings, out_dtype, self._noise_source(seed, noise), progress)
                break
            except (torch.OutOfMemoryError, RuntimeError) as exc:
                if not _is_oom(exc):
                    raise
                current = settings.tile or max(lr.shape[-2:])
                smaller = max(self.lr_multiple, (current // 2) // self.lr_multiple * self.lr_multiple)
                if smaller >= current:
                    raise Sr1stepError(
                        f"out of memory on {self.device} even with the smallest tile ({current} px); try --dtype fp16"
                    ) from None
                self._empty_cache()
                self.warn(f"out of memory with tile {current}: retrying with tile {smaller}")
                overlap = min(settings.overlap, smaller // 4)
                settings = replace(
                    settings, tile=smaller, overlap=overlap, margin=min(settings.edge_margin, overlap // 4)
                )
        return UpscaleResult(out, count, settings.tile, time.perf_counter() - started)

    def upscale_tensor(self, lr: Tensor, seed: int | None = None, noise: Any = None) -> Tensor:
        """(1, 3, H, W) in [-1, 1] → (1, 3, H·s, W·s) float in [-1, 1] (clamped; no quantization to 8 bits)."""
        if lr.ndim != 4 or lr.shape[:2] != (1, 3):
            raise ConfigError(f"expected a (1, 3, H, W) tensor, got {tuple(lr.shape)}")
        out, _ = self._run(lr.float().cpu(), self.tiles, np.float32, self._noise_source(seed, noise), None)
        return torch.from_numpy(out).permute(2, 0, 1)[None] * 2 - 1

    # ------------------------------------------------------------------------------------- internals

    def _empty_cache(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _noise_source(self, seed: int | None, noise: Any) -> Any:
        if noise is not None:
            return FieldNoise(noise) if isinstance(noise, dict) else noise
        seed = self.seed if seed is None else seed
        if seed is None:
            seed = int.from_bytes(
                hashlib.blake2b(str(time.time_ns()).encode(), digest_size=4).digest(), "little"
            )
        return PerTileNoise(seed) if self.tiles.noise == "per-tile" else BlockNoise(seed)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def _forward_tiles(self, lr_tiles: Tensor, tiles: list[Tile], noise: Any) -> Tensor:
        """Padded LR tiles (B, 3, ph, pw) in [-1, 1] → HR tiles (B, 3, ph·s, pw·s), float32 on the CPU."""
        raise NotImplementedError

    def _run(
        self,
        lr: Tensor,
        settings: TileSettings,
        out_dtype: type,
        noise: Any,
        progress: ProgressCallback | None,
    ) -> tuple[np.ndarray, int]:
        _, _, height, width = lr.shape
        s = self.scale
        grid = plan_tiles(height, width, settings.tile, settings.overlap, self.lr_multiple, self.noise_align)
        total = len(grid.tiles)
        out = np.empty((height * s, width * s, 3), dtype=out_dtype)
        overlap_hr, margin_hr = settings.overlap * s, settings.edge_margin * s
        done = 0
        # Band accumulator: HR rows [band_top, band_top + band height) of the current row of tiles.
        band_top = 0
        acc = torch.zeros(3, 0, width * s)
        weight = torch.zeros(0, width * s)
        for row_index, row in enumerate(grid.rows):
            row_top = row[0].y * s
            row_bottom = row_top + row[0].h * s
            # grow the band to cover this row
            extra = row_bottom - (band_top + acc.shape[1])
            if extra > 0:
                acc = torch.cat([acc, torch.zeros(3, extra, width * s)], dim=1)
                weight = torch.cat([weight, torch.zeros(extra, width * s)], dim=0)
            for start in range(0, len(row), settings.tile_batch):
                batch = row[start : start + settings.tile_batch]
                lr_tiles = torch.cat(
                    [crop_reflect(lr, t.y, t.x, grid.padded_h, grid.padded_w) for t in batch]
                )
                hr_tiles = self._forward_tiles(lr_tiles, batch, noise)
                for tile, hr in zip(batch, hr_tiles, strict=True):
                    w = blend_window(tile, s, overlap_hr, margin_hr, settings.blend)
                    hr = hr[:, : tile.h * s, : tile.w * s]
                    y0 = tile.y * s - band_top
                    x0 = tile.x * s
                    acc[:, y0 : y0 + tile.h * s, x0 : x0 + tile.w * s] += hr * w
                    weight[y0 : y0 + tile.h * s, x0 : x0 + tile.w * s] += w
                done += len(batch)
                if progress is not None:
                    progress(done, total)
            # rows above the next tile row are final
            next_top = grid.rows[row_index + 1][0].y * s if row_index + 1 < len(grid.rows) else height * s
            final = next_top - band_top
            if final > 0:
                out[band_top:next_top] = _quantize(acc[:, :final] / weight[:final], out_dtype)
                acc, weight = acc[:, final:].clone(), weight[final:].clone()
                band_top = next_top
        return out, total


@dataclass
class Upscaler(TiledUpscaler):
    """A loaded one-step (or multi-step teacher) ResShift-family model with its VQ autoencoder.

    Call it on a PIL image, or use :meth:`upscale_array` / :meth:`upscale_tensor` for arrays and tensors.
    """

    unet: ResShiftUNet
    vae: VQAutoencoder
    inference: InferenceSpec
    scale: int = 4
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    tiles: TileSettings = field(default_factory=TileSettings)
    seed: int | None = None
    info: dict[str, Any] = field(default_factory=dict)
    warn: Callable[[str], None] = lambda message: None

    def __post_init__(self) -> None:
        if self.inference.scale is not None and self.inference.scale != self.scale:
            raise ConfigError(
                f"the model is a ×{self.inference.scale} model but ×{self.scale} was asked for; use -x {self.inference.scale}"
            )
        self.schedule = D.ResShiftSchedule(**self.inference.schedule)
        self.unet = self.unet.to(self.device).eval().requires_grad_(False)
        # The VQ runs natively in the compute dtype (SinSR/ComfyUI practice); the UNet keeps fp32 weights and runs
        # under autocast (ResShift practice), its GroupNorms and softmax in fp32.
        self.vae = self.vae.to(self.device, self.dtype).eval().requires_grad_(False)
        factor = self.vae.downsample_factor
        if self.inference.lq_mode == "lr" and self.scale * 2**self.unet.config.lq_stages != factor:
            # lq = LR tile must be 2**lq_stages × the latent (= LR·s/f): only x4 with f4 (or x2 with the x2 config)
            raise ConfigError(
                f"a model fed the LR tile needs scale·2^stages = f (here {self.scale}·{2**self.unet.config.lq_stages} "
                f"vs f{factor}); this model cannot run at ×{self.scale}"
            )
        latent_multiple = self.unet.config.size_multiple
        self.lr_multiple = max(1, latent_multiple * factor // self.scale)
        # Tile starts on multiples of f/s LR px keep every tile's latent grid aligned with the shared noise field.
        self.noise_align = max(1, factor // self.scale)
        self.info.update(
            scale=self.scale,
            device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."),
            tile=self.tiles.tile,
            overlap=self.tiles.overlap,
            tile_batch=self.tiles.tile_batch,
            seed=self.seed,
            steps=self.inference.steps,
            family=self.inference.family,
        )

    # ------------------------------------------------------------------------------------- construction

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path | None = None,
        *,
        scale: int = 4,
        vae: str | Path | None = None,
        device: str = "auto",
        dtype: str = "auto",
        tile: int | None = None,
        overlap: int | None = None,
        tile_batch: int = 1,
        seed: int | None = None,
        steps: int | None = None,
        quantize: bool | None = None,
        offline: bool = False,
        progress: bool = False,
        blend: str = "cosine",
        noise: str = "shared",
        warn: Callable[[str], None] | None = None,
    ) -> Upscaler:
        """Load a model by registry name, local path or ``hf://owner/repo[/file][@rev]`` (default: the best public
        one-step model for ``scale``), plus its VQ autoencoder (``vae`` or the one the model names)."""
        from sr1step import weights

        spec = str(model) if model is not None else weights.default_model_for_scale(scale)
        resolved = weights.resolve_model(spec, offline=offline, progress=progress)
        loaded = load_model(weights.converted_path(resolved))
        if loaded.descriptor.arch != "resshift-unet":
            if loaded.descriptor.arch not in OTHER_ARCHITECTURES:
                raise CheckpointError(f"{resolved.path}: is a {loaded.descriptor.summary()}, not an SR model")
            ignored = [
                name
                for name, value in (("--vae", vae), ("--steps", steps), ("--no-quantize", quantize))
                if value is not None
            ]
            if ignored:
                raise ConfigError(
                    f"{resolved.path}: {', '.join(ignored)} apply to ResShift-family models only"
                )
            module_name, class_name = OTHER_ARCHITECTURES[loaded.descriptor.arch].split(":")
            other = getattr(importlib.import_module(module_name), class_name)
            return other.from_loaded(
                loaded,
                resolved=resolved,
                scale=scale,
                device=resolve_device(device),
                dtype=dtype,
                tile=tile,
                overlap=overlap,
                tile_batch=tile_batch,
                blend=blend,
                noise=noise,
                seed=seed,
                warn=warn or (lambda message: None),
            )
        descriptor = loaded.descriptor
        inference = descriptor.inference or InferenceSpec()
        entry = resolved.entry
        if entry is not None and entry.arch == "resshift-unet":
            # The file's own metadata wins; a bare checkpoint takes the registry's settings.
            registry = weights.inference_spec(entry)
            inference = (
                replace(inference, scale=inference.scale or registry.scale)
                if (descriptor.inference_from_metadata)
                else registry
            )
        for note in descriptor.notes:
            if not (entry is not None and "6-channel" in note):
                (warn or (lambda message: None))(f"{spec}: {note}")
        if inference.scale is None:
            inference = replace(inference, scale=scale)
        if steps is not None:
            inference = replace(inference, steps=steps)
        if quantize is not None:
            inference = replace(inference, decode_quantize=quantize)
        vae_spec = str(vae) if vae is not None else inference.vae
        vae_resolved = weights.resolve_model(vae_spec, offline=offline, progress=progress)
        vae_loaded: LoadedModel = load_model(weights.converted_path(vae_resolved), expect="vq-autoencoder")
        torch_device = resolve_device(device)
        info = {
            "model": spec,
            "model_path": str(resolved.path),
            "sha256": resolved.sha256,
            "vae": vae_spec,
            "vae_sha256": vae_resolved.sha256,
        }
        return cls(
            unet=loaded.module,  # type: ignore[arg-type]
            vae=vae_loaded.module,  # type: ignore[arg-type]
            inference=inference,
            scale=scale,
            device=torch_device,
            dtype=resolve_dtype(dtype, torch_device),
            tiles=TileSettings(
                tile=DEFAULT_TILE if tile is None else tile,
                # a smaller tile than the default gets a proportionally smaller default overlap
                overlap=overlap if overlap is not None else min(DEFAULT_OVERLAP, (tile or DEFAULT_TILE) // 4),
                tile_batch=tile_batch,
                blend=blend,
                noise=noise,
            ),
            seed=seed,
            info=info,
            warn=warn or (lambda message: None),
        )

    def _lq_input(self, lr_tiles: Tensor, hr_tiles: Tensor, z_y: Tensor) -> Tensor:
        mode = self.inference.lq_mode
        if mode == "lr":
            return lr_tiles
        if mode == "latent":
            return z_y.float()
        # "pixel": the bicubic HR tile resized down to latent size (an approximation of the LR), as sorryhyun trains it
        resized = F.interpolate(hr_tiles.float(), size=z_y.shape[-2:], mode="bicubic", align_corners=False)
        return resized.clamp(-1, 1)

    @torch.no_grad()
    def _forward_tiles(self, lr_tiles: Tensor, tiles: list[Tile], noise: Any) -> Tensor:
        """Padded LR tiles (B, 3, ph, pw) in [-1, 1] → HR tiles (B, 3, ph·s, pw·s), float32 on the CPU."""
        device, factor = self.device, self.vae.downsample_factor
        lr_tiles = lr_tiles.to(device)
        hr_up = F.interpolate(lr_tiles, scale_factor=self.scale, mode="bicubic", align_corners=False)
        z_y = self.vae.encode(hr_up.to(self.dtype)).float()
        lat_h, lat_w = z_y.shape[-2:]
        ratio = self.scale / factor  # latent px per LR px

        def field_of(kind: str, channels: int) -> Tensor:
            return torch.stack(
                [
                    noise.region(kind, channels, int(t.y * ratio), int(t.x * ratio), lat_h, lat_w, device)
                    for t in tiles
                ]
            )

        lq = self._lq_input(lr_tiles, hr_up, z_y)
        cfg = self.unet.config
        student_noise = field_of("student", cfg.noise_channels) if cfg.noise_channels else None
        denoiser = D.unet_denoiser(self.unet, lq, student_noise)
        prior = field_of("prior", z_y.shape[1])
        with self._autocast():
            if self.inference.steps == 1:
                x0 = D.one_step(self.schedule, denoiser, z_y, prior, self.inference.prior_noise_scale)
            else:
                if self.inference.steps != self.schedule.steps:
                    raise ConfigError(
                        f"a {self.inference.steps}-step run needs a {self.inference.steps}-step schedule "
                        f"(the model's has {self.schedule.steps})"
                    )
                x0 = D.sample(
                    self.schedule,
                    denoiser,
                    z_y,
                    prior,
                    step_noise=lambda i: field_of(f"step{i}", z_y.shape[1]),
                )
        hr = self.vae.decode(x0.to(self.dtype), quantize=self.inference.decode_quantize)
        return hr.float().clamp(-1, 1).cpu()


def _quantize(block: Tensor, out_dtype: type) -> np.ndarray:
    """(3, h, w) in [-1, 1] → (h, w, 3) of out_dtype, round-half-even like the official ``np.round``."""
    unit = (block * 0.5 + 0.5).clamp(0, 1).permute(1, 2, 0)
    if out_dtype == np.float32:
        return unit.numpy()
    peak = 255.0 if out_dtype == np.uint8 else 65535.0
    return torch.round(unit * peak).numpy().astype(out_dtype)
