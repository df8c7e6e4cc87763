"""Exceptions sr1step raises on purpose.

Every error carries a one-line message that names the file or value at fault and what is wrong with it;
the CLI prints that line to stderr and exits 1 (usage errors exit 2).
"""

from __future__ import annotations


class Sr1stepError(Exception):
    """Base class: an expected failure with a message fit for the user."""


class CheckpointError(Sr1stepError):
    """A checkpoint file cannot be read, or does not fit any known architecture."""


class WeightsError(Sr1stepError):
    """A registry entry, download, cache or checksum problem."""


class WeightsNotFoundError(WeightsError):
    """A model name, file or cache entry that does not exist (or is not cached when offline)."""


class ChecksumMismatchError(WeightsError):
    """A downloaded file whose sha256 is not the expected one (the file has been removed)."""


class ImageReadError(Sr1stepError):
    """An input image that cannot be decoded."""


class ImageWriteError(Sr1stepError):
    """An output image that cannot be written."""


class ConfigError(Sr1stepError):
    """An invalid option, config file or config value."""


class DatasetError(Sr1stepError):
    """A dataset that is missing, incomplete or does not pair up."""
