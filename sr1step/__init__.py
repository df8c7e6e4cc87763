"""sr1step: one-step diffusion super-resolution.

    >>> from sr1step import Upscaler
    >>> upscaler = Upscaler.from_pretrained("rsd-x4", device="cuda")   # or a local file / hf://owner/repo
    >>> upscaler(Image.open("photo.png")).save("photo_x4.png")

Heavy modules (torch) load on first use, so ``sr1step --version`` stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0.dev0"

_LAZY = {
    "Upscaler": ("sr1step.pipeline", "Upscaler"),
    "TileSettings": ("sr1step.pipeline", "TileSettings"),
    "load_model": ("sr1step.checkpoints", "load_model"),
    "export_safetensors": ("sr1step.checkpoints", "export_safetensors"),
    "InferenceSpec": ("sr1step.checkpoints", "InferenceSpec"),
    "ResShiftUNet": ("sr1step.models", "ResShiftUNet"),
    "VQAutoencoder": ("sr1step.models", "VQAutoencoder"),
}

__all__ = [
    "InferenceSpec",
    "ResShiftUNet",
    "TileSettings",
    "Upscaler",
    "VQAutoencoder",
    "__version__",
    "export_safetensors",
    "load_model",
]

if TYPE_CHECKING:
    from sr1step.checkpoints import InferenceSpec, export_safetensors, load_model
    from sr1step.models import ResShiftUNet, VQAutoencoder
    from sr1step.pipeline import TileSettings, Upscaler


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'sr1step' has no attribute {name!r}")
