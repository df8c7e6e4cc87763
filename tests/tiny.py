"""Tiny random-weight ResShift-family models for fast tests (no ../shared needed).

The UNet keeps the real structure (Swin layers, skips, timestep FiLM) at a fraction of the size: latent sizes
must be multiples of 16 (window 8, two levels). The VQ is a real f4 autoencoder with 32 channels.
"""

from __future__ import annotations

import torch

from sr1step.models import ResShiftUNet, VQAutoencoder


def tiny_unet(
    noise_channels: int = 0, noise_mode: str = "concat", seed: int = 0, lq_size: int = 16
) -> ResShiftUNet:
    torch.manual_seed(seed)
    unet = ResShiftUNet(
        image_size=16,
        model_channels=32,
        attention_resolutions=(16, 8),
        channel_mult=(1, 2),
        num_res_blocks=(1, 1),
        swin_embed_dim=32,
        num_head_channels=16,
        window_size=8,
        mlp_ratio=2,
        lq_size=lq_size,
        noise_channels=noise_channels,
        noise_mode=noise_mode,
    )
    return unet.eval()


def tiny_vq(seed: int = 0, n_embed: int = 64) -> VQAutoencoder:
    torch.manual_seed(seed)
    vq = VQAutoencoder(
        embed_dim=3,
        n_embed=n_embed,
        ddconfig={"ch": 32, "ch_mult": [1, 1, 1], "num_res_blocks": 1, "resolution": 64},
    )
    return vq.eval()


class LocalUNet(torch.nn.Module):
    """A denoiser with a small receptive field (two 3x3 convs) and the ResShiftUNet calling convention.

    With a model this local, a tiled run must equal the untiled run wherever the blend ignores tile margins.
    """

    def __init__(self, noise_channels: int = 1, seed: int = 0) -> None:
        super().__init__()
        from types import SimpleNamespace

        torch.manual_seed(seed)
        self.config = SimpleNamespace(size_multiple=1, lq_stages=0, noise_channels=noise_channels)
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(6 + noise_channels, 16, 3, padding=1),
            torch.nn.SiLU(),
            torch.nn.Conv2d(16, 3, 3, padding=1),
        )

    def forward(self, x, t, lq=None, noise=None):
        planes = [x, lq] + ([noise] if noise is not None else [])
        return self.net(torch.cat(planes, dim=1))


class LocalVQ(torch.nn.Module):
    """f4 'autoencoder' with a 4x4-block receptive field: average-pool + 1x1 conv, 1x1 conv + nearest upsample."""

    downsample_factor = 4

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.enc = torch.nn.Conv2d(3, 3, 1)
        self.dec = torch.nn.Conv2d(3, 3, 1)

    def encode(self, x):
        return self.enc(torch.nn.functional.avg_pool2d(x, 4))

    def decode(self, z, quantize=True):
        return torch.tanh(torch.nn.functional.interpolate(self.dec(z), scale_factor=4, mode="nearest"))
