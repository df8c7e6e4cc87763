"""The papers' test sets: what each holds, how it is scored (its protocol), where to get it, where it lives.

A dataset resolves to an LR folder and (when it has ground truth) an HR folder, looked for in this order:
``--data-root`` (``ROOT/<name>/``, ``ROOT/<archive folder>/`` or ``ROOT`` itself), then the sr1step cache
(``$SR1STEP_CACHE/datasets/``), then — for sets published on the Hugging Face Hub — a download through
``huggingface_hub`` that is unpacked into the cache. Sets only on Google Drive / GitHub raise an error that says
where to get them and the folder layout expected. Facts: ``shared/reference/evaluation.md`` §2.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from sr1step.errors import DatasetError
from sr1step.pairing import image_files

SINSR_FR = ("psnr", "ssim", "lpips", "clipiqa", "musiq")
OSEDIFF_PROTOCOL = ("psnr", "ssim", "lpips", "dists", "niqe", "musiq", "maniqa", "clipiqa", "fid")


@dataclass(frozen=True)
class HubArchive:
    """A zip file in a Hugging Face dataset repo, unpacked once into the sr1step cache."""

    repo_id: str
    filename: str
    size: str
    cache_folder: str  # folder under <cache>/datasets/ the archive is unpacked into
    member_folder: str  # the set's folder inside the archive

    def describe(self) -> str:
        return (
            f"Hugging Face dataset {self.repo_id}, file {self.filename} ({self.size}), "
            f"folder {self.member_folder}/ inside it"
        )


@dataclass(frozen=True)
class ManualSource:
    """Where to fetch a set by hand (Google Drive, GitHub) and how to arrange it."""

    where: str

    def describe(self) -> str:
        return self.where


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    title: str
    images: int
    scale: int
    sizes: str  # LR / HR sizes, for the listing
    protocol: str  # which papers score it this way
    metrics: tuple[str, ...]  # the protocol's metrics, in table order
    layouts: tuple[tuple[str, str | None], ...]  # accepted (LR folder, HR folder) inside the dataset folder
    sources: tuple[HubArchive | ManualSource, ...]
    notes: str = ""

    @property
    def has_ground_truth(self) -> bool:
        return self.layouts[0][1] is not None

    @property
    def hub(self) -> HubArchive | None:
        return next((s for s in self.sources if isinstance(s, HubArchive)), None)

    def expected_layout(self, root: str = "<root>") -> str:
        lr, hr = self.layouts[0]
        folder = f"{root}/{self.name}"
        lr_part = f"{folder}/{lr}/*.png" if lr else f"{folder}/*.png|jpg"
        return lr_part if hr is None else f"{lr_part} and {folder}/{hr}/ with the same file names"

    def where_to_get(self) -> str:
        return " | ".join(source.describe() for source in self.sources)


_STABLESR_ZIP = dict(repo_id="Iceclear/StableSR-TestSets", filename="StableSR_testsets.zip", size="3.06 GB")
_STABLESR_FOLDER = "stablesr-testsets"
# Unpacked copies seen in the wild use test_LR/test_HR or lq/gt inside each set's folder.
_STABLESR_LAYOUTS = (("test_LR", "test_HR"), ("lq", "gt"))

DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            "realsr", "RealSR-V3 ×4 test set, full size (Canon 50 + Nikon 50)", 100, 4,
            "LR ≈150-750 px, HR = 4×LR", "SinSR protocol (ResShift, SinSR, TAD-SR, RSD Table 1)", SINSR_FR,
            (("LR_x4", "HR_x4"), ("RealSR_V3/LR_x4", "RealSR_V3/HR_x4")),
            (ManualSource(
                "Google Drive id 17ZMjo-zwFouxnm_aFM6CUHBwgRrLZqIM, RealSR(V3).tar.gz (3.96 GB; original "
                "github.com/csjcai/RealSR); copy <Canon|Nikon>/Test/4/<cam>_<idx>_LR4.png to LR_x4/<cam>_<idx>.png "
                "and <cam>_<idx>_HR.png to HR_x4/<cam>_<idx>.png (RSD's prepare_testing_realsr.py)"
            ),),
        ),
        DatasetSpec(
            "realset65", "RealSet65 real-world LR images (no ground truth)", 65, 4, "112×112 … 755×703 LR",
            "SinSR protocol (no-reference metrics only)", ("clipiqa", "musiq"),
            (("", None), ("testdata/RealSet65", None), ("RealSet65", None)),
            (ManualSource(
                "GitHub github.com/zsyOAOA/ResShift, folder testdata/RealSet65 (30 PNG + 35 JPEG; "
                "git clone --depth 1 https://github.com/zsyOAOA/ResShift)"
            ),),
            "some files are not what their extension says (decoded by content) and some carry alpha (dropped)",
        ),
        DatasetSpec(
            "imagenet-test", "ResShift ImageNet-Test (Real-ESRGAN first-order degradation)", 3000, 4,
            "LQ 64², GT 256²", "SinSR protocol + FID (RSD Table 2)", (*SINSR_FR, "fid"),
            (("lq", "gt"), ("imagenet256/lq", "imagenet256/gt")),
            (ManualSource(
                "Google Drive id 1NhmpON2dB2LjManfX6uIj8Pj_Jx6N-6l, imagenet256_srx4.zip (392 MB) → "
                "imagenet256/{lq,gt}/ILSVRC2012_val_XXXXXXXX.png (regenerating it is only approximate)"
            ),),
        ),
        DatasetSpec(
            "realsr-crop", "StableSR RealSR crops", 100, 4, "LR 128², HR 512²",
            "OSEDiff protocol (OSEDiff Table 1, RSD Table 3)", OSEDIFF_PROTOCOL, _STABLESR_LAYOUTS,
            (
                HubArchive(**_STABLESR_ZIP, cache_folder=_STABLESR_FOLDER, member_folder="RealSRVal_crop128"),
                ManualSource("GitHub github.com/cswry/OSEDiff, preset/datasets/benchmark_realsr/{test_LR,test_HR}"),
            ),
        ),
        DatasetSpec(
            "drealsr-crop", "StableSR DRealSR crops", 93, 4, "LR 128², HR 512²",
            "OSEDiff protocol (OSEDiff Table 1, RSD Table 3)", OSEDIFF_PROTOCOL, _STABLESR_LAYOUTS,
            (
                HubArchive(**_STABLESR_ZIP, cache_folder=_STABLESR_FOLDER, member_folder="DrealSRVal_crop128"),
                ManualSource("GitHub github.com/cswry/OSEDiff, preset/datasets/benchmark_drealsr/{test_LR,test_HR}"),
            ),
        ),
        DatasetSpec(
            "div2k-val", "StableSR DIV2K-Val crops (Real-ESRGAN degradation)", 3000, 4, "LR 128², HR 512²",
            "OSEDiff protocol (OSEDiff Table 1, RSD Table 3)", OSEDIFF_PROTOCOL, _STABLESR_LAYOUTS,
            (
                HubArchive(**_STABLESR_ZIP, cache_folder=_STABLESR_FOLDER, member_folder="DIV2K_V2_val"),
                ManualSource("StableSR Google Drive folder 1XJY9Qxhz0mqjTtgDXr07oFy9eJr8jphI"),
            ),
        ),
    )
}  # fmt: skip


@dataclass(frozen=True)
class ResolvedDataset:
    spec: DatasetSpec
    root: Path
    lr_dir: Path
    hr_dir: Path | None


def get_dataset(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise DatasetError(f"unknown dataset '{name}'; known datasets: {', '.join(DATASETS)}") from None


def cache_dir() -> Path:
    """Where datasets are looked for and unpacked: ``<sr1step cache>/datasets`` (``$SR1STEP_CACHE``)."""
    from sr1step.weights.cache import cache_root

    return cache_root() / "datasets"


def _has_images(folder: Path) -> bool:
    return folder.is_dir() and any(image_files(folder))


def _find_layout(spec: DatasetSpec, root: Path) -> ResolvedDataset | None:
    for lr, hr in spec.layouts:
        lr_dir = root / lr if lr else root
        if not _has_images(lr_dir):
            continue
        if hr is None:
            return ResolvedDataset(spec, root, lr_dir, None)
        if (root / hr).is_dir():
            return ResolvedDataset(spec, root, lr_dir, root / hr)
    return None


def _candidate_roots(spec: DatasetSpec, base: Path) -> list[Path]:
    roots = [base / spec.name]
    hub = spec.hub
    if hub is not None:
        # An unpacked StableSR archive, with or without its top-level StableSR_testsets/ folder.
        roots += [base / hub.member_folder, base / "StableSR_testsets" / hub.member_folder]
    return [*roots, base]


def _search(spec: DatasetSpec, bases: list[Path]) -> ResolvedDataset | None:
    for base in bases:
        for root in _candidate_roots(spec, base):
            found = _find_layout(spec, root)
            if found is not None:
                return found
    return None


def resolve_dataset(name: str, data_root: Path | None = None, *, offline: bool = False) -> ResolvedDataset:
    """Find (or, for Hub sets, download and unpack) dataset ``name``; see the module docstring for the order."""
    spec = get_dataset(name)
    if data_root is not None:
        if not data_root.is_dir():
            raise DatasetError(f"--data-root {data_root} is not a folder")
        found = _search(spec, [data_root])
        if found is None:
            raise DatasetError(
                f"dataset '{name}' not found under --data-root {data_root}: expected "
                f"{spec.expected_layout(str(data_root))}; get it from: {spec.where_to_get()}"
            )
        return found

    cache = cache_dir()
    bases = [cache] + ([cache / spec.hub.cache_folder] if spec.hub else [])
    found = _search(spec, bases)
    if found is not None:
        return found
    if spec.hub is None:
        raise DatasetError(
            f"dataset '{name}' is not available locally; get it from: {spec.where_to_get()}; then arrange it as "
            f"{spec.expected_layout()} and pass --data-root <root> (or use {cache} as <root>)"
        )
    unpacked = _download_and_unpack(spec.hub, cache, offline=offline)
    found = _search(spec, [unpacked])
    if found is None:
        raise DatasetError(
            f"{spec.hub.filename} from {spec.hub.repo_id} unpacked into {unpacked} has no "
            f"{spec.hub.member_folder}/ with {' or '.join(f'{lr}+{hr}' for lr, hr in spec.layouts)} inside"
        )
    return found


def _download_and_unpack(hub: HubArchive, cache: Path, *, offline: bool) -> Path:
    from huggingface_hub.utils import LocalEntryNotFoundError

    from sr1step.errors import WeightsError
    from sr1step.weights.cache import env_flag, hf_cache_dir
    from sr1step.weights.hub import hub_snapshot

    target = cache / hub.cache_folder
    offline = offline or env_flag("HF_HUB_OFFLINE")
    try:
        snapshot = hub_snapshot(
            hub.repo_id,
            f"dataset archive {hub.repo_id}/{hub.filename}",
            allow_patterns=[hub.filename],
            repo_type="dataset",
            offline=offline,
        )
    except WeightsError as exc:
        if offline and isinstance(exc.__cause__, LocalEntryNotFoundError):
            raise DatasetError(
                f"dataset archive {hub.filename} of {hub.repo_id} is not in the Hugging Face cache "
                f"{hf_cache_dir()} and --offline forbids downloading it ({hub.size}); or unpack it yourself "
                f"into {target}"
            ) from exc.__cause__
        raise
    archive = snapshot / hub.filename
    if not archive.is_file():
        raise DatasetError(f"the Hub dataset {hub.repo_id} has no file {hub.filename}")
    unpack_zip(archive, target)
    return target


def unpack_zip(archive: Path, target: Path) -> None:
    """Unpack into a temp folder next to ``target``, then rename: a half-unpacked set is never found."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        with zipfile.ZipFile(archive) as bundle:
            bundle.extractall(staging)  # zipfile drops absolute paths and '..' from member names
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except zipfile.BadZipFile as exc:
        raise DatasetError(f"{archive} is not a valid zip file: {exc}") from exc
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
