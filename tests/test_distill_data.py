"""Tests for the distillation datasets, the resumable DDP sampler and the batch stream."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DistributedSampler

from sr1step.distill.data import (
    MAX_READ_ATTEMPTS,
    BatchStream,
    HRFolderDataset,
    PairedFolderDataset,
    ResumableDistributedSampler,
    area_resize,
    make_dataloader,
)
from sr1step.errors import ConfigError, DatasetError, ImageReadError


def _save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _random_image(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255


@pytest.fixture
def imagenet_like(tmp_path: Path) -> Path:
    """train/<class>/*.JPEG plus a PNG, of assorted sizes (PNG content is exact, JPEG is lossy)."""
    root = tmp_path / "train"
    for index in range(6):
        _save(root / f"n0{index % 2}" / f"img_{index}.JPEG", _random_image(40 + index, 32 + 3 * index, index))
    _save(root / "n01" / "extra.png", _random_image(24, 48, 99))
    (root / "n01" / "labels.txt").write_text("not an image")
    return root


# ------------------------------------------------------------------------------------------------- HR


def test_hr_dataset_scans_recursively_and_returns_crops(imagenet_like: Path):
    dataset = HRFolderDataset([imagenet_like], size=16)
    assert len(dataset) == 7
    assert [p.suffix for p in dataset.paths].count(".JPEG") == 6
    assert dataset.paths == sorted(dataset.paths)
    item = dataset[3]
    assert item["gt"].shape == (3, 16, 16) and item["gt"].dtype == torch.float32 and item["skipped"] == 0
    assert item["gt"].min() >= 0 and item["gt"].max() <= 1


def test_hr_dataset_takes_several_roots_and_survives_a_symlink_cycle(imagenet_like: Path, tmp_path: Path):
    other = tmp_path / "ffhq"
    _save(other / "00000.png", _random_image(20, 20, 7))
    (imagenet_like / "n00" / "loop").symlink_to(imagenet_like, target_is_directory=True)
    dataset = HRFolderDataset([imagenet_like, other], size=16)
    names = [p.name for p in dataset.paths]
    assert len(names) == 8 and names[-1] == "00000.png"
    assert dataset.path(7) == other / "00000.png"


def test_hr_dataset_crops_the_full_short_side_and_area_resizes(tmp_path: Path):
    image = _random_image(24, 40, seed=3)
    _save(tmp_path / "wide.png", image)
    dataset = HRFolderDataset([tmp_path], size=12, seed=0)
    full = _as_tensor(image)
    for epoch in range(4):
        dataset.set_epoch(epoch)
        crop = dataset[0]["gt"]
        # The output is one of the 17 possible 24×24 squares (full height), area-resized ×0.5, maybe flipped.
        candidates = [F.avg_pool2d(full[None, :, :, left : left + 24], 2)[0] for left in range(17)]
        candidates += [c.flip(-1) for c in candidates]
        assert min(float((crop - c).abs().max()) for c in candidates) < 1e-5


def test_hr_dataset_reflect_pads_images_smaller_than_the_crop(tmp_path: Path):
    image = _random_image(10, 12, seed=4)
    _save(tmp_path / "small.png", image)
    crop = HRFolderDataset([tmp_path], size=16, flip=False)[0]["gt"]
    expected = np.pad(image, ((0, 6), (0, 4), (0, 0)), mode="reflect")
    torch.testing.assert_close(crop, _as_tensor(expected))


def test_hr_dataset_flips_about_half_the_time(tmp_path: Path):
    image = _random_image(16, 16, seed=5)  # square at the crop size: only the flip is random
    _save(tmp_path / "square.png", image)
    dataset = HRFolderDataset([tmp_path], size=16, seed=0)
    flips = []
    for epoch in range(40):
        dataset.set_epoch(epoch)
        crop = dataset[0]["gt"]
        flips.append(torch.equal(crop, _as_tensor(image).flip(-1)))
        assert flips[-1] or torch.equal(crop, _as_tensor(image))
    assert 10 <= sum(flips) <= 30
    no_flip = HRFolderDataset([tmp_path], size=16, flip=False)
    assert all(torch.equal(no_flip[0]["gt"], _as_tensor(image)) for _ in range(3))


def test_hr_dataset_is_deterministic_per_seed_epoch_and_index(imagenet_like: Path):
    first = HRFolderDataset([imagenet_like], size=16, seed=7)
    second = HRFolderDataset([imagenet_like], size=16, seed=7)
    assert all(torch.equal(first[i]["gt"], second[i]["gt"]) for i in range(len(first)))
    changed = 0
    for index in range(len(first)):
        before = first[index]["gt"]
        first.set_epoch(1)
        changed += not torch.equal(before, first[index]["gt"])
        first.set_epoch(0)
    assert changed >= 4  # new crops/flips in a new epoch


def test_hr_dataset_reads_16_bit_grayscale(tmp_path: Path):
    levels = np.linspace(0, 65535, 16 * 16).reshape(16, 16).astype(np.uint16)
    Image.fromarray(levels).save(tmp_path / "deep.png")
    crop = HRFolderDataset([tmp_path], size=16, flip=False)[0]["gt"]
    expected = torch.from_numpy(levels.astype(np.float32) / 65535)
    for channel in range(3):
        torch.testing.assert_close(crop[channel], expected)


def test_hr_dataset_skips_and_counts_unreadable_images(tmp_path: Path):
    _save(tmp_path / "good.png", _random_image(20, 20, 1))
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a JPEG")
    dataset = HRFolderDataset([tmp_path], size=16)
    broken = [p.name for p in dataset.paths].index("broken.jpg")
    item = dataset[broken]
    assert item["skipped"] >= 1 and item["gt"].shape == (3, 16, 16)
    stream = BatchStream(dataset, batch_size=2, seed=0)
    for _ in range(3):
        next(stream)
    assert stream.skipped >= 3  # the broken file is in every batch of 2 out of 2 images


def test_hr_dataset_gives_up_on_a_folder_of_unreadable_files(tmp_path: Path):
    for index in range(3):
        (tmp_path / f"broken{index}.png").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match=f"{MAX_READ_ATTEMPTS} unreadable images"):
        HRFolderDataset([tmp_path], size=16)[0]


def test_hr_dataset_errors_name_the_folders(tmp_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(DatasetError, match="no images.*empty"):
        HRFolderDataset([empty])
    with pytest.raises(DatasetError, match="missing"):
        HRFolderDataset([tmp_path / "missing"])
    with pytest.raises(DatasetError, match="no data folders"):
        HRFolderDataset([])


def test_area_resize_averages_covered_pixels():
    image = torch.rand(3, 12, 18)
    torch.testing.assert_close(area_resize(image, 6, 9), F.avg_pool2d(image[None], 2)[0])
    # 5 → 2: output pixel 0 covers inputs 0, 1 and half of 2.
    row = torch.tensor([[[1.0, 2.0, 3.0, 4.0, 5.0]]])
    torch.testing.assert_close(
        area_resize(row, 1, 2), torch.tensor([[[(1 + 2 + 1.5) / 2.5, (1.5 + 4 + 5) / 2.5]]])
    )
    flat = torch.full((3, 37, 23), 0.3)
    torch.testing.assert_close(area_resize(flat, 16, 16), torch.full((3, 16, 16), 0.3))


# --------------------------------------------------------------------------------------------- paired


@pytest.fixture
def paired(tmp_path: Path) -> tuple[Path, Path]:
    """LQ images and GT = nearest ×4 upscale of each, so aligned crops can be checked exactly."""
    lq_dir, gt_dir = tmp_path / "lq", tmp_path / "gt"
    for index in range(3):
        lq = _random_image(8, 10, index)
        _save(lq_dir / f"pair{index}.png", lq)
        _save(gt_dir / f"pair{index}.png", lq.repeat(4, axis=0).repeat(4, axis=1))
    return lq_dir, gt_dir


def test_paired_dataset_matches_by_name_and_returns_whole_images(paired: tuple[Path, Path]):
    dataset = PairedFolderDataset(*paired, scale=4)
    assert len(dataset) == 3
    item = dataset[1]
    assert item["name"] == "pair1" and item["lq"].shape == (3, 8, 10) and item["gt"].shape == (3, 32, 40)
    torch.testing.assert_close(F.interpolate(item["lq"][None], scale_factor=4, mode="nearest")[0], item["gt"])


def test_paired_dataset_crops_are_aligned_and_flip_together(paired: tuple[Path, Path]):
    dataset = PairedFolderDataset(*paired, scale=4, crop_size=16, flip=True, seed=3)
    flipped_seen = set()
    for epoch in range(6):
        dataset.set_epoch(epoch)
        for index in range(3):
            item = dataset[index]
            assert item["lq"].shape == (3, 4, 4) and item["gt"].shape == (3, 16, 16)
            torch.testing.assert_close(
                F.interpolate(item["lq"][None], scale_factor=4, mode="nearest")[0], item["gt"]
            )
            full = PairedFolderDataset(*paired, scale=4)[index]["lq"]
            windows = full.unfold(1, 4, 1).unfold(2, 4, 1)  # every 4×4 window of the LQ
            matches = [(windows[:, i, j] == item["lq"]).all() for i in range(5) for j in range(7)]
            flipped = [(windows[:, i, j].flip(-1) == item["lq"]).all() for i in range(5) for j in range(7)]
            assert any(matches) or any(flipped)
            flipped_seen.add(bool(any(flipped)) and not any(matches))
    assert flipped_seen == {True, False}


def test_paired_dataset_accepts_different_extensions(paired: tuple[Path, Path]):
    lq_dir, gt_dir = paired
    image = Image.open(gt_dir / "pair0.png")
    (gt_dir / "pair0.png").unlink()
    image.save(gt_dir / "pair0.bmp")
    assert PairedFolderDataset(lq_dir, gt_dir, scale=4)[0]["gt"].shape == (3, 32, 40)


def test_paired_dataset_pairing_errors(paired: tuple[Path, Path]):
    lq_dir, gt_dir = paired
    _save(lq_dir / "lonely.png", _random_image(8, 10, 5))
    with pytest.raises(DatasetError, match="1 LQ image\\(s\\) in .* have no GT image in .*: lonely$"):
        PairedFolderDataset(lq_dir, gt_dir, scale=4)
    (lq_dir / "lonely.png").unlink()
    _save(gt_dir / "orphan.png", _random_image(32, 40, 5))
    with pytest.raises(DatasetError, match="1 GT image\\(s\\) in .* have no LQ image in .*: orphan$"):
        PairedFolderDataset(lq_dir, gt_dir, scale=4)
    (gt_dir / "orphan.png").unlink()
    _save(gt_dir / "pair2.png", _random_image(30, 40, 5))
    with pytest.raises(
        DatasetError,
        match="size mismatch for 'pair2': LQ .*pair2.png is 10×8, GT .*pair2.png is 40×30 \\(expected 4× the LQ size: 40×32\\)",
    ):
        PairedFolderDataset(lq_dir, gt_dir, scale=4)
    with pytest.raises(DatasetError, match="size mismatch"):
        PairedFolderDataset(lq_dir, gt_dir, scale=2)
    (gt_dir / "pair2.png").write_bytes(b"garbage")
    with pytest.raises(ImageReadError, match="pair2.png: cannot decode image"):
        PairedFolderDataset(lq_dir, gt_dir, scale=4)


def test_paired_dataset_reports_an_image_that_fails_to_decode(paired: tuple[Path, Path]):
    lq_dir, gt_dir = paired
    dataset = PairedFolderDataset(lq_dir, gt_dir, scale=4)
    data = (gt_dir / "pair1.png").read_bytes()
    (gt_dir / "pair1.png").write_bytes(data[: len(data) // 2])  # header intact, pixel data truncated
    with pytest.raises(ImageReadError, match="pair1.png"):
        dataset[1]


def test_paired_dataset_config_errors(paired: tuple[Path, Path], tmp_path: Path):
    lq_dir, gt_dir = paired
    with pytest.raises(ConfigError, match="multiple of scale"):
        PairedFolderDataset(lq_dir, gt_dir, scale=4, crop_size=18)
    with pytest.raises(DatasetError, match="smaller than the crop size 48"):
        PairedFolderDataset(lq_dir, gt_dir, scale=4, crop_size=48)
    with pytest.raises(DatasetError, match="LQ folder .*nope does not exist"):
        PairedFolderDataset(tmp_path / "nope", gt_dir, scale=4)
    _save(lq_dir / "pair0.jpg", _random_image(8, 10, 0))
    with pytest.raises(DatasetError, match="LQ folder .* has two images named 'pair0': pair0.jpg, pair0.png"):
        PairedFolderDataset(lq_dir, gt_dir, scale=4)


# -------------------------------------------------------------------------------------------- sampler


@pytest.mark.parametrize(
    ("length", "world_size", "drop_last"), [(10, 3, False), (10, 3, True), (7, 2, False)]
)
@pytest.mark.parametrize("shuffle", [True, False])
def test_sampler_matches_torch_distributed_sampler(length, world_size, drop_last, shuffle):
    dataset = list(range(length))
    for rank in range(world_size):
        for epoch in (0, 3):
            ours = ResumableDistributedSampler(
                length, rank=rank, world_size=world_size, shuffle=shuffle, seed=11, drop_last=drop_last
            )
            theirs = DistributedSampler(
                dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=11, drop_last=drop_last
            )
            ours.set_epoch(epoch)
            theirs.set_epoch(epoch)
            assert list(ours) == list(theirs) and len(ours) == len(theirs)


def test_sampler_shards_are_disjoint_and_cover_the_dataset():
    shards = [list(ResumableDistributedSampler(9, rank=r, world_size=4, seed=0)) for r in range(4)]
    assert all(len(shard) == 3 for shard in shards)  # 9 padded to 12
    flat = [i for shard in shards for i in shard]
    assert set(flat) == set(range(9)) and len(flat) - len(set(flat)) == 3


def test_sampler_state_dict_resumes_the_identical_sequence():
    sampler = ResumableDistributedSampler(50, rank=1, world_size=2, seed=4)
    sampler.set_epoch(2)
    full = sampler.epoch_indices()
    iterator = iter(sampler)
    consumed = [next(iterator) for _ in range(9)]
    state = sampler.state_dict()
    resumed = ResumableDistributedSampler(50, rank=1, world_size=2, seed=4)
    resumed.load_state_dict(state)
    assert resumed.epoch == 2 and len(resumed) == 25 - 9
    assert consumed + list(resumed) == full


def test_sampler_rejects_a_state_from_another_setup():
    state = ResumableDistributedSampler(50, rank=0, world_size=4, seed=4).state_dict()
    with pytest.raises(ConfigError, match="world_size is 4, this run has 2"):
        ResumableDistributedSampler(50, rank=0, world_size=2, seed=4).load_state_dict(state)
    with pytest.raises(ConfigError, match="length"):
        ResumableDistributedSampler(49, rank=0, world_size=4, seed=4).load_state_dict(state)
    with pytest.raises(ConfigError, match="rank 2"):
        ResumableDistributedSampler(10, rank=2, world_size=2)
    with pytest.raises(ConfigError, match="position 30"):
        ResumableDistributedSampler(50, world_size=2).seek(30)


# --------------------------------------------------------------------------------------------- stream


def _ids(batch: dict) -> list[int]:
    """Identify each crop by its content (the flat image value set in `_indexed_folder`)."""
    return [round(float(v) * 255) for v in batch["gt"][:, 0, 0, 0]]


@pytest.fixture
def indexed_folder(tmp_path: Path) -> Path:
    """11 flat images whose value identifies them (crop and flip keep it)."""
    for index in range(11):
        _save(tmp_path / f"{index:02d}.png", np.full((12, 12, 3), 10 * index + 5, dtype=np.uint8))
    return tmp_path


def test_stream_runs_over_epochs_without_repeats_inside_an_epoch(indexed_folder: Path):
    stream = BatchStream(HRFolderDataset([indexed_folder], size=8), batch_size=3, seed=1)
    epochs: dict[int, list[int]] = {}
    for _ in range(9):  # 3 batches of 3 per epoch (the 11th image is the dropped tail)
        epoch = stream.epoch if stream.position + 3 <= 11 else stream.epoch + 1
        epochs.setdefault(epoch, []).extend(_ids(next(stream)))
    assert sorted(epochs) == [0, 1, 2]
    assert all(len(ids) == len(set(ids)) == 9 for ids in epochs.values())
    assert epochs[0] != epochs[1]  # reshuffled


@pytest.mark.parametrize(
    "consumed", [2, 3, 5]
)  # mid-epoch, exactly at an epoch boundary, in the second epoch
def test_stream_resume_continues_identically(indexed_folder: Path, consumed: int):
    dataset = HRFolderDataset([indexed_folder], size=8, seed=2)
    reference = BatchStream(dataset, batch_size=3, seed=9)
    batches = [next(reference) for _ in range(consumed + 4)]
    interrupted = BatchStream(dataset, batch_size=3, seed=9)
    for _ in range(consumed):
        next(interrupted)
    state = interrupted.state_dict()
    resumed = BatchStream(HRFolderDataset([indexed_folder], size=8, seed=2), batch_size=3, seed=9)
    resumed.load_state_dict(state)
    for expected in batches[consumed:]:
        assert torch.equal(next(resumed)["gt"], expected["gt"])


def test_stream_with_workers_matches_single_process_and_keeps_global_rng(indexed_folder: Path):
    dataset = HRFolderDataset([indexed_folder], size=8, seed=3)
    single = BatchStream(dataset, batch_size=2, seed=5)
    expected = [next(single)["gt"] for _ in range(7)]
    rng_before = torch.random.get_rng_state()
    workers = BatchStream(dataset, batch_size=2, seed=5, num_workers=2)
    got = [next(workers)["gt"] for _ in range(7)]
    workers.close()
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
    assert torch.equal(torch.random.get_rng_state(), rng_before)


def test_stream_ranks_split_each_epoch(indexed_folder: Path):
    dataset = HRFolderDataset([indexed_folder], size=8)
    ranks = [BatchStream(dataset, batch_size=2, seed=0, rank=r, world_size=2) for r in range(2)]
    ids = [_ids(next(stream)) + _ids(next(stream)) for stream in ranks]
    assert not set(ids[0]) & set(ids[1])


def test_stream_needs_a_full_batch_per_rank(indexed_folder: Path):
    with pytest.raises(DatasetError, match="fewer than the per-rank batch 8"):
        BatchStream(HRFolderDataset([indexed_folder], size=8), batch_size=8, world_size=2, rank=0)


def test_make_dataloader_batches_with_the_sampler(indexed_folder: Path):
    dataset = HRFolderDataset([indexed_folder], size=8)
    sampler = ResumableDistributedSampler(len(dataset), shuffle=False, world_size=1, rank=0)
    loader = make_dataloader(dataset, 4, sampler, pin_memory=False)
    batches = list(loader)
    assert len(batches) == 2 and batches[0]["gt"].shape == (4, 3, 8, 8)
    assert _ids(batches[0]) == [5, 15, 25, 35]
    with pytest.raises(ConfigError, match="batch size 0"):
        make_dataloader(dataset, 0, sampler)
