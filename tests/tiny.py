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
