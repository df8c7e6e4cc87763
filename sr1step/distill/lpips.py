"""LPIPS (v0.1, AlexNet) for the distillation losses and validation, through the ``lpips`` package.

The linear calibration weights ship inside the package; the AlexNet backbone is torchvision's ImageNet weights
(``alexnet-owt-7be5be79.pth``), fetched into ``$TORCH_HOME/hub/checkpoints`` on first use. ``offline`` requires
that file to be cached and names it when it is not. ``pretrained_backbone=False`` builds the same network with
random backbone weights (tests, smoke runs).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from sr1step.errors import ConfigError, WeightsNotFoundError

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"


def torch_hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def load_lpips(net: str = "alex", *, pretrained_backbone: bool = True, offline: bool = False) -> nn.Module:
    """A frozen LPIPS module taking two (B, 3, H, W) images in [-1, 1] and returning (B, 1, 1, 1) distances."""
    try:
        import lpips
    except ModuleNotFoundError:
        raise ConfigError("LPIPS needs the 'lpips' package: pip install 'sr1step[distill]'") from None
    if net != "alex":
        raise ConfigError(f"only LPIPS-alex is supported (the papers' setting), got {net!r}")
    backbone = torch_hub_checkpoints() / ALEXNET_FILE
    if pretrained_backbone and offline and not backbone.is_file():
        raise WeightsNotFoundError(
            f"{backbone}: LPIPS backbone not cached (offline); fetch it once online or copy {ALEXNET_FILE} there"
        )
    try:
        with warnings.catch_warnings():  # lpips calls torchvision's deprecated `pretrained=` argument
            warnings.simplefilter("ignore", UserWarning)
            model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=not pretrained_backbone, verbose=False)
    except OSError as exc:  # download failure (URLError is an OSError)
        raise WeightsNotFoundError(
            f"{backbone}: cannot fetch the LPIPS AlexNet backbone ({exc}); copy {ALEXNET_FILE} there"
        ) from None
    return model.eval().requires_grad_(False)
