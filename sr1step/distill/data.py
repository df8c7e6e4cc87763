"""Training and validation data for ``sr1step distill``: image-folder datasets, a resumable DDP sampler, loaders.

* :class:`HRFolderDataset` — clean GT crops for on-the-fly degradation: every image under the roots (recursive;
  ImageNet's ``train/<class>/`` layout works), a random square of the full short side (reflect-padded up to
  ``size`` when smaller), area-resized to ``size``, random horizontal flip (reference ``distillation.md`` §2.10).
  Unreadable files are skipped (another image is drawn) and counted in each sample's ``skipped``.
* :class:`PairedFolderDataset` — LQ/GT pairs matched by file name, with aligned random crops (validation or
  paired training).
* :class:`ResumableDistributedSampler` — ``DistributedSampler`` semantics (seed + epoch shuffle, padding to equal
  shards, rank::world_size striding) plus a position inside the epoch that can be saved and restored.
* :class:`BatchStream` — endless per-rank batches across epochs with an exact resume point; the trainer's feed.

Randomness in the datasets comes from a generator derived from (seed, epoch, index), never from worker seeds, so
samples do not depend on the worker count, worker order or where a run was resumed.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from sr1step.errors import ConfigError, DatasetError, ImageReadError
from sr1step.imageio import read_image
from sr1step.pairing import check_sizes, pair_by_name, upright_size

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
# Images tried for one sample before giving up: unreadable files are rare, a run of this many means a bad folder.
MAX_READ_ATTEMPTS = 10
# Batches each DataLoader worker keeps ready (RSD's DataLoader look-ahead).
PREFETCH_BATCHES = 4

_log = logging.getLogger(__name__)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixed from non-negative integers (NumPy SeedSequence), for per-sample generators."""
    if any(part < 0 for part in parts):
        raise ConfigError(f"seeds and indices must be non-negative, got {parts}")
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def _sample_generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


def _to_tensor(rgb: np.ndarray) -> Tensor:
    """(H, W, 3) float array in [0, 1] → (3, H, W) float32 tensor."""
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32))


def _area_weights(source: int, target: int) -> Tensor:
    """(target, source) matrix of exact pixel-coverage weights: area (box) downscaling, as cv2 INTER_AREA."""
    ratio = source / target
    starts = torch.arange(target, dtype=torch.float64).unsqueeze(1) * ratio
    pixels = torch.arange(source, dtype=torch.float64).unsqueeze(0)
    overlap = (torch.minimum(starts + ratio, pixels + 1) - torch.maximum(starts, pixels)).clamp(min=0)
    return (overlap / ratio).to(torch.float32)


def area_resize(image: Tensor, height: int, width: int) -> Tensor:
    """Area-resize (C, H, W) down to (C, height, width): each output pixel averages the input area it covers."""
    rows = _area_weights(image.shape[-2], height)
    cols = _area_weights(image.shape[-1], width)
    return rows @ image @ cols.T


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def scan_images(root: Path) -> list[str]:
    """Image files under ``root`` (recursive, by extension, case-insensitive) as sorted relative POSIX paths.

    Symlinked folders are followed once (a link cycle is not re-entered). Sorted as strings, the order of
    RSD's ``sorted(glob('**/*.JPEG'))``.
    """
    found: list[str] = []
    visited: set[str] = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in visited:
            dirs.clear()
            continue
        visited.add(real)
        relative = Path(folder).relative_to(root).as_posix()
        prefix = "" if relative == "." else relative + "/"
        found.extend(prefix + name for name in files if _is_image(name))
    return sorted(found)


class HRFolderDataset(Dataset):
    """Clean GT crops from folders of HR images: items are ``{"gt": (3, size, size) in [0, 1], "skipped": int}``.

    For each index and epoch: side = max(short side, size); smaller images are reflect-padded up to side; a
    random side × side square is cut, area-resized to size × size and flipped horizontally with p = 0.5.
    ``skipped`` counts the unreadable files met while producing the item (they are logged and replaced by
    other random images, at most ``MAX_READ_ATTEMPTS`` tries).
    """

    def __init__(
        self, roots: Sequence[str | os.PathLike[str]], size: int = 256, *, seed: int = 0, flip: bool = True
    ) -> None:
        if size < 1:
            raise ConfigError(f"dataset crop size must be positive, got {size}")
        self.roots = [Path(root) for root in roots]
        if not self.roots:
            raise DatasetError("no data folders given")
        missing = [str(root) for root in self.roots if not root.is_dir()]
        if missing:
            raise DatasetError(f"data folder does not exist or is not a folder: {', '.join(missing)}")
        # Paths live in NumPy byte arrays, not a list of Python objects: DataLoader workers read them without
        # touching reference counts, so a forked worker does not copy a 1.28 M-entry list page by page.
        relative: list[bytes] = []
        root_index: list[int] = []
        for number, root in enumerate(self.roots):
            names = scan_images(root)
            relative.extend(os.fsencode(name) for name in names)
            root_index.extend([number] * len(names))
        if not relative:
            extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
            raise DatasetError(f"no images ({extensions}) found in {', '.join(str(r) for r in self.roots)}")
        self._relative = np.array(relative, dtype=np.bytes_)
        self._root_index = np.array(root_index, dtype=np.int32)
        self.size = size
        self.seed = seed
        self.flip = flip
        self.epoch = 0

    def __len__(self) -> int:
        return len(self._relative)

    def path(self, index: int) -> Path:
        return self.roots[int(self._root_index[index])] / os.fsdecode(self._relative[index])

    @property
    def paths(self) -> list[Path]:
        return [self.path(index) for index in range(len(self))]

    def set_epoch(self, epoch: int) -> None:
        """Crops and flips differ per epoch; set before iterating a DataLoader (workers copy the dataset)."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict[str, Any]:
        generator = _sample_generator(self.seed, self.epoch, index)
        candidate = index
        for attempt in range(MAX_READ_ATTEMPTS):
            path = self.path(candidate)
            try:
                rgb = read_image(path).rgb
            except ImageReadError as error:
                _log.warning("skipping unreadable image: %s", error)
                candidate = int(torch.randint(len(self), (1,), generator=generator))
                continue
            return {"gt": self._crop(rgb, generator), "skipped": attempt}
        raise DatasetError(
            f"{MAX_READ_ATTEMPTS} unreadable images in a row while loading item {index} "
            f"(last: {self.path(candidate)}); check the data folders"
        )

    def _crop(self, rgb: np.ndarray, generator: torch.Generator) -> Tensor:
        height, width = rgb.shape[:2]
        side = max(min(height, width), self.size)
        if height < side or width < side:
            # Reflect-101 padding (no edge repeat), repeating the reflection when the pad is wider than the image.
            pad = ((0, max(side - height, 0)), (0, max(side - width, 0)), (0, 0))
            rgb = np.pad(rgb, pad, mode="reflect")
            height, width = rgb.shape[:2]
        top = int(torch.randint(height - side + 1, (1,), generator=generator))
        left = int(torch.randint(width - side + 1, (1,), generator=generator))
        flip = bool(torch.rand(1, generator=generator) < 0.5)
        crop = _to_tensor(rgb[top : top + side, left : left + side])
        if side != self.size:
            crop = area_resize(crop, self.size, self.size).clamp_(0, 1)
        if self.flip and flip:
            crop = crop.flip(-1)
        return crop


class PairedFolderDataset(Dataset):
    """LQ/GT pairs matched by file stem: items are ``{"lq": (3, h, w), "gt": (3, h·scale, w·scale), "name"}``.

    Both folders are scanned non-recursively. Every LQ needs a GT of exactly ``scale`` × its size and vice versa
    (checked up front from the image headers). With ``crop_size`` (GT pixels, a multiple of ``scale``) each item
    is an aligned random crop; with ``flip`` both images flip together. Random choices derive from
    (seed, epoch, index); without crop and flip the items are the whole images.
    """

    def __init__(
        self,
        lq_dir: str | os.PathLike[str],
        gt_dir: str | os.PathLike[str],
        scale: int,
        *,
        crop_size: int | None = None,
        flip: bool = False,
        seed: int = 0,
    ) -> None:
        if scale < 1:
            raise ConfigError(f"paired dataset scale must be positive, got {scale}")
        if crop_size is not None and (crop_size < scale or crop_size % scale):
            raise ConfigError(
                f"paired dataset crop size {crop_size} must be a positive multiple of scale {scale}"
            )
        self.lq_dir, self.gt_dir = Path(lq_dir), Path(gt_dir)
        self.scale, self.crop_size, self.flip, self.seed = scale, crop_size, flip, seed
        self.epoch = 0
        pairs = pair_by_name(self.lq_dir, self.gt_dir, "LQ", "GT")
        size_of = functools.cache(upright_size)  # each header is read once (size check, then crop check)
        check_sizes(pairs, "LQ", "GT", scale=scale, size_of=size_of)
        self.pairs = [(pair.left, pair.right) for pair in pairs]
        if crop_size is not None:
            for _, gt_path in self.pairs:
                gt_w, gt_h = size_of(gt_path)
                if min(gt_w, gt_h) < crop_size:
                    raise DatasetError(
                        f"GT {gt_path} is {gt_w}×{gt_h}, smaller than the crop size {crop_size}"
                    )

    def __len__(self) -> int:
        return len(self.pairs)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict[str, Any]:
        lq_path, gt_path = self.pairs[index]
        # read_image raises ImageReadError naming the file: a paired set must be complete, nothing is skipped.
        lq, gt = _to_tensor(read_image(lq_path).rgb), _to_tensor(read_image(gt_path).rgb)
        generator = _sample_generator(self.seed, self.epoch, index)
        if self.crop_size is not None:
            lq_crop = self.crop_size // self.scale
            top = int(torch.randint(lq.shape[-2] - lq_crop + 1, (1,), generator=generator))
            left = int(torch.randint(lq.shape[-1] - lq_crop + 1, (1,), generator=generator))
            lq = lq[:, top : top + lq_crop, left : left + lq_crop]
            s = self.scale
            gt = gt[:, top * s : (top + lq_crop) * s, left * s : (left + lq_crop) * s]
        if self.flip and bool(torch.rand(1, generator=generator) < 0.5):
            lq, gt = lq.flip(-1), gt.flip(-1)
        return {"lq": lq.contiguous(), "gt": gt.contiguous(), "name": lq_path.stem}


def _default_rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    initialised = dist.is_available() and dist.is_initialized()
    if world_size is None:
        world_size = dist.get_world_size() if initialised else 1
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"invalid rank {rank} for world size {world_size}")
    return rank, world_size


class ResumableDistributedSampler(Sampler[int]):
    """``DistributedSampler`` with a resumable position inside the epoch.

    Same index sequence as ``torch.utils.data.DistributedSampler`` for equal arguments: a permutation seeded with
    seed + epoch (or the identity), padded by wrapping to a multiple of world_size (or trimmed with
    ``drop_last``), then every world_size-th index from ``rank``. ``position`` counts the indices of this rank
    already handed out in the epoch; iteration starts there, and :meth:`state_dict` / :meth:`load_state_dict`
    carry it over a restart. An iteration that runs to the end rewinds the position to 0 (the same epoch would
    repeat, as with ``DistributedSampler``, until :meth:`set_epoch`).
    """

    def __init__(
        self,
        length: int,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        if length < 1:
            raise DatasetError("cannot sample from an empty dataset")
        self.rank, self.world_size = _default_rank_and_world(rank, world_size)
        self.length, self.shuffle, self.seed, self.drop_last = length, shuffle, seed, drop_last
        if drop_last and length % self.world_size:
            self.num_samples = math.ceil((length - self.world_size) / self.world_size)
        else:
            self.num_samples = math.ceil(length / self.world_size)
        if self.num_samples < 1:
            raise DatasetError(
                f"{length} images cannot be sharded over {self.world_size} ranks with drop_last"
            )
        self.total_size = self.num_samples * self.world_size
        self.epoch = 0
        self.position = 0

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning."""
        self.epoch = epoch
        self.position = 0

    def seek(self, position: int) -> None:
        """Continue the current epoch after ``position`` indices of this rank."""
        if not 0 <= position <= self.num_samples:
            raise ConfigError(
                f"sampler position {position} is outside the epoch of {self.num_samples} samples"
            )
        self.position = position

    def epoch_indices(self) -> list[int]:
        """This rank's full index list for the current epoch."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            indices = torch.randperm(self.length, generator=generator).tolist()
        else:
            indices = list(range(self.length))
        if self.drop_last:
            indices = indices[: self.total_size]
        else:
            padding = self.total_size - len(indices)
            indices += (indices * math.ceil(padding / len(indices)))[:padding]
        return indices[self.rank : self.total_size : self.world_size]

    def __iter__(self) -> Iterator[int]:
        indices = self.epoch_indices()
        start = self.position if self.position < self.num_samples else 0
        for offset, index in enumerate(indices[start:], start=start + 1):
            self.position = offset
            yield index
        self.position = 0

    def __len__(self) -> int:
        """Indices left in this epoch (what the next iteration yields)."""
        return self.num_samples - self.position if self.position < self.num_samples else self.num_samples

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "length": self.length,
            "world_size": self.world_size,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "length", "world_size", "shuffle", "drop_last"):
            if state[key] != getattr(self, key):
                raise ConfigError(
                    f"cannot resume the data sampler: the saved {key} is {state[key]!r}, this run has "
                    f"{getattr(self, key)!r}"
                )
        self.epoch = int(state["epoch"])
        self.seek(int(state["position"]))


def make_dataloader(
    dataset: Dataset,
    batch_size: int,
    sampler: Sampler[int],
    *,
    num_workers: int = 0,
    pin_memory: bool | None = None,
    drop_last: bool = True,
    seed: int = 0,
) -> DataLoader:
    """A DataLoader over ``sampler`` with workers and pinned memory (default: when CUDA is available).

    Its own seeded generator keeps the DataLoader from drawing from (and so shifting) the global torch RNG.
    Workers are not persistent, so a dataset epoch set before iterating reaches them.
    """
    if batch_size < 1 or num_workers < 0:
        raise ConfigError(f"invalid batch size {batch_size} or worker count {num_workers}")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        drop_last=drop_last,
        prefetch_factor=PREFETCH_BATCHES if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
    )


class BatchStream:
    """Endless per-rank batches over epochs, resumable exactly: ``batch = next(stream)``.

    Each epoch is one pass of a :class:`ResumableDistributedSampler` (a trailing partial batch is dropped); the
    dataset's ``set_epoch`` is called at every epoch start. :meth:`state_dict` records the epoch and the samples
    *consumed* (not the ones prefetched by workers), plus the running count of unreadable images skipped.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        shuffle: bool = True,
    ) -> None:
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.sampler = ResumableDistributedSampler(
            len(dataset), rank=rank, world_size=world_size, shuffle=shuffle, seed=seed
        )
        if self.sampler.num_samples < batch_size:
            raise DatasetError(
                f"{len(dataset)} images give {self.sampler.num_samples} per rank, fewer than the per-rank "
                f"batch {batch_size}"
            )
        self.epoch = 0
        self.position = 0
        self.skipped = 0
        self._iterator: Iterator[Any] | None = None

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> Any:
        if self._iterator is None:
            self._start_iterator()
        assert self._iterator is not None
        try:
            batch = next(self._iterator)
        except StopIteration:
            self.epoch, self.position = self.epoch + 1, 0
            self._start_iterator()
            batch = next(self._iterator)
        self.position += self.batch_size
        if isinstance(batch, dict) and "skipped" in batch:
            self.skipped += int(torch.as_tensor(batch["skipped"]).sum())
        return batch

    def _start_iterator(self) -> None:
        if self.sampler.num_samples - self.position < self.batch_size:
            self.epoch, self.position = self.epoch + 1, 0
        self.sampler.set_epoch(self.epoch)
        self.sampler.seek(self.position)
        set_epoch = getattr(self.dataset, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(self.epoch)
        loader = make_dataloader(
            self.dataset,
            self.batch_size,
            self.sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            seed=derive_seed(self.seed, self.epoch),
        )
        self._iterator = iter(loader)

    def close(self) -> None:
        """Stop the worker processes of the current epoch (they also stop when the stream is garbage-collected)."""
        self._iterator = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "skipped": self.skipped,
            "sampler": self.sampler.state_dict() | {"epoch": self.epoch, "position": self.position},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.epoch, self.position, self.skipped = (
            int(state["epoch"]),
            int(state["position"]),
            int(state["skipped"]),
        )
        self._iterator = None
