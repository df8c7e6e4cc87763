"""sr1step: one-step diffusion super-resolution."""

__version__ = "0.1.0.dev0"
