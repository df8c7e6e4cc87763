"""Shared pytest fixtures. Keep this file small: area-specific fixtures live in their own modules."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# ../shared/ sits beside the checkout (locally and in CI); SR1STEP_SHARED overrides.
SHARED = Path(os.environ.get("SR1STEP_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
RESSHIFT_FIXTURES = SHARED / "fixtures" / "resshift"


@pytest.fixture(scope="session")
def resshift_fixtures() -> Path:
    """The official-code parity fixtures; tests needing them skip (with the reason) when ../shared is absent."""
    if not (RESSHIFT_FIXTURES / "resshift_parity_cases.safetensors").is_file():
        pytest.skip(f"ResShift parity fixtures not found at {RESSHIFT_FIXTURES} (set SR1STEP_SHARED)")
    return RESSHIFT_FIXTURES


@pytest.fixture(scope="session")
def parity_cases(resshift_fixtures: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(resshift_fixtures / "resshift_parity_cases.safetensors"))


@pytest.fixture(scope="session")
def small_unet(resshift_fixtures: Path):
    """The fixtures' small random-weight UNetModelSwin (official keys), loaded through sr1step.checkpoints."""
    from sr1step.checkpoints import load_model

    return load_model(resshift_fixtures / "unet_small.safetensors", expect="resshift-unet").module


@pytest.fixture(scope="session")
def small_vq(resshift_fixtures: Path):
    from sr1step.checkpoints import load_model

    return load_model(resshift_fixtures / "vq_small.safetensors", expect="vq-autoencoder").module


@pytest.fixture
def file_server():
    """A loopback HTTP file server with Range support and fault injection (tests/fakehub.py)."""
    from fakehub import FileServer

    with FileServer() as server:
        yield server


@pytest.fixture
def fake_hub(file_server):
    """A loopback fake Hugging Face Hub whose LFS downloads redirect to ``file_server`` (tests/fakehub.py)."""
    from fakehub import FakeHub

    with FakeHub(file_server) as hub:
        yield hub


@pytest.fixture(scope="session")
def tiny_model_files(tmp_path_factory) -> dict[str, Path]:
    """Self-describing safetensors of a tiny RSD-style x4 student and a tiny VQ-f4 (random weights)."""
    from tiny import tiny_unet, tiny_vq

    from sr1step.checkpoints import InferenceSpec, export_safetensors

    folder = tmp_path_factory.mktemp("tiny_models")
    unet = export_safetensors(
        tiny_unet(noise_channels=1), folder / "student.safetensors", InferenceSpec(family="rsd", scale=4)
    )
    vq = export_safetensors(tiny_vq(), folder / "vq.safetensors")
    return {"unet": unet, "vae": vq}
