"""ResShift's ``UNetModelSwin``: the denoiser of ResShift and of its one-step students (SinSR, RSD, TAD-SR).

Own implementation with the official state-dict key names, so official checkpoints load unchanged. The
constructor takes the official YAML argument names; students add a noise input (``noise_channels``) either
concatenated as the last input planes (RSD / sorryhyun "concat") or through an extra conv added after the first
conv (sorryhyun "add", key ``noise_proj``).

Tensor contract: ``forward(x, t, lq=None, noise=None)`` with ``x`` the scaled latent (B, C, h, w), ``t`` integer
step indices (B,), ``lq`` the LR image in [-1, 1] at latent resolution (or ``lq_size / image_size`` times it when
the model has a ``feature_extractor``), ``noise`` (B, noise_channels, h, w). ``h`` and ``w`` must be multiples of
``window_size * 2 ** (len(channel_mult) - 1)`` (64 for the released models). Returns the predicted x0 latent.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sr1step.errors import ConfigError

# --------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class ResShiftUNetConfig:
    """Constructor arguments of ``UNetModelSwin``, named as in the official YAML configs.

    ``use_fp16`` is kept for 1:1 config mapping only: precision is chosen at run time by the pipeline
    (autocast / dtype), not by converting weights at construction.
    """

    image_size: int = 64
    in_channels: int = 3
    model_channels: int = 160
    out_channels: int = 3
    attention_resolutions: tuple[int, ...] = (64, 32, 16, 8)
    dropout: float = 0.0
    channel_mult: tuple[int, ...] = (1, 2, 2, 4)
    num_res_blocks: tuple[int, ...] = (2, 2, 2, 2)
    conv_resample: bool = True
    dims: int = 2
    use_fp16: bool = False
    num_head_channels: int = 32
    use_scale_shift_norm: bool = True
    resblock_updown: bool = False
    swin_depth: int = 2
    swin_embed_dim: int = 192
    window_size: int = 8
    mlp_ratio: float = 4
    cond_lq: bool = True
    lq_size: int = 64
    # Student extras (not in the official configs): a stochastic noise input.
    noise_channels: int = 0
    noise_mode: str = "concat"  # "concat" (RSD layout, planes appended last) | "add" (sorryhyun noise_proj)

    def __post_init__(self) -> None:
        for name in ("attention_resolutions", "channel_mult"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        blocks = self.num_res_blocks
        if isinstance(blocks, int):
            blocks = [blocks] * len(self.channel_mult)
        object.__setattr__(self, "num_res_blocks", tuple(int(v) for v in blocks))
        self.validate()

    def validate(self) -> None:
        if self.dims != 2:
            raise ConfigError(f"ResShiftUNet supports dims=2 only, got dims={self.dims}")
        if self.resblock_updown:
            raise ConfigError(
                "ResShiftUNet: resblock_updown=True is not supported (no ResShift model uses it)"
            )
        if len(self.num_res_blocks) != len(self.channel_mult):
            raise ConfigError(
                f"num_res_blocks {list(self.num_res_blocks)} and channel_mult {list(self.channel_mult)} "
                "must have the same length"
            )
        if self.swin_embed_dim % self.num_head_channels:
            raise ConfigError(
                f"swin_embed_dim {self.swin_embed_dim} is not a multiple of num_head_channels {self.num_head_channels}"
            )
        if self.noise_mode not in ("concat", "add"):
            raise ConfigError(f"noise_mode must be 'concat' or 'add', got {self.noise_mode!r}")
        if self.noise_channels < 0:
            raise ConfigError(f"noise_channels must be >= 0, got {self.noise_channels}")
        if self.cond_lq and (self.lq_size < self.image_size or self.lq_size % self.image_size):
            raise ConfigError(
                f"lq_size {self.lq_size} must be image_size {self.image_size} times a power of 2"
            )
        ratio = self.lq_size // self.image_size
        if self.cond_lq and ratio & (ratio - 1):
            raise ConfigError(
                f"lq_size {self.lq_size} must be image_size {self.image_size} times a power of 2"
            )

    @classmethod
    def from_dict(cls, values: dict) -> ResShiftUNetConfig:
        """Build from an official YAML ``model.params`` dict (or our own metadata); unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown ResShiftUNet config keys: {', '.join(unknown)}")
        return cls(**{k: v for k, v in values.items() if k in known})

    def to_dict(self) -> dict:
        data = asdict(self)
        for name in ("attention_resolutions", "channel_mult", "num_res_blocks"):
            data[name] = list(data[name])
        return data

    @property
    def lq_stages(self) -> int:
        """Number of stride-2 stages of the LR feature extractor (0: the LR is concatenated as is)."""
        return int(math.log2(self.lq_size // self.image_size)) if self.cond_lq else 0

    @property
    def size_multiple(self) -> int:
        """Latent height/width must be a multiple of this (8x8 windows at the coarsest level)."""
        return self.window_size * 2 ** (len(self.channel_mult) - 1)


# --------------------------------------------------------------------------------------------- helpers


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32 groups, eps 1e-5) evaluated in float32 and cast back, as in the official code."""

    def __init__(self, channels: int) -> None:
        super().__init__(32, channels, eps=1e-5)

    def forward(self, x: Tensor) -> Tensor:
        return F.group_norm(x.float(), self.num_groups, self.weight, self.bias, self.eps).type(x.dtype)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of integer step indices, ``[cos, sin]`` order (official ordering)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


@functools.lru_cache(maxsize=64)
def _shift_mask(height: int, width: int, window: int, shift: int) -> Tensor:
    """The official (quirky) shifted-window mask, (num_windows, window², window²), values 0 / -100.

    The official builder indexes its label image on the wrong axes and flattens windows transposed; the net
    effect is that only the bottom row of windows is masked, split by in-window *column*: the token at in-window
    (row a, col b) of window (hb, wb) gets label r(hb·window + b), with r(p) = 0 / 1 / 2 for p below
    H - window / below H - shift / above. Reproduced exactly so outputs match the released models.
    """
    # Explicit CPU so a model built under a meta/cuda device context cannot poison this cache.
    p = (
        torch.arange(height // window, device="cpu")[:, None] * window
        + torch.arange(window, device="cpu")[None, :]
    )
    labels = (p >= height - window).long() + (p >= height - shift).long()
    # token (a, b) in window (hb, wb): label depends on (hb, b) only, repeated over a and wb
    token_labels = labels[:, None, None, :].expand(-1, width // window, window, -1)  # (nh, nw, a, b)
    token_labels = token_labels.reshape(-1, window * window)
    mask = token_labels[:, :, None] != token_labels[:, None, :]
    return torch.zeros(mask.shape, device="cpu").masked_fill(mask, -100.0)


def _relative_position_index(window: int) -> Tensor:
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


# --------------------------------------------------------------------------------------------- blocks


class TimestepBlock(nn.Module):
    """A module whose forward also takes the timestep embedding."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that hands the timestep embedding to the children that take it."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Downsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None) -> None:
        super().__init__()
        out_channels = out_channels or channels
        if use_conv:
            self.op = nn.Conv2d(channels, out_channels, 3, stride=2, padding=1)
        else:
            if out_channels != channels:
                raise ConfigError("Downsample without conv cannot change the channel count")
            self.op = nn.AvgPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool) -> None:
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class ResBlock(TimestepBlock):
    """GN-SiLU-conv, FiLM from the timestep embedding (scale first), GN-SiLU-dropout-conv, plus skip."""

    def __init__(
        self, channels: int, emb_channels: int, dropout: float, out_channels: int, use_scale_shift_norm: bool
    ) -> None:
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            norm, rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = emb_out.chunk(2, dim=1)
            h = rest(norm(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class WindowAttention(nn.Module):
    """Multi-head self-attention inside 8x8 windows with a learned relative-position bias."""

    def __init__(self, dim: int, window: int, num_heads: int) -> None:
        super().__init__()
        self.window = window
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", _relative_position_index(window))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, tokens: Tensor, mask: Tensor | None) -> Tensor:
        """tokens (B·nW, N, C); mask (nW, N, N) or None."""
        bw, n, c = tokens.shape
        qkv = self.qkv(tokens).reshape(bw, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
        logits = q @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        logits = logits + bias.view(n, n, -1).permute(2, 0, 1).to(logits.dtype)[None]
        if mask is not None:
            nw = mask.shape[0]
            logits = logits.view(bw // nw, nw, self.num_heads, n, n) + mask.to(logits.dtype)[None, :, None]
            logits = logits.view(-1, self.num_heads, n, n)
        attn = logits.float().softmax(dim=-1).type(v.dtype)
        out = (attn @ v).transpose(1, 2).reshape(bw, n, c)
        return self.proj(out)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwinTransformerBlock(nn.Module):
    """Swin block on (B, C, H, W) maps with GroupNorm (not LayerNorm) as in ResShift."""

    def __init__(
        self, dim: int, num_heads: int, window: int, shift: int, mlp_ratio: float, construction_size: int
    ) -> None:
        super().__init__()
        self.window = window
        self.shift = shift
        if shift:
            # Stored by the official checkpoints but never read at run time (see _shift_mask); kept as a buffer so
            # state dicts match the official layout entry by entry.
            mask = _shift_mask(construction_size, construction_size, window, shift).clone()
            self.register_buffer("attn_mask", mask)
        self.norm1 = GroupNorm32(dim)
        self.attn = WindowAttention(dim, window, num_heads)
        self.norm2 = GroupNorm32(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        ws = self.window
        if h % ws or w % ws:
            raise ValueError(f"feature map {h}x{w} is not a multiple of the {ws}x{ws} Swin window")
        shortcut = x
        x = self.norm1(x)
        if self.shift:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(2, 3))
        windows = x.permute(0, 2, 3, 1).reshape(b, h // ws, ws, w // ws, ws, c)
        windows = windows.permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)
        mask = _shift_mask(h, w, ws, self.shift).to(x.device) if self.shift else None
        windows = self.attn(windows, mask)
        x = windows.view(b, h // ws, w // ws, ws, ws, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)
        if self.shift:
            x = torch.roll(x, shifts=(self.shift, self.shift), dims=(2, 3))
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class _Proj(nn.Module):
    """1x1 conv wrapper so keys read ``patch_embed.proj.*`` / ``patch_unembed.proj.*`` as in the official code."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(cin, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class SwinLayer(nn.Module):
    """``BasicLayer``: 1x1 in, ``depth`` Swin blocks (alternating shift), 1x1 out. Replaces h (no residual)."""

    def __init__(self, channels: int, cfg: ResShiftUNetConfig, construction_size: int) -> None:
        super().__init__()
        dim = cfg.swin_embed_dim
        heads = dim // cfg.num_head_channels
        window = cfg.window_size
        # The official layer shrinks the window and disables shifting when the map is no larger than a window.
        if construction_size <= window:
            window, can_shift = construction_size, False
        else:
            can_shift = True
        self.patch_embed = _Proj(channels, dim)
        self.patch_unembed = _Proj(dim, channels)  # registered before the blocks: official key order
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(
                dim,
                heads,
                window,
                shift=window // 2 if (can_shift and i % 2) else 0,
                mlp_ratio=cfg.mlp_ratio,
                construction_size=construction_size,
            )
            for i in range(cfg.swin_depth)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        for block in self.blocks:
            x = block(x)
        return self.patch_unembed(x)


def _lq_feature_extractor(stages: int) -> nn.Module:
    """Maps the LR image at 2**stages times the latent size to latent size: [conv, SiLU, stride-2 conv] each."""
    if stages == 0:
        return nn.Identity()
    layers: list[nn.Module] = []
    cin = 3
    for k in range(stages):
        layers += [nn.Conv2d(cin, 16 * 2**k, 3, padding=1), nn.SiLU(), Downsample(16 * 2**k, True, 32 * 2**k)]
        cin = 32 * 2**k
    return nn.Sequential(*layers)


def lq_channels(cfg: ResShiftUNetConfig) -> int:
    """Number of input planes the LR conditioning adds to the first conv."""
    if not cfg.cond_lq:
        return 0
    return 3 if cfg.lq_stages == 0 else 32 * 2 ** (cfg.lq_stages - 1)


# --------------------------------------------------------------------------------------------- model


class ResShiftUNet(nn.Module):
    """``UNetModelSwin`` with official key names; see the module docstring for the tensor contract."""

    def __init__(
        self,
        image_size: int = 64,
        in_channels: int = 3,
        model_channels: int = 160,
        out_channels: int = 3,
        attention_resolutions: Sequence[int] = (64, 32, 16, 8),
        dropout: float = 0.0,
        channel_mult: Sequence[int] = (1, 2, 2, 4),
        num_res_blocks: int | Sequence[int] = (2, 2, 2, 2),
        conv_resample: bool = True,
        dims: int = 2,
        use_fp16: bool = False,
        num_head_channels: int = 32,
        use_scale_shift_norm: bool = True,
        resblock_updown: bool = False,
        swin_depth: int = 2,
        swin_embed_dim: int = 192,
        window_size: int = 8,
        mlp_ratio: float = 4,
        cond_lq: bool = True,
        lq_size: int = 64,
        noise_channels: int = 0,
        noise_mode: str = "concat",
    ) -> None:
        super().__init__()
        cfg = ResShiftUNetConfig(
            image_size=image_size,
            in_channels=in_channels,
            model_channels=model_channels,
            out_channels=out_channels,
            attention_resolutions=tuple(attention_resolutions),
            dropout=dropout,
            channel_mult=tuple(channel_mult),
            num_res_blocks=num_res_blocks if isinstance(num_res_blocks, int) else tuple(num_res_blocks),
            conv_resample=conv_resample,
            dims=dims,
            use_fp16=use_fp16,
            num_head_channels=num_head_channels,
            use_scale_shift_norm=use_scale_shift_norm,
            resblock_updown=resblock_updown,
            swin_depth=swin_depth,
            swin_embed_dim=swin_embed_dim,
            window_size=window_size,
            mlp_ratio=mlp_ratio,
            cond_lq=cond_lq,
            lq_size=lq_size,
            noise_channels=noise_channels,
            noise_mode=noise_mode,
        )
        self.config = cfg
        mc = cfg.model_channels
        emb_dim = 4 * mc
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.feature_extractor = _lq_feature_extractor(cfg.lq_stages)

        first_in = cfg.in_channels + lq_channels(cfg)
        if cfg.noise_mode == "concat":
            first_in += cfg.noise_channels
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(first_in, mc, 3, padding=1))])
        if cfg.noise_channels and cfg.noise_mode == "add":
            self.noise_proj = nn.Conv2d(cfg.noise_channels, mc, 3, padding=1)

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, emb_dim, cfg.dropout, cout, cfg.use_scale_shift_norm)

        skip_widths = [mc]
        ch = mc
        ds = cfg.image_size
        for level, mult in enumerate(cfg.channel_mult):
            for j in range(cfg.num_res_blocks[level]):
                layers: list[nn.Module] = [res(ch, mult * mc)]
                ch = mult * mc
                if ds in cfg.attention_resolutions and j == 0:
                    layers.append(SwinLayer(ch, cfg, ds))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_widths.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch, cfg.conv_resample)))
                skip_widths.append(ch)
                ds //= 2

        self.middle_block = TimestepEmbedSequential(res(ch, ch), SwinLayer(ch, cfg, ds), res(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks[level] + 1):
                layers = [res(ch + skip_widths.pop(), mc * mult)]
                ch = mc * mult
                if ds in cfg.attention_resolutions and i == 0:
                    layers.append(SwinLayer(ch, cfg, ds))
                if level and i == cfg.num_res_blocks[level]:
                    layers.append(Upsample(ch, cfg.conv_resample))
                    ds *= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1))

    @classmethod
    def from_config(cls, cfg: ResShiftUNetConfig | dict) -> ResShiftUNet:
        if isinstance(cfg, dict):
            cfg = ResShiftUNetConfig.from_dict(cfg)
        return cls(**cfg.to_dict())

    def _embed_inputs(
        self, x: Tensor, t: Tensor, lq: Tensor | None, noise: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """Check sizes, embed the timestep and assemble the first conv's input planes."""
        cfg = self.config
        multiple = cfg.size_multiple
        if x.shape[-2] % multiple or x.shape[-1] % multiple:
            raise ValueError(
                f"latent size {tuple(x.shape[-2:])} must be a multiple of {multiple}; pad the input"
            )
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, cfg.model_channels).to(self.time_embed[0].weight.dtype))
        inputs = [x]
        if cfg.cond_lq:
            if lq is None:
                raise ValueError("this model is conditioned on the LR image: pass lq")
            lq = self.feature_extractor(lq.to(x.dtype))
            if lq.shape[-2:] != x.shape[-2:]:
                raise ValueError(
                    f"lq maps to {tuple(lq.shape[-2:])} but the latent is {tuple(x.shape[-2:])}; "
                    f"lq must be {2**cfg.lq_stages}x the latent size"
                )
            inputs.append(lq)
        if cfg.noise_channels:
            if noise is None:
                raise ValueError(f"this student takes a {cfg.noise_channels}-channel noise input: pass noise")
            if cfg.noise_mode == "concat":
                inputs.append(noise.to(x.dtype))
        return (torch.cat(inputs, dim=1) if len(inputs) > 1 else x), emb

    def _encode(
        self, h: Tensor, emb: Tensor, noise: Tensor | None, taps: dict[str, Tensor] | None
    ) -> list[Tensor]:
        cfg = self.config
        skips = []
        for index, block in enumerate(self.input_blocks):
            h = block(h, emb)
            if index == 0 and cfg.noise_channels and cfg.noise_mode == "add":
                h = h + self.noise_proj(noise.to(h.dtype))
            skips.append(h)
            if taps is not None:
                taps[f"input_blocks.{index}"] = h
        return skips

    def forward(self, x: Tensor, t: Tensor, lq: Tensor | None = None, noise: Tensor | None = None) -> Tensor:
        h, emb = self._embed_inputs(x, t, lq, noise)
        skips = self._encode(h, emb, noise, None)
        h = self.middle_block(skips[-1], emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)

    def encoder_features(
        self, x: Tensor, t: Tensor, lq: Tensor | None = None, noise: Tensor | None = None
    ) -> dict[str, Tensor]:
        """The encoder path only: every input block's output (``input_blocks.i``) and ``middle_block``.

        Used by discriminators built on a (frozen) denoiser: RSD's head on the bottleneck, TAD-SR's taps.
        """
        h, emb = self._embed_inputs(x, t, lq, noise)
        taps: dict[str, Tensor] = {}
        skips = self._encode(h, emb, noise, taps)
        taps["middle_block"] = self.middle_block(skips[-1], emb)
        return taps
