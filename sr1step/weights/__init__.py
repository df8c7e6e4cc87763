"""Model weights: the ``weights.toml`` registry, resolution of ``NAME | PATH | hf://...``, downloads, checks.

* ``registry``: ``weights.toml`` → validated ``WeightsEntry`` records (packaged copy; ``SR1STEP_REGISTRY``).
* ``resolve``: ``resolve_model(spec)`` → a local, sha256-verified ``ResolvedWeights`` (cache-first, offline-safe),
  ``converted_path(resolved)`` → a pickle-free safetensors, ``verify_cached(spec)`` → re-hash a cached file.
* ``hub`` / ``download``: Hugging Face Hub files (standard HF cache, ``HF_ENDPOINT``, ``HF_TOKEN``,
  ``HF_HUB_OFFLINE``) and resumable URL downloads into the sr1step cache (``SR1STEP_CACHE``).
* ``cache``: cache locations, sha256 checks and their stamps. ``publish``: ``push_checkpoint`` to the Hub.
"""

from __future__ import annotations

from sr1step.weights.cache import cache_root, hf_cache_dir
from sr1step.weights.download import url_cache_path
from sr1step.weights.hub import HubSpec, parse_hf_spec
from sr1step.weights.publish import PushResult, model_card, push_checkpoint, read_safetensors_metadata
from sr1step.weights.registry import (
    KNOWN_ARCHS,
    HubSource,
    Source,
    UrlSource,
    WeightsEntry,
    default_model_for_scale,
    entry_as_dict,
    inference_spec,
    load_registry,
    registry_file,
)
from sr1step.weights.resolve import (
    ResolvedWeights,
    VerifyResult,
    cached_entry_path,
    converted_path,
    resolve_model,
    verify_cached,
)

__all__ = [
    "KNOWN_ARCHS",
    "HubSource",
    "HubSpec",
    "PushResult",
    "ResolvedWeights",
    "Source",
    "UrlSource",
    "VerifyResult",
    "WeightsEntry",
    "cache_root",
    "cached_entry_path",
    "converted_path",
    "default_model_for_scale",
    "entry_as_dict",
    "hf_cache_dir",
    "inference_spec",
    "load_registry",
    "model_card",
    "parse_hf_spec",
    "push_checkpoint",
    "read_safetensors_metadata",
    "registry_file",
    "resolve_model",
    "url_cache_path",
    "verify_cached",
]
