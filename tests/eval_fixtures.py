"""Helpers for the eval tests: generated image folders and an offline cache of random-weight metric files.

``build_iqa_weight_cache`` writes, under a fresh ``TORCH_HOME`` / ``HF_HOME``, every file the learned metrics
load, with the names and layouts pyiqa, torchvision, OpenAI-CLIP and timm expect, but random weights, so the
metrics construct and run with no network. Scores from these weights are meaningless; the tests check the
plumbing (loading, calling, per-image CSV, summary, table), not the values.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
from PIL import Image


def _openai_clip_import_error() -> str | None:
    """pyiqa's CLIPIQA imports the openai-clip package, which imports pkg_resources (gone in setuptools>=81)."""
    try:
        import clip  # noqa: F401
    except ImportError as exc:
        return f"openai-clip does not import here ({exc})"
    return None


CLIP_IMPORT_ERROR = _openai_clip_import_error()

# The metrics whose files build_iqa_weight_cache writes (MANIQA's, ~400 MB and slow to run, by add_maniqa).
FAST_LEARNED_METRICS = ("lpips", "dists", "niqe", "musiq", "clipiqa", "fid")


def smooth_rgb(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A textured 8-bit RGB image: low-frequency colour fields plus noise (not flat, not pure noise)."""
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    channels = []
    for _ in range(3):
        fx, fy, phase = rng.uniform(1, 6), rng.uniform(1, 6), rng.uniform(0, 2 * np.pi)
        channels.append(0.5 + 0.35 * np.sin(2 * np.pi * (fx * xx + fy * yy) + phase))
    image = np.stack(channels, axis=-1) + rng.normal(0.0, 0.06, size=(height, width, 3))
    return np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)


def write_png(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, format="PNG")
    return path


def make_sr_hr_folders(root: Path, names: list[str], size: int = 64, seed: int = 0) -> tuple[Path, Path]:
    """``root/sr`` and ``root/hr`` with the same names; SR = HR plus bounded noise."""
    rng = np.random.default_rng(seed)
    for name in names:
        hr = smooth_rgb(rng, size, size)
        sr = np.clip(hr.astype(np.int16) + rng.integers(-12, 13, size=hr.shape), 0, 255).astype(np.uint8)
        write_png(root / "hr" / name, hr)
        write_png(root / "sr" / name, sr)
    return root / "sr", root / "hr"


def make_lr_hr_folders(root: Path, names: list[str], hr_size: int = 64, scale: int = 4, seed: int = 0):
    """``root/lr`` made from ``root/hr`` by bicubic downscaling (PIL), as a synthetic ×scale test set."""
    rng = np.random.default_rng(seed)
    for name in names:
        hr = smooth_rgb(rng, hr_size, hr_size)
        write_png(root / "hr" / name, hr)
        lr = Image.fromarray(hr).resize((hr_size // scale, hr_size // scale), Image.Resampling.BICUBIC)
        write_png(root / "lr" / name, np.asarray(lr))
    return root / "lr", root / "hr"


@dataclass(frozen=True)
class IqaWeightCache:
    torch_home: Path
    hf_home: Path
    clip_sha256: str  # sha256 of the random RN50.pt (OpenAI's loader checks it; see apply())

    def apply(self, monkeypatch) -> None:
        """Point pyiqa, torchvision, CLIP and huggingface_hub at this cache, offline, for one test.

        Beyond what ``point_caches`` does, one substitution: OpenAI's CLIP loader pins the real RN50.pt sha256 in
        its URL table and re-downloads a file that does not match; a random file cannot match it, so the table
        entry carries this file's sha256 instead. Everything else loads through the libraries' normal paths.
        """
        from pyiqa.archs import clip_model

        point_caches(monkeypatch, self.torch_home, self.hf_home, hub_offline=True)
        real_url = clip_model._MODELS["RN50"]
        monkeypatch.setitem(
            clip_model._MODELS, "RN50", real_url.replace(real_url.split("/")[-2], self.clip_sha256)
        )


def point_caches(monkeypatch, torch_home: Path, hf_home: Path, hub_offline: bool = False) -> None:
    """Make this process use ``torch_home`` / ``hf_home`` as a fresh process with TORCH_HOME / HF_HOME would.

    pyiqa and huggingface_hub read those variables once, at import, and this process may have imported them
    already, so their copies are set as well.
    """
    from huggingface_hub import constants
    from pyiqa.utils import download_util

    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setattr(download_util, "DEFAULT_CACHE_DIR", str(torch_home / "hub" / "pyiqa"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    if hub_offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def _half(state: dict) -> dict:
    # fp16 halves the files; loaders copy into fp32 parameters, so loading is unchanged.
    return {k: v.half() if v.is_floating_point() else v for k, v in state.items()}


def _save(path: Path, state: dict) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)


def build_iqa_weight_cache(root: Path) -> IqaWeightCache:
    """Write random-weight files for FAST_LEARNED_METRICS under ``root``."""
    import scipy.io
    import torch
    from pyiqa.archs import clip_model, dists_arch, inception, lpips_arch, musiq_arch, niqe_arch
    from torchvision import models

    torch.manual_seed(0)
    torch_home, hf_home = root / "torch", root / "hf"
    pyiqa_dir = torch_home / "hub" / "pyiqa"
    tv_dir = torch_home / "hub" / "checkpoints"

    def name_of(url: str) -> str:
        return url.rsplit("/", 1)[-1]

    with mock.patch.dict(os.environ, {"TORCH_HOME": str(torch_home)}):
        # torchvision backbones (LPIPS: AlexNet, DISTS: VGG16), loaded strictly by torchvision.
        for builder, weights in (
            (models.alexnet, models.AlexNet_Weights),
            (models.vgg16, models.VGG16_Weights),
        ):
            _save(tv_dir / name_of(weights.IMAGENET1K_V1.url), _half(builder(weights=None).state_dict()))

        # LPIPS: the released file holds only the linear calibration layers.
        lpips = lpips_arch.LPIPS(pretrained=False, pnet_rand=True, net="alex", version="0.1")
        lin = {k: v for k, v in lpips.state_dict().items() if k.startswith("lin")}
        _save(pyiqa_dir / name_of(lpips_arch.default_model_urls["0.1_alex"]), lin)

        # DISTS: only alpha / beta (the VGG trunk comes from torchvision, written above).
        dists = dists_arch.DISTS(pretrained=False)
        ab = {k: v.abs() for k, v in dists.state_dict().items() if k in ("alpha", "beta")}
        _save(pyiqa_dir / name_of(dists_arch.default_model_urls["url"]), ab)

        # NIQE: the pristine MVG model (36 features: 18 per scale), a well-conditioned covariance.
        rng = np.random.default_rng(0)
        basis = rng.normal(size=(36, 36))
        niqe_file = pyiqa_dir / name_of(niqe_arch.default_model_urls["url"])
        niqe_file.parent.mkdir(parents=True, exist_ok=True)
        scipy.io.savemat(
            niqe_file, {"mu_prisparam": rng.normal(size=(1, 36)), "cov_prisparam": basis @ basis.T}
        )

        # MUSIQ with the KonIQ head (one output).
        musiq = musiq_arch.MUSIQ(pretrained=False)
        _save(pyiqa_dir / name_of(musiq_arch.default_model_urls["koniq10k"]), _half(musiq.state_dict()))

        # FID Inception: built without its loader (which would fetch the real file), then saved under its name.
        with mock.patch.object(inception, "load_pretrained_network"):
            fid_net = inception.fid_inception_v3()
        _save(pyiqa_dir / name_of(inception.FID_WEIGHTS_URL), _half(fid_net.state_dict()))

        # OpenAI CLIP RN50: a TorchScript archive like the released file (pyiqa's loader reads its state dict;
        # a plain torch.save file fails there). Tracing one cheap method keeps every parameter of the model.
        clip = clip_model.CLIP(1024, 224, (3, 4, 6, 3), 64, None, 77, 49408, 512, 8, 12).eval()
        tokens = torch.zeros(1, 77, dtype=torch.long)
        scripted = torch.jit.trace_module(clip, {"encode_text": tokens}, check_trace=False).half()
        clip_file = torch_home / "hub" / "clip" / name_of(clip_model._MODELS["RN50"])
        clip_file.parent.mkdir(parents=True, exist_ok=True)
        torch.jit.save(scripted, str(clip_file))
        clip_sha = hashlib.sha256(clip_file.read_bytes()).hexdigest()

    return IqaWeightCache(torch_home, hf_home, clip_sha)


def add_maniqa(cache: IqaWeightCache) -> None:
    """Add MANIQA-PIPAL's checkpoint and timm's ViT-B/8 (Hugging Face cache layout) to ``cache``, once."""
    import timm
    from pyiqa.archs import maniqa_arch
    from safetensors.torch import save_file

    target = cache.torch_home / "hub" / "pyiqa" / maniqa_arch.default_model_urls["pipal"].rsplit("/", 1)[-1]
    if target.is_file():
        return
    real_create = timm.create_model

    def create_random(name, **kwargs):
        return real_create(name, **{**kwargs, "pretrained": False})

    with mock.patch.object(maniqa_arch.timm, "create_model", create_random):
        maniqa = maniqa_arch.MANIQA(pretrained=False, train_dataset="pipal")

    # timm's ViT in the Hugging Face cache layout: refs/main -> snapshots/<revision>/model.safetensors.
    repo = timm.models.get_pretrained_cfg("vit_base_patch8_224").hf_hub_id
    revision = "0" * 40
    repo_dir = cache.hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(revision)
    snapshot = repo_dir / "snapshots" / revision
    snapshot.mkdir(parents=True)
    vit_state = {k: v.contiguous() for k, v in _half(maniqa.vit.state_dict()).items()}
    save_file(vit_state, str(snapshot / "model.safetensors"))
    _save(target, _half(maniqa.state_dict()))  # last: its presence marks the set complete


def make_fake_dataset_hub(cdn):
    """A ``FakeHub`` that also answers dataset repos (huggingface_hub asks for ``/datasets/{repo}/resolve/…``
    and ``/api/datasets/{repo}/…``); they share the model repo table. Zip archives are served as LFS files, as
    the real Hub stores them."""
    import dataclasses

    from fakehub import FakeHub

    class FakeDatasetHub(FakeHub):
        @staticmethod
        def is_lfs(path: str) -> bool:
            return FakeHub.is_lfs(path) or path.lower().endswith(".zip")

        def handle(self, request):
            path = request.path
            if path.startswith("/datasets/"):
                request = dataclasses.replace(request, path=path[len("/datasets") :])
            elif path.startswith("/api/datasets/"):
                request = dataclasses.replace(request, path="/api/models/" + path[len("/api/datasets/") :])
            return super().handle(request)

    return FakeDatasetHub(cdn)


def zip_bytes(files: dict[str, bytes]) -> bytes:
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def png_bytes(image: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()
