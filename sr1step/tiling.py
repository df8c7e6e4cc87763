"""Tiling for images of any size: the tile grid, reflect padding, blend windows and position-keyed noise.

Tiles live in LR space (as in the official samplers). Every tile of an image has the same padded shape, so tiles
batch together. Overlapping tiles are blended with a separable raised-cosine ramp (or a uniform average, the
official scheme). Noise is drawn per fixed block of *latent positions* from a generator keyed by
(seed, kind, block): any tile reads exactly the noise of its positions, so overlaps see identical noise, results do
not depend on the tile size, and no full-image noise field is ever held in memory.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Tile:
    """A tile: its LR region inside the image (y, x, h, w) and neighbours on each side (for blending)."""

    y: int
    x: int
    h: int
    w: int
    top: bool  # another tile overlaps above
    bottom: bool
    left: bool
    right: bool


@dataclass(frozen=True)
class TileGrid:
    tiles: list[Tile]
    rows: list[list[Tile]]  # tiles grouped by row, rows in increasing y
    padded_h: int  # every tile is reflect-padded to this LR shape
    padded_w: int


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def tile_starts(length: int, tile: int, stride: int, align: int = 1) -> list[int]:
    """0, stride, 2·stride, …; a start that would run past the end moves to ``length − tile`` (official rule).

    With ``align`` > 1 every start is rounded up to a multiple of it (the last tile may then overhang the end by
    less than ``align`` px, which reflect padding fills).
    """
    if length <= tile:
        return [0]
    starts: list[int] = []
    for start in range(0, length, stride):
        start = round_up(min(start, length - tile), align)
        if not starts or start != starts[-1]:
            starts.append(start)
        if start + tile >= length:
            break
    return starts


def plan_tiles(height: int, width: int, tile: int, overlap: int, multiple: int, align: int = 1) -> TileGrid:
    """Plan LR tiles. ``tile`` 0 = the whole image as one tile. ``multiple``: what the network needs (LR px);
    ``align``: tile starts are multiples of it. Tile regions are clipped to the image."""
    if tile < 0 or overlap < 0:
        raise ValueError("tile and overlap must be >= 0")
    if tile:
        tile = max(multiple, tile // multiple * multiple)
        if overlap >= tile:
            raise ValueError(f"overlap {overlap} must be smaller than the tile {tile}")
    tile_h = height if not tile or height <= tile else tile
    tile_w = width if not tile or width <= tile else tile
    ys = tile_starts(height, tile_h, max(1, tile_h - overlap), align)
    xs = tile_starts(width, tile_w, max(1, tile_w - overlap), align)
    rows = [
        [
            Tile(
                y,
                x,
                min(tile_h, height - y),
                min(tile_w, width - x),
                top=i > 0,
                bottom=i < len(ys) - 1,
                left=j > 0,
                right=j < len(xs) - 1,
            )
            for j, x in enumerate(xs)
        ]
        for i, y in enumerate(ys)
    ]
    return TileGrid(
        tiles=[t for row in rows for t in row],
        rows=rows,
        padded_h=round_up(tile_h, multiple),
        padded_w=round_up(tile_w, multiple),
    )


def reflect_index(start: int, length: int, size: int, device: torch.device | None = None) -> Tensor:
    """Indices start … start+length−1 mirrored into [0, size) (reflect without repeating the edge).

    Repeats the reflection as often as needed, so images smaller than the pad (e.g. 8×8 → 64×64) work.
    """
    idx = torch.arange(start, start + length, device=device)
    if size == 1:
        return torch.zeros_like(idx)
    period = 2 * (size - 1)
    idx = torch.remainder(idx, period)
    return torch.where(idx >= size, period - idx, idx)


def crop_reflect(image: Tensor, y: int, x: int, h: int, w: int) -> Tensor:
    """image[..., y:y+h, x:x+w], reflect-padded wherever the window leaves the image. image: (..., H, W)."""
    rows = reflect_index(y, h, image.shape[-2], image.device)
    cols = reflect_index(x, w, image.shape[-1], image.device)
    return image.index_select(-2, rows).index_select(-1, cols)


def _ramp(length: int, overlap: int, margin: int, start: bool, end: bool) -> Tensor:
    """1-D weight along one axis of a tile.

    At a side with a neighbour the weight is ~0 over the first ``margin`` samples (the part of the tile its
    receptive field sees across the reflect padding), then rises as a raised cosine until ``overlap − margin``,
    then stays 1. Sides without a neighbour are 1 up to the edge.
    """
    weight = torch.ones(length)
    ramp = overlap - 2 * margin
    if overlap <= 0:
        return weight
    pos = torch.arange(length, dtype=torch.float64) + 0.5 - margin
    rise = 0.5 - 0.5 * torch.cos(math.pi * torch.clamp(pos / max(ramp, 1), min=0.0, max=1.0))
    rise = rise.float().clamp_min(_WEIGHT_FLOOR)
    if start:
        weight = torch.minimum(weight, rise)
    if end:
        weight = torch.minimum(weight, rise.flip(0))
    return weight


# Weight inside a margin: not zero, so every pixel keeps a defined weighted mean even where rounding tile starts to
# the latent grid shrank an overlap by a pixel; small enough that margin pixels do not matter (≤ 1e-6 relative).
_WEIGHT_FLOOR = 1e-6


def blend_window(tile: Tile, scale: int, overlap: int, margin: int = 0, kind: str = "cosine") -> Tensor:
    """(h·scale, w·scale) blending weights of a tile; ``overlap`` and ``margin`` in HR px.

    ``uniform`` is the official box average (every tile pixel weighs 1).
    """
    h, w = tile.h * scale, tile.w * scale
    if kind == "uniform":
        return torch.ones(h, w)
    if kind != "cosine":
        raise ValueError(f"unknown blend {kind!r}")
    if overlap and overlap <= 2 * margin:
        raise ValueError(f"the tile margin {margin} must be less than half the overlap {overlap}")
    rows = _ramp(h, overlap, margin, tile.top, tile.bottom)
    cols = _ramp(w, overlap, margin, tile.left, tile.right)
    return rows[:, None] * cols[None, :]


class BlockNoise:
    """Deterministic Gaussian noise addressed by absolute latent position.

    ``region(kind, channels, y, x, h, w)`` returns the noise at latent rows y…y+h−1 and columns x…x+w−1 (rows and
    columns may be negative or past the image: padding regions get noise too). Each ``block``×``block`` cell is drawn
    from its own generator seeded by a hash of (seed, kind, cell), so any two calls agree on shared positions.
    """

    def __init__(self, seed: int, block: int = 64) -> None:
        self.seed = int(seed)
        self.block = block

    def _cell(self, kind: str, channels: int, by: int, bx: int) -> Tensor:
        key = f"{self.seed}:{kind}:{channels}:{by}:{bx}".encode()
        gen = torch.Generator().manual_seed(
            int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1
        )
        return torch.randn(channels, self.block, self.block, generator=gen)

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
        b = self.block
        by0, by1 = math.floor(y / b), math.floor((y + h - 1) / b)
        bx0, bx1 = math.floor(x / b), math.floor((x + w - 1) / b)
        rows = [
            torch.cat([self._cell(kind, channels, by, bx) for bx in range(bx0, bx1 + 1)], dim=2)
            for by in range(by0, by1 + 1)
        ]
        field = torch.cat(rows, dim=1)
        oy, ox = y - by0 * b, x - bx0 * b
        return field[:, oy : oy + h, ox : ox + w].to(device=device, dtype=dtype)


class FieldNoise:
    """Noise read from given full-image fields (e.g. to reproduce a run with recorded noise).

    ``fields[kind]`` is (C, H, W) in latent coordinates; regions outside it are an error.
    """

    def __init__(self, fields: dict[str, Tensor]) -> None:
        self.fields = fields

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
        if kind not in self.fields:
            raise KeyError(f"no recorded noise field {kind!r} (have: {', '.join(self.fields)})")
        field = self.fields[kind]
        if field.shape[0] != channels or y < 0 or x < 0 or y + h > field.shape[1] or x + w > field.shape[2]:
            raise ValueError(
                f"recorded noise {kind!r} {tuple(field.shape)} does not cover ({channels}, {y}:{y + h}, {x}:{x + w})"
            )
        return field[:, y : y + h, x : x + w].to(device=device, dtype=dtype)
