"""Networks: the ResShift Swin-UNet denoiser and the VQ-f4 autoencoder (official key layouts)."""

from sr1step.models.resshift_unet import ResShiftUNet, ResShiftUNetConfig
from sr1step.models.vq_autoencoder import VQAutoencoder, VQAutoencoderConfig

__all__ = ["ResShiftUNet", "ResShiftUNetConfig", "VQAutoencoder", "VQAutoencoderConfig"]
