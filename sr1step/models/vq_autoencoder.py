"""The VQ-f4 autoencoder of ResShift (``VQModelTorch``): encoder, codebook, decoder.

Own implementation with the official key names (``encoder.*``, ``decoder.*``, ``quantize.embedding.weight``,
``quant_conv``, ``post_quant_conv``). ``encode`` returns the pre-quantization latent (the ``quant_conv`` output),
``decode(z, quantize=True)`` snaps each latent vector to its nearest codeword first, as ResShift/SinSR/RSD do.

The mid-block attention is single-head over all latent positions (head dim 512 for VQ-f4). It is computed
exactly, query chunk by query chunk, so a large tile never materialises the full N×N score matrix.

Images are (B, 3, H, W) in [-1, 1]; the latent is (B, embed_dim, H/f, W/f) with f = 2**(len(ch_mult) - 1).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sr1step.errors import ConfigError

# Query rows per attention chunk: bounds the score block to chunk × N floats (N = latent positions).
ATTENTION_QUERY_CHUNK = 2048
# Latent vectors per codebook-distance chunk: bounds the distance block to chunk × n_embed floats.
QUANTIZE_CHUNK = 16384


@dataclass(frozen=True)
class DDConfig:
    """Encoder/decoder hyper-parameters (``ddconfig`` in the official YAML)."""

    double_z: bool = False
    z_channels: int = 3
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    dropout: float = 0.0
    padding_mode: str = "zeros"

    def __post_init__(self) -> None:
        object.__setattr__(self, "ch_mult", tuple(int(v) for v in self.ch_mult))
        object.__setattr__(self, "attn_resolutions", tuple(int(v) for v in self.attn_resolutions))


@dataclass(frozen=True)
class VQAutoencoderConfig:
    embed_dim: int = 3
    n_embed: int = 8192
    ddconfig: DDConfig = field(default_factory=DDConfig)

    @classmethod
    def from_dict(cls, values: dict) -> VQAutoencoderConfig:
        unknown = sorted(set(values) - {"embed_dim", "n_embed", "ddconfig"})
        if unknown:
            raise ConfigError(f"unknown VQ autoencoder config keys: {', '.join(unknown)}")
        dd = dict(values.get("ddconfig", {}))
        dd_known = {f.name for f in fields(DDConfig)}
        bad = sorted(set(dd) - dd_known)
        if bad:
            raise ConfigError(f"unknown VQ ddconfig keys: {', '.join(bad)}")
        return cls(
            embed_dim=values.get("embed_dim", 3), n_embed=values.get("n_embed", 8192), ddconfig=DDConfig(**dd)
        )

    def to_dict(self) -> dict:
        data = asdict(self)
        data["ddconfig"]["ch_mult"] = list(self.ddconfig.ch_mult)
        data["ddconfig"]["attn_resolutions"] = list(self.ddconfig.attn_resolutions)
        return data

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ddconfig.ch_mult) - 1)


# --------------------------------------------------------------------------------------------- blocks


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        shortcut = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return shortcut + h


def chunked_attention(q: Tensor, k: Tensor, v: Tensor, chunk: int | None = None) -> Tensor:
    """Exact softmax(q kᵀ / sqrt(d)) v for (B, N, d) inputs, processing ``chunk`` queries at a time."""
    chunk = chunk or ATTENTION_QUERY_CHUNK
    if q.shape[1] <= chunk:
        return F.scaled_dot_product_attention(q, k, v)
    return torch.cat(
        [F.scaled_dot_product_attention(q[:, i : i + chunk], k, v) for i in range(0, q.shape[1], chunk)],
        dim=1,
    )


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions, with a residual (mid blocks)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)
        q, k, v = (conv(hn).reshape(b, c, h * w).transpose(1, 2) for conv in (self.q, self.k, self.v))
        out = chunked_attention(q, k, v).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Zero-pad right/bottom by one, then a stride-2 3x3 conv without padding (official asymmetric padding)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class _Level(nn.Module):
    """One resolution level; attribute names give the official ``down.i.block.j`` / ``up.i.upsample`` keys."""

    def __init__(self, blocks: list[nn.Module], attn: list[nn.Module]) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attn)


class _Mid(nn.Module):
    def __init__(self, channels: int, dropout: float) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


def _run_level(level: _Level, h: Tensor) -> Tensor:
    for i, block in enumerate(level.block):
        h = block(h)
        if len(level.attn):
            h = level.attn[i](h)
    return h


class Encoder(nn.Module):
    def __init__(self, dd: DDConfig) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(dd.in_channels, dd.ch, 3, padding=1)
        resolution = dd.resolution
        in_mult = (1, *dd.ch_mult)
        self.down = nn.ModuleList()
        block_out = dd.ch
        for i, mult in enumerate(dd.ch_mult):
            block_in, block_out = dd.ch * in_mult[i], dd.ch * mult
            blocks, attn = [], []
            for _ in range(dd.num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, dd.dropout))
                block_in = block_out
                if resolution in dd.attn_resolutions:
                    attn.append(AttnBlock(block_in))
            level = _Level(blocks, attn)
            if i != len(dd.ch_mult) - 1:
                level.downsample = Downsample(block_in)
                resolution //= 2
            self.down.append(level)
        self.mid = _Mid(block_out, dd.dropout)
        self.norm_out = _norm(block_out)
        self.conv_out = nn.Conv2d(
            block_out, 2 * dd.z_channels if dd.double_z else dd.z_channels, 3, padding=1
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = _run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, dd: DDConfig) -> None:
        super().__init__()
        block_in = dd.ch * dd.ch_mult[-1]
        resolution = dd.resolution // 2 ** (len(dd.ch_mult) - 1)
        self.conv_in = nn.Conv2d(dd.z_channels, block_in, 3, padding=1)
        self.mid = _Mid(block_in, dd.dropout)
        levels: list[_Level] = []
        for i in reversed(range(len(dd.ch_mult))):
            block_out = dd.ch * dd.ch_mult[i]
            blocks, attn = [], []
            for _ in range(dd.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, dd.dropout))
                block_in = block_out
                if resolution in dd.attn_resolutions:
                    attn.append(AttnBlock(block_in))
            level = _Level(blocks, attn)
            if i != 0:
                level.upsample = Upsample(block_in)
                resolution *= 2
            levels.insert(0, level)  # stored in index order (up.0 is the finest level), run coarse to fine
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, dd.out_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = _run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest-codeword lookup (``VectorQuantizer2``, no remap); the codebook is ``embedding.weight``."""

    def __init__(self, n_embed: int, embed_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)

    def indices(self, z: Tensor) -> Tensor:
        """Codeword index per latent position; z (B, C, H, W) → (B, H, W)."""
        b, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c)
        book = self.embedding.weight.to(flat.dtype)
        book_sq = (book**2).sum(dim=1)
        out = []
        for start in range(0, flat.shape[0], QUANTIZE_CHUNK):
            part = flat[start : start + QUANTIZE_CHUNK]
            # Same expression as the official code (|z|² + |e|² − 2 z·e) so ties/rounding resolve identically.
            dist = (part**2).sum(dim=1, keepdim=True) + book_sq - 2 * part @ book.t()
            out.append(dist.argmin(dim=1))
        return torch.cat(out).view(b, h, w)

    def forward(self, z: Tensor) -> Tensor:
        idx = self.indices(z)
        return self.embedding.weight[idx].permute(0, 3, 1, 2).to(z.dtype)


# --------------------------------------------------------------------------------------------- model


class VQAutoencoder(nn.Module):
    """``VQModelTorch`` with official key names. ``encode`` → pre-quantization latent; ``decode`` quantizes."""

    def __init__(
        self, embed_dim: int = 3, n_embed: int = 8192, ddconfig: dict | DDConfig | None = None
    ) -> None:
        super().__init__()
        dd = ddconfig if isinstance(ddconfig, DDConfig) else DDConfig(**(ddconfig or {}))
        self.config = VQAutoencoderConfig(embed_dim=embed_dim, n_embed=n_embed, ddconfig=dd)
        self.encoder = Encoder(dd)
        self.decoder = Decoder(dd)
        self.quantize = VectorQuantizer(n_embed, embed_dim)
        self.quant_conv = nn.Conv2d(dd.z_channels, embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, dd.z_channels, 1)

    @classmethod
    def from_config(cls, cfg: VQAutoencoderConfig | dict) -> VQAutoencoder:
        if isinstance(cfg, dict):
            cfg = VQAutoencoderConfig.from_dict(cfg)
        return cls(cfg.embed_dim, cfg.n_embed, cfg.ddconfig)

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    def encode(self, x: Tensor) -> Tensor:
        return self.quant_conv(self.encoder(x))

    def decode(self, z: Tensor, quantize: bool = True) -> Tensor:
        if quantize:
            z = self.quantize(z)
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: Tensor, quantize: bool = True) -> Tensor:
        return self.decode(self.encode(x), quantize=quantize)
