"""The weights layer: registry, resolution, Hub and URL downloads, verification, conversion, push, CLI.

Every download goes through the real client code (huggingface_hub, urllib) against loopback servers from
tests/fakehub.py; nothing in the HTTP layer is mocked.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from pathlib import Path

import pytest

from sr1step.cli import run
from sr1step.errors import CheckpointError, ChecksumMismatchError, WeightsError, WeightsNotFoundError
from sr1step.weights import (
    KNOWN_ARCHS,
    HubSource,
    UrlSource,
    cache_root,
    cached_entry_path,
    converted_path,
    default_model_for_scale,
    hf_cache_dir,
    inference_spec,
    load_registry,
    parse_hf_spec,
    push_checkpoint,
    read_safetensors_metadata,
    resolve_model,
    url_cache_path,
    verify_cached,
)
from sr1step.weights.registry import REPO_RE, SHA256_RE

ROOT = Path(__file__).resolve().parents[1]
REQUIRED_NAMES = (
    "rsd-x4",
    "rsd-x2",
    "sinsr-v1",
    "sinsr-v2",
    "resshift-v1",
    "resshift-v2",
    "resshift-v3",
    "vq-f4",
    "tad-sr",
    "yonos-sr",
)
UNET_HINTS = {
    "schedule": "s15",
    "vae": "vq",
    "noise_mode": "none",
    "noise_channels": 0,
    "lq_mode": "lr",
    "decode_quantize": True,
    "prior_noise_scale": "kappa_sqrt_eta",
}


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)


def entry_toml(name: str, *sources: dict, **fields: object) -> str:
    """A registry stanza: a ResShift student unless ``fields`` say otherwise (None drops a field)."""
    values: dict[str, object] = {
        "description": f"test model {name}",
        "arch": "resshift-unet",
        "family": "rsd",
        "role": "student",
        "license": "test-licence",
        "scale": 4,
        **UNET_HINTS,
    }
    values.update(fields)
    lines = [f"[{name}]"] + [f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None]
    for source in sources:
        lines.append(f"[[{name}.sources]]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in source.items()]
    return "\n".join(lines) + "\n\n"


VAE_TOML = entry_toml(
    "vq",
    {"type": "url", "url": "https://example.invalid/vq.pth"},
    arch="vq-f4",
    family="resshift",
    role="vae",
    scale=None,
    **{key: None for key in UNET_HINTS},
)


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture
def weights_env(tmp_path, monkeypatch):
    """Fresh sr1step and HF caches, no token, no offline flag, no request to huggingface.co."""
    from huggingface_hub import constants

    monkeypatch.setenv("SR1STEP_CACHE", str(tmp_path / "sr1step-cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    for var in ("HF_HUB_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "SR1STEP_REGISTRY", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    # huggingface_hub reads these at import: a stored token or its telemetry lookup must not leak into tests.
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    return tmp_path


@pytest.fixture
def hub(fake_hub, weights_env, monkeypatch):
    """The fake Hub, with HF_ENDPOINT pointing at it (set after huggingface_hub was imported)."""
    monkeypatch.setenv("HF_ENDPOINT", fake_hub.url)
    return fake_hub


@pytest.fixture
def make_registry(weights_env, monkeypatch):
    """Write a registry (plus a VAE entry) and make it the active one through SR1STEP_REGISTRY."""

    def make(*stanzas: str) -> dict:
        path = weights_env / "registry.toml"
        path.write_text(VAE_TOML + "".join(stanzas), encoding="utf-8")
        monkeypatch.setenv("SR1STEP_REGISTRY", str(path))
        return load_registry(path)

    return make


def one_line(exc: BaseException) -> str:
    message = str(exc)
    assert "\n" not in message, message
    return message


# --------------------------------------------------------------------------------------------- registry


def test_packaged_registry_is_complete_and_well_formed():
    entries = load_registry()
    assert set(REQUIRED_NAMES) <= set(entries)
    defaults: dict[int, list[str]] = {}
    for name, entry in entries.items():
        assert entry.name == name
        assert entry.arch in KNOWN_ARCHS
        assert entry.license and entry.description
        if entry.default_for_scale:
            defaults.setdefault(entry.scale, []).append(name)
        if entry.vae is not None:
            assert entries[entry.vae].role == "vae"
        if not entry.available:
            assert not entry.sources
            assert "sr1step distill" in entry.how_to_get and "--model hf://" in entry.how_to_get
            continue
        assert entry.sources, name
        for source in entry.sources:
            if isinstance(source, HubSource):
                assert REPO_RE.match(source.repo) and source.filename.endswith(".safetensors")
            else:
                assert isinstance(source, UrlSource)
                assert source.url.startswith("https://") and source.filename.endswith(".pth")
            assert source.sha256 is None or SHA256_RE.match(source.sha256)
    assert defaults == {4: ["rsd-x4"], 2: ["rsd-x2"]}
    assert entries["rsd-x4"].sources[0] == HubSource(
        "sorryhyun/Distilled-ResShift-4x", "rsd_student_final.safetensors"
    )
    assert entries["rsd-x2"].sources[0].repo == "sorryhyun/Distilled-ResShift-2x"
    assert entries["tad-sr"].available is False and entries["yonos-sr"].available is False


def test_packaged_registry_copy_equals_the_root_file():
    packaged = ROOT / "sr1step" / "weights" / "weights.toml"
    assert packaged.read_bytes() == (ROOT / "weights.toml").read_bytes(), (
        "sr1step/weights/weights.toml differs from weights.toml: run `cp weights.toml sr1step/weights/weights.toml`"
    )


def test_packaged_registry_ships_in_the_wheel():
    # setuptools leaves non-Python files out of a wheel unless package-data names them.
    from sr1step.weights.registry import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    package_data = config.get("tool", {}).get("setuptools", {}).get("package-data", {})
    assert "weights.toml" in package_data.get("sr1step.weights", []), (
        'pyproject.toml needs [tool.setuptools.package-data] "sr1step.weights" = ["weights.toml"]'
    )


def test_registry_hints_match_the_reference():
    entries = load_registry()
    official = entries["sinsr-v1"]
    assert (official.lq_mode, official.decode_quantize, official.prior_noise_scale) == (
        "lr",
        True,
        "kappa_sqrt_eta",
    )
    comfy = entries["rsd-x4"]
    assert (comfy.noise_mode, comfy.noise_channels, comfy.lq_mode) == ("concat", 1, "pixel")
    assert (comfy.decode_quantize, comfy.prior_noise_scale) == (False, "kappa")
    assert entries["rsd-x2"].lq_mode == "latent"
    assert entries["resshift-v3"].schedule == "s4" and entries["resshift-v3"].steps == 4
    assert entries["resshift-v1"].steps == 15 and entries["rsd-x4"].steps == 1


def test_default_model_for_scale():
    assert default_model_for_scale(4) == "rsd-x4"
    assert default_model_for_scale(2) == "rsd-x2"
    with pytest.raises(WeightsNotFoundError, match=r"no default model for x3 .*x2, x4"):
        default_model_for_scale(3)


def test_inference_spec_from_the_registry():
    entries = load_registry()
    teacher = inference_spec(entries["resshift-v1"])
    assert (teacher.steps, teacher.schedule["steps"], teacher.scale, teacher.vae) == (15, 15, 4, "vq-f4")
    student = inference_spec(entries["rsd-x2"])
    assert (student.steps, student.scale, student.lq_mode, student.decode_quantize) == (1, 2, "latent", False)
    with pytest.raises(WeightsError, match="vq-f4"):
        inference_spec(entries["vq-f4"])


@pytest.mark.parametrize(
    ("stanza", "problem"),
    [
        (
            entry_toml("m", {"type": "url", "url": "https://x.org/a.pth"}, arch="unet9000"),
            r"\[m\] field 'arch'",
        ),
        (
            entry_toml("m", {"type": "url", "url": "https://x.org/a.pth"}, license=None),
            "missing required field 'license'",
        ),
        (
            entry_toml("m", {"type": "url", "url": "https://x.org/a.pth"}, colour="red"),
            r"unknown field\(s\): colour",
        ),
        (entry_toml("m", {"type": "url", "url": "https://x.org/a.pth", "sha256": "abc"}), "64 lowercase hex"),
        (entry_toml("m", {"type": "url", "url": "ftp://x.org/a.pth"}), "http"),
        (entry_toml("m", {"type": "url", "url": "https://x.org/"}), "cannot take a file name"),
        (entry_toml("m", {"type": "hub", "repo": "no-slash", "filename": "a.safetensors"}), "owner/name"),
        (entry_toml("m", {"type": "hub", "repo": "o/r", "filename": "../a.safetensors"}), "relative path"),
        (entry_toml("m", {"type": "git", "url": "https://x.org/a.pth"}), "field 'type'"),
        (entry_toml("m"), "at least one"),
        (entry_toml("m", available=False), "how_to_get"),
        (entry_toml("m", {"type": "url", "url": "https://x.org/a.pth"}, vae="nope"), "vae 'nope'"),
        (
            entry_toml("m", {"type": "url", "url": "https://x.org/a.pth"}, scale=True),
            "field 'scale' must be int",
        ),
        (entry_toml("m", {"type": "url", "url": "https://x.org/a.pth"}, noise_channels=1), "noise_channels"),
        (entry_toml("M", {"type": "url", "url": "https://x.org/a.pth"}), "lowercase"),
        (
            entry_toml("a", {"type": "url", "url": "https://x.org/a.pth"}, default_for_scale=True)
            + entry_toml("b", {"type": "url", "url": "https://x.org/b.pth"}, default_for_scale=True),
            r"\[b\] is a second default for x4",
        ),
        (entry_toml("m", {"type": "url", "url": "https://x.org/a.pth"}) * 2, "not a valid TOML"),
        ("just = 1\n", "must be a \\[table\\]"),
    ],
)
def test_malformed_registry_names_file_entry_and_problem(tmp_path, stanza, problem):
    path = tmp_path / "bad.toml"
    path.write_text(stanza + VAE_TOML, encoding="utf-8")
    with pytest.raises(WeightsError, match=problem) as info:
        load_registry(path)
    assert str(path) in one_line(info.value)


def test_inference_hints_are_refused_on_a_vae(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(VAE_TOML.replace('role = "vae"', 'role = "vae"\nlq_mode = "lr"'), encoding="utf-8")
    with pytest.raises(WeightsError, match=r"\[vq\] the inference hints"):
        load_registry(path)


def test_missing_registry_file_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("SR1STEP_REGISTRY", str(tmp_path / "nowhere.toml"))
    with pytest.raises(WeightsError, match="nowhere.toml: cannot read the weights registry"):
        load_registry()


# --------------------------------------------------------------------------------------------- specs


@pytest.mark.parametrize(
    ("spec", "repo", "filename", "revision"),
    [
        ("hf://o/r", "o/r", None, None),
        ("hf://o/r@v1.0", "o/r", None, "v1.0"),
        ("hf://o/r/model.safetensors", "o/r", "model.safetensors", None),
        ("hf://o/r/sub/dir/m.pth@" + "a" * 40, "o/r", "sub/dir/m.pth", "a" * 40),
        ("hf://o/r/m.safetensors@refs/pr/1", "o/r", "m.safetensors", "refs/pr/1"),
    ],
)
def test_parse_hf_spec(spec, repo, filename, revision):
    parsed = parse_hf_spec(spec)
    assert (parsed.repo, parsed.filename, parsed.revision) == (repo, filename, revision)


@pytest.mark.parametrize("spec", ["hf://", "hf://onlyowner", "hf://o/r@", "hf://o/r/../x.pth", "hf://o w/r"])
def test_bad_hf_specs(spec):
    with pytest.raises(WeightsError, match="hf://"):
        parse_hf_spec(spec)


def test_unknown_name_lists_close_names(weights_env):
    with pytest.raises(WeightsNotFoundError, match="did you mean rsd-x4") as info:
        resolve_model("rsd-x3", progress=False)
    assert "neither a registry model name nor an existing file" in one_line(info.value)


def test_unavailable_entry_says_how_to_get_one(weights_env):
    with pytest.raises(
        WeightsNotFoundError, match=r"'tad-sr' has no downloadable checkpoint: .*sr1step distill"
    ):
        resolve_model("tad-sr", progress=False)


def test_local_paths(weights_env):
    data = payload(1000)
    local = weights_env / "mine.safetensors"
    local.write_bytes(data)
    resolved = resolve_model(str(local), progress=False)
    assert (resolved.path, resolved.entry, resolved.sha256, resolved.source) == (
        local,
        None,
        sha256_of(data),
        "local",
    )
    with pytest.raises(WeightsNotFoundError, match="no such file"):
        resolve_model(str(weights_env / "missing.pth"), progress=False)
    with pytest.raises(WeightsError, match="is a folder"):
        resolve_model(str(weights_env), progress=False)


# --------------------------------------------------------------------------------------------- Hub


def test_hub_download_then_cached_without_network(hub, file_server, make_registry):
    data = payload(300_000)
    commit = hub.commit("owner/student", {"student.safetensors": data})
    make_registry(
        entry_toml("s", {"type": "hub", "repo": "owner/student", "filename": "student.safetensors"})
    )

    first = resolve_model("s", progress=False)
    assert first.path.read_bytes() == data
    assert first.sha256 == sha256_of(data)
    assert first.source == f"hf://owner/student/student.safetensors@{commit}"
    assert hf_cache_dir() in first.path.parents and first.entry.name == "s"
    assert [r.method for r in hub.requests_matching("/resolve/")] == ["HEAD"]
    assert len(file_server.requests_matching("/lfs/", "GET")) == 1  # the "CDN" served the bytes

    seen = len(hub.requests) + len(file_server.requests)
    again = resolve_model("s", progress=False)
    assert again.path == first.path and again.sha256 == first.sha256
    assert len(hub.requests) + len(file_server.requests) == seen  # cache-first: no request at all

    hub.stop()
    file_server.stop()
    assert resolve_model("s", progress=False).path == first.path


def test_hub_revision_pinning(hub, make_registry):
    old, new = payload(5000, 1), payload(5000, 2)
    first = hub.commit("o/m", {"w.safetensors": old})
    hub.tag("o/m", "v1.0", first)
    hub.commit("o/m", {"w.safetensors": new})
    make_registry(
        entry_toml("pinned", {"type": "hub", "repo": "o/m", "filename": "w.safetensors", "revision": first})
    )

    assert resolve_model("pinned", progress=False).path.read_bytes() == old
    assert resolve_model("hf://o/m/w.safetensors", progress=False).path.read_bytes() == new
    tagged = resolve_model("hf://o/m/w.safetensors@v1.0", progress=False)
    assert tagged.path.read_bytes() == old and tagged.source.endswith(f"@{first}")
    assert resolve_model(f"hf://o/m/w.safetensors@{first}", progress=False).path.read_bytes() == old


def test_hub_offline_hit_and_miss(hub, make_registry, monkeypatch):
    data = payload(4000)
    hub.commit("o/m", {"w.safetensors": data})
    make_registry(entry_toml("m", {"type": "hub", "repo": "o/m", "filename": "w.safetensors"}))
    resolve_model("m", progress=False)
    seen = len(hub.requests)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model("m", progress=False).path.read_bytes() == data
    with pytest.raises(WeightsNotFoundError) as info:
        resolve_model("hf://o/m/other.safetensors", progress=False)
    message = one_line(info.value)
    assert "hf://o/m/other.safetensors is not cached" in message and "offline mode is on" in message
    assert "sr1step weights download" in message
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(WeightsNotFoundError, match="offline mode"):
        resolve_model("hf://o/m/other.safetensors", offline=True, progress=False)
    assert len(hub.requests) == seen


def test_hub_file_not_matching_its_lfs_sha256_is_removed(hub, file_server):
    data = payload(20_000)
    hub.commit("o/m", {"w.safetensors": data})
    # The CDN hands out other bytes of the same size than the Hub's X-Linked-Etag (sha256) announces.
    file_server.add(f"/lfs/{sha256_of(data)}", payload(20_000, seed=9))
    with pytest.raises(ChecksumMismatchError) as info:
        resolve_model("hf://o/m/w.safetensors", progress=False)
    message = one_line(info.value)
    assert f"w.safetensors: sha256 mismatch (expected {sha256_of(data)}, got " in message
    assert "has been removed" in message
    blobs = hf_cache_dir() / "models--o--m" / "blobs"
    assert not any(blobs.iterdir())  # the corrupt blob is gone, so the next call downloads again
    file_server.add(f"/lfs/{sha256_of(data)}", data)
    assert resolve_model("hf://o/m/w.safetensors", progress=False).path.read_bytes() == data


def test_hub_registry_pin_is_checked(hub, make_registry):
    hub.commit("o/m", {"w.safetensors": payload(1000)})
    wrong = "0" * 64
    make_registry(
        entry_toml("m", {"type": "hub", "repo": "o/m", "filename": "w.safetensors", "sha256": wrong})
    )
    with pytest.raises(ChecksumMismatchError, match=f"expected {wrong}"):
        resolve_model("m", progress=False)
    assert hf_cache_dir().joinpath("models--o--m", "snapshots").exists()
    assert not list(hf_cache_dir().joinpath("models--o--m", "snapshots").rglob("w.safetensors"))


def test_hub_small_file_is_checked_by_git_sha1(hub):
    hub.commit("o/m", {"config.json": b'{"scale": 4}'})
    resolved = resolve_model("hf://o/m/config.json", progress=False)
    assert resolved.sha256 == sha256_of(b'{"scale": 4}')
    assert verify_cached("hf://o/m/config.json", progress=False).basis == "hub-git-sha1"
    resolved.path.resolve().write_bytes(b'{"scale": 2}')  # bit rot in the cached blob
    with pytest.raises(ChecksumMismatchError, match="git sha1 mismatch"):
        verify_cached("hf://o/m/config.json", progress=False)
    assert not resolved.path.exists()


def test_hub_cache_without_symlinks_asks_the_hub_for_the_hash(hub, monkeypatch):
    # Windows without developer mode: blobs are moved into the snapshot, so the name no longer holds the hash.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_SYMLINKS", True)
    data = payload(5000)
    hub.commit("o/m", {"w.safetensors": data})
    resolved = resolve_model("hf://o/m/w.safetensors", progress=False)
    assert not resolved.path.is_symlink() and resolved.sha256 == sha256_of(data)
    assert len(hub.requests_matching("/resolve/", "HEAD")) == 2  # the download, then the hash look-up
    assert verify_cached("hf://o/m/w.safetensors", progress=False).basis == "hub-lfs-sha256"
    resolved.path.write_bytes(payload(5000, 3))
    with pytest.raises(ChecksumMismatchError, match=f"expected {sha256_of(data)}"):
        resolve_model(
            "hf://o/m/w.safetensors", offline=True, progress=False
        )  # offline: checked against the stamp


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("hf://o/missing/w.safetensors", "repository not found on http://127.0.0.1:.* needs HF_TOKEN"),
        ("hf://o/m/w.safetensors@nope", "revision not found"),
        ("hf://o/m/absent.safetensors", "file not found in the repository"),
    ],
)
def test_hub_404s_are_one_line_errors(hub, spec, problem):
    hub.commit("o/m", {"w.safetensors": payload(100)})
    with pytest.raises(WeightsNotFoundError, match=problem) as info:
        resolve_model(spec, progress=False)
    assert one_line(info.value).startswith(spec)


def test_hub_500_on_the_download_is_a_one_line_error(hub, file_server):
    hub.commit("o/m", {"w.safetensors": payload(1000)})
    file_server.fail("/lfs/", 500, times=None)
    with pytest.raises(
        WeightsError, match=r"hf://o/m/w.safetensors: Hub request failed \(HTTP 500\)"
    ) as info:
        resolve_model("hf://o/m/w.safetensors", progress=False)
    one_line(info.value)
    assert not list(hf_cache_dir().rglob("w.safetensors"))


@pytest.mark.slow
def test_hub_500_on_metadata_is_retried_then_reported(hub):
    # huggingface_hub retries a 5xx HEAD five times; Retry-After: 0 keeps each wait at one second.
    hub.commit("o/m", {"w.safetensors": payload(1000)})
    hub.fail("/resolve/", 500, times=None, headers={"Retry-After": "0"})
    with pytest.raises(WeightsError, match=r"could not be reached \(HTTP 500\) and the file is not cached"):
        resolve_model("hf://o/m/w.safetensors", progress=False)
    assert len(hub.requests_matching("/resolve/", "HEAD")) > 1


def test_hub_500_with_a_cached_file_is_not_even_asked(hub):
    data = payload(1000)
    hub.commit("o/m", {"w.safetensors": data})
    resolve_model("hf://o/m/w.safetensors", progress=False)
    hub.fail("/", 500, times=None)
    assert resolve_model("hf://o/m/w.safetensors", progress=False).path.read_bytes() == data


def test_hub_download_survives_a_dropped_connection(hub, file_server):
    data = payload(200_000)
    hub.commit("o/m", {"w.safetensors": data})
    file_server.fail("/lfs/", drop_after=50_000)
    assert resolve_model("hf://o/m/w.safetensors", progress=False).path.read_bytes() == data
    # huggingface_hub retried within the same call (it resumes from its last whole 10 MB chunk: here, 0).
    assert len(file_server.requests_matching("/lfs/", "GET")) == 2


def test_hub_private_repo_needs_hf_token(hub, monkeypatch):
    hub.token = "secret"
    hub.create_repo("me/private", private=True)
    hub.commit("me/private", {"w.safetensors": payload(100)})
    with pytest.raises(WeightsNotFoundError, match="HF_TOKEN"):
        resolve_model("hf://me/private/w.safetensors", progress=False)
    monkeypatch.setenv("HF_TOKEN", "secret")
    assert resolve_model("hf://me/private/w.safetensors", progress=False).size == 100
    assert hub.requests_matching("/resolve/")[-1].headers["authorization"] == "Bearer secret"


def test_hf_spec_without_a_file_picks_the_checkpoint(hub, monkeypatch):
    hub.commit("o/one", {"README.md": b"hi", "config.json": b"{}", "student.safetensors": payload(100)})
    assert resolve_model("hf://o/one", progress=False).path.name == "student.safetensors"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the cached snapshot is enough to pick it again
    assert resolve_model("hf://o/one", progress=False).path.name == "student.safetensors"
    monkeypatch.delenv("HF_HUB_OFFLINE")
    hub.commit("o/two", {"a.safetensors": payload(10), "b.safetensors": payload(10, 1)})
    with pytest.raises(WeightsError, match=r"several checkpoints \(a.safetensors, b.safetensors\); name one"):
        resolve_model("hf://o/two", progress=False)
    hub.commit("o/none", {"README.md": b"hi"})
    with pytest.raises(WeightsNotFoundError, match="no checkpoint file"):
        resolve_model("hf://o/none", progress=False)


# --------------------------------------------------------------------------------------------- URLs


def url_entry(name: str, url: str, source: dict | None = None, **fields: object) -> str:
    """A registry stanza with one URL source (``source``: extra source keys; ``fields``: entry keys)."""
    return entry_toml(name, {"type": "url", "url": url, **(source or {})}, **fields)


def test_url_download_pinned_then_cached_without_network(file_server, make_registry):
    data = payload(300_000)
    url = file_server.add("/releases/m.pth", data)
    make_registry(url_entry("m", url, {"sha256": sha256_of(data), "size": len(data)}))

    resolved = resolve_model("m", progress=False)
    assert resolved.path == url_cache_path(UrlSource(url, "m.pth"))
    assert resolved.path.read_bytes() == data and resolved.sha256 == sha256_of(data)
    assert resolved.source == url and not resolved.path.with_name("m.pth.part").exists()
    assert len(file_server.requests) == 1

    file_server.stop()
    assert resolve_model("m", progress=False).path == resolved.path


def test_url_unpinned_hash_is_recorded_and_enforced(file_server, make_registry):
    data = payload(10_000)
    make_registry(url_entry("m", file_server.add("/m.pth", data)))
    resolved = resolve_model("m", progress=False)
    assert verify_cached("m", progress=False).basis == "first-download"

    tampered = bytearray(data)
    tampered[5000] ^= 0xFF
    resolved.path.write_bytes(bytes(tampered))  # a new mtime: the stamp no longer vouches for it
    with pytest.raises(ChecksumMismatchError, match=f"expected {sha256_of(data)}"):
        resolve_model("m", progress=False)
    assert not resolved.path.exists()


def test_url_wrong_pin_never_becomes_a_cache_entry(file_server, make_registry):
    make_registry(url_entry("m", file_server.add("/m.pth", payload(10_000)), {"sha256": "f" * 64}))
    with pytest.raises(ChecksumMismatchError) as info:
        resolve_model("m", progress=False)
    assert one_line(info.value).startswith("m.pth: sha256 mismatch (expected " + "f" * 64)
    folder = url_cache_path(UrlSource(file_server.url + "/m.pth", "m.pth")).parent
    assert not (folder / "m.pth").exists() and not (folder / "m.pth.part").exists()


def test_url_size_pin_is_checked(file_server, make_registry):
    make_registry(url_entry("m", file_server.add("/m.pth", payload(1000)), {"size": 999}))
    with pytest.raises(ChecksumMismatchError, match=r"size mismatch \(expected 999 bytes, got 1000\)"):
        resolve_model("m", progress=False)


def test_url_download_resumes_after_a_dropped_connection(file_server, make_registry):
    data = payload(400_000)
    make_registry(url_entry("m", file_server.add("/m.pth", data), {"sha256": sha256_of(data)}))
    file_server.fail("/m.pth", drop_after=123_456)
    assert resolve_model("m", progress=False).path.read_bytes() == data
    gets = file_server.requests_matching("/m.pth", "GET")
    assert [g.headers.get("range") for g in gets] == [None, "bytes=123456-"]


def test_url_partial_download_is_resumed_by_the_next_call(file_server, make_registry):
    data = payload(1_000_000)
    entries = make_registry(url_entry("m", file_server.add("/m.pth", data)))
    file_server.fail("/m.pth", drop_after=100_000, times=None)
    with pytest.raises(WeightsError, match=r"interrupted 4 times .* run the command again to resume") as info:
        resolve_model("m", progress=False)
    one_line(info.value)
    dest = url_cache_path(entries["m"].sources[0])
    part = dest.with_name("m.pth.part")
    assert not dest.exists() and part.stat().st_size == 400_000  # 4 attempts × 100 kB, each one resumed
    assert cached_entry_path(entries["m"]) is None  # a partial file is not a cache entry

    file_server.clear_faults()
    file_server.requests.clear()
    assert resolve_model("m", progress=False).path.read_bytes() == data
    assert [r.headers.get("range") for r in file_server.requests_matching("/m.pth")] == ["bytes=400000-"]
    assert not part.exists()


def test_url_complete_part_file_is_finished_without_a_transfer(file_server, make_registry):
    data = payload(50_000)
    entries = make_registry(url_entry("m", file_server.add("/m.pth", data)))
    part = url_cache_path(entries["m"].sources[0]).with_name("m.pth.part")
    part.parent.mkdir(parents=True)
    part.write_bytes(data)  # a run that died after the last byte, before the rename
    assert resolve_model("m", progress=False).path.read_bytes() == data
    (request,) = file_server.requests
    assert request.headers["range"] == "bytes=50000-"  # answered 416 with the total: nothing to fetch


def test_url_resume_when_the_server_ignores_range(file_server, make_registry):
    data = payload(200_000)
    entries = make_registry(url_entry("m", file_server.add("/m.pth", data), {"sha256": sha256_of(data)}))
    part = url_cache_path(entries["m"].sources[0]).with_name("m.pth.part")
    part.parent.mkdir(parents=True)
    part.write_bytes(data[:70_000])
    file_server.honour_range = False
    assert resolve_model("m", progress=False).path.read_bytes() == data  # restarted, not appended


@pytest.mark.parametrize(("status", "reason"), [(404, "Not Found"), (500, "Internal Server Error")])
def test_url_http_errors_are_one_line(file_server, make_registry, status, reason):
    url = file_server.add("/m.pth", payload(100))
    make_registry(url_entry("m", url))
    file_server.fail("/m.pth", status, times=None)
    with pytest.raises(WeightsError) as info:
        resolve_model("m", progress=False)
    assert one_line(info.value) == f"download of m.pth from {url} failed: HTTP {status} {reason}"


def test_url_server_down_is_one_line(file_server, make_registry):
    make_registry(url_entry("m", file_server.add("/m.pth", payload(100))))
    file_server.stop()
    with pytest.raises(WeightsError, match=r"cannot reach 127.0.0.1:\d+ to download m.pth") as info:
        resolve_model("m", progress=False)
    one_line(info.value)


def test_url_html_page_is_refused(file_server, make_registry):
    make_registry(
        url_entry(
            "m", file_server.add("/dl", b"<html>quota exceeded</html>", "text/html"), {"filename": "m.pth"}
        )
    )
    with pytest.raises(WeightsError, match="returned an HTML page instead of the file"):
        resolve_model("m", progress=False)


def test_url_offline_miss_makes_no_request(file_server, make_registry):
    make_registry(url_entry("m", file_server.add("/m.pth", payload(100))))
    with pytest.raises(
        WeightsNotFoundError, match=r"m: http://127.0.0.1:\d+/m.pth is not cached \(.*m.pth\)"
    ):
        resolve_model("m", offline=True, progress=False)
    assert file_server.requests == []


def test_next_source_is_tried_when_one_fails(file_server, make_registry):
    data = payload(1000)
    dead = file_server.url + "/gone.pth"
    make_registry(
        entry_toml("m", {"type": "url", "url": dead}, {"type": "url", "url": file_server.add("/m.pth", data)})
    )
    assert resolve_model("m", progress=False).path.read_bytes() == data


def _without_write_permission(folder: Path, call) -> str:
    """Run ``call()`` while ``folder`` is not writable for the caller; return 'ok' or 'Type: message'.

    Root ignores permission bits, so as root the call runs in a forked child that drops to uid 65534
    (modules it needs must already be imported: the child may not read the interpreter's files).
    """

    def outcome() -> str:
        try:
            call()
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return "ok"

    if os.geteuid() != 0:
        mode = folder.stat().st_mode
        folder.chmod(0o555)
        try:
            return outcome()
        finally:
            folder.chmod(mode)
    import filelock  # noqa: F401  (warm the imports the child needs)
    import huggingface_hub.file_download  # noqa: F401

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        os.close(read_end)
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            message = outcome()
        except BaseException as exc:
            message = f"setup failed: {exc}"
        os.write(write_end, message.encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        message = pipe.read().decode()
    os.waitpid(pid, 0)
    return message


@pytest.fixture
def shared_tmp():
    """A temp folder other users may traverse (pytest's tmp_path is private to its owner)."""
    folder = Path(tempfile.mkdtemp(prefix="sr1step-ro-"))
    folder.chmod(0o755)
    yield folder
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # os.fork() in a threaded process (Python 3.12+)
def test_read_only_sr1step_cache(file_server, make_registry, shared_tmp, monkeypatch):
    data = payload(1000)
    entries = make_registry(url_entry("m", file_server.add("/m.pth", data)))
    cache = shared_tmp / "cache"
    cache.mkdir()
    monkeypatch.setenv("SR1STEP_CACHE", str(cache))
    outcome = _without_write_permission(cache, lambda: resolve_model("m", progress=False, registry=entries))
    assert outcome.startswith("WeightsError: cache folder ") and "is not writable" in outcome
    assert "set SR1STEP_CACHE to a writable folder" in outcome

    # A read-only cache that already holds the file still serves it (the check just is not stamped).
    resolve_model("m", progress=False)
    for stamp in (cache / "verified").iterdir():
        stamp.unlink()
    for folder in [cache, *[p for p in cache.rglob("*") if p.is_dir()]]:
        folder.chmod(0o755)
    assert (
        _without_write_permission(cache / "url", lambda: resolve_model("m", progress=False, registry=entries))
        == "ok"
    )


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_read_only_hf_cache(hub, shared_tmp, monkeypatch):
    hub.commit("o/m", {"w.safetensors": payload(100)})
    cache = shared_tmp / "hf"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    outcome = _without_write_permission(
        cache, lambda: resolve_model("hf://o/m/w.safetensors", progress=False)
    )
    assert outcome.startswith("WeightsError: cache folder ") and "set HF_HUB_CACHE (or HF_HOME)" in outcome


# --------------------------------------------------------------------------------------------- conversion


def _tiny_pth(path: Path) -> Path:
    import torch
    from tiny import tiny_unet

    torch.save(tiny_unet().state_dict(), path)
    return path


def test_converted_path_converts_once(weights_env):
    from sr1step.checkpoints import load_model

    source = _tiny_pth(weights_env / "teacher.pth")
    resolved = resolve_model(str(source), progress=False)
    converted = converted_path(resolved)
    assert converted == cache_root() / "converted" / f"{resolved.sha256}.safetensors"
    metadata, count = read_safetensors_metadata(converted)
    assert metadata["source_sha256"] == resolved.sha256 and metadata["source_file"] == "teacher.pth"
    assert count == len(load_model(source).module.state_dict())
    mtime = converted.stat().st_mtime_ns
    assert converted_path(resolve_model(str(source), progress=False)) == converted
    assert converted.stat().st_mtime_ns == mtime  # not converted again

    safetensors = weights_env / "already.safetensors"
    safetensors.write_bytes(converted.read_bytes())
    assert converted_path(resolve_model(str(safetensors), progress=False)) == safetensors


def test_converted_registry_teacher_carries_registry_settings(file_server, make_registry, weights_env):
    from sr1step.checkpoints import load_model

    data = _tiny_pth(weights_env / "src.pth").read_bytes()
    make_registry(url_entry("teach", file_server.add("/teacher.pth", data), role="teacher", schedule="s4"))
    converted = converted_path(resolve_model("teach", progress=False))
    inference = load_model(converted).descriptor.inference
    assert (inference.steps, inference.schedule["steps"], inference.family) == (4, 4, "rsd")
    assert read_safetensors_metadata(converted)[0]["registry_name"] == "teach"


# --------------------------------------------------------------------------------------------- push


# huggingface_hub's classic LFS upload hands httpx2 a file object, which httpx2 flags as deprecated.
_HTTPX2_UPLOAD_WARNING = "ignore:Use 'content=<...>':DeprecationWarning"


@pytest.fixture
def upload_ready(hub, monkeypatch):
    """Token set, and huggingface_hub on its classic LFS upload path (hf_xet needs a real CAS server)."""
    from huggingface_hub import constants

    hub.token = "write-token"
    monkeypatch.setenv("HF_TOKEN", "write-token")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    return hub


def _student_safetensors(path: Path, metadata: dict[str, str] | None = None) -> Path:
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.arange(300.0)}, str(path), metadata=metadata)
    return path


@pytest.mark.filterwarnings(_HTTPX2_UPLOAD_WARNING)
def test_push_uploads_the_file_and_a_model_card(upload_ready, weights_env):
    checkpoint = _student_safetensors(
        weights_env / "student.safetensors", {"scale": "2", "noise_mode": "concat"}
    )
    result = push_checkpoint(checkpoint, "me/sr-student", private=True, progress=False)

    hub = upload_ready
    assert hub.repo("me/sr-student").private is True
    files = hub.files_at("me/sr-student")
    assert files["student.safetensors"] == checkpoint.read_bytes()
    card = files["README.md"].decode()
    assert card.startswith("---\nlicense: other\nlibrary_name: sr1step\npipeline_tag: image-to-image\n")
    assert result.sha256 in card and "| `noise_mode` | `concat` |" in card
    assert "sr1step upscale INPUT.png -x 2 --model hf://me/sr-student/student.safetensors" in card
    assert result.commit == hub.repo("me/sr-student").refs["main"]
    # The classic protocol end to end, every call authenticated.
    for route in (
        "/api/repos/create",
        "/preupload/",
        ".git/info/lfs/objects/batch",
        "/lfs-upload/",
        "/commit/",
    ):
        calls = hub.requests_matching(route)
        assert calls, route
    assert all(r.headers.get("authorization") == "Bearer write-token" for r in hub.requests_matching("/api/"))

    # Round trip: the pushed file downloads back, pinned to the commit, byte for byte.
    assert resolve_model(result.spec, progress=False).path.read_bytes() == checkpoint.read_bytes()


@pytest.mark.filterwarnings(_HTTPX2_UPLOAD_WARNING)
def test_push_to_a_new_branch(upload_ready, weights_env):
    checkpoint = _student_safetensors(weights_env / "s.safetensors")
    push_checkpoint(checkpoint, "me/m", progress=False)
    result = push_checkpoint(checkpoint, "me/m", revision="exp", license_id="cc-by-nc-sa-4.0", progress=False)
    refs = upload_ready.repo("me/m").refs
    assert refs["exp"] == result.commit != refs["main"]
    assert upload_ready.files_at("me/m", "exp")["README.md"].startswith(b"---\nlicense: cc-by-nc-sa-4.0\n")


def test_push_errors(upload_ready, weights_env, monkeypatch):
    pth = weights_env / "model.pth"
    pth.write_bytes(b"x")
    with pytest.raises(WeightsError, match="only .safetensors checkpoints are pushed; convert it first with"):
        push_checkpoint(pth, "me/m", progress=False)
    with pytest.raises(WeightsError, match="expected USER/NAME"):
        push_checkpoint(pth, "nobody", progress=False)
    monkeypatch.delenv("HF_TOKEN")
    checkpoint = _student_safetensors(weights_env / "s.safetensors")
    with pytest.raises(WeightsError, match=r"push to me/m: .*HTTP 401.*HF_TOKEN") as info:
        push_checkpoint(checkpoint, "me/m", progress=False)
    one_line(info.value)
    bad = weights_env / "bad.safetensors"
    bad.write_bytes(b"\xff" * 16)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        push_checkpoint(bad, "me/m", progress=False)


# --------------------------------------------------------------------------------------------- CLI


def test_cli_list_human_and_json(file_server, make_registry, capsys):
    data = payload(2000)
    make_registry(url_entry("cached-one", file_server.add("/a.pth", data), default_for_scale=True))
    resolve_model("cached-one", progress=False)
    assert run(["weights", "list"]) == 0
    out = capsys.readouterr().out
    assert "cached-one *" in out and "yes" in out and "test-licence" in out

    assert run(["weights", "list", "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    by_name = {r["name"]: r for r in records}
    assert set(by_name) == {"vq", "cached-one"}
    assert by_name["cached-one"]["cached"] is True and by_name["cached-one"]["size_bytes"] == 2000
    assert by_name["vq"]["cached"] is False and by_name["vq"]["source"] == "https://example.invalid/vq.pth"


def test_cli_download_and_path(file_server, make_registry, capsys):
    data = payload(3000)
    make_registry(url_entry("m", file_server.add("/m.pth", data)))
    assert run(["weights", "download", "m", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["sha256"] == sha256_of(data) and Path(record["path"]).read_bytes() == data

    assert run(["weights", "path", "m", "--offline"]) == 0
    assert capsys.readouterr().out == record["path"] + "\n"
    assert run(["weights", "download", "m"]) == 0
    assert capsys.readouterr().out.strip() == f"m: {record['path']}"


def test_cli_download_force_fetches_again(file_server, make_registry, capsys):
    make_registry(url_entry("m", file_server.add("/m.pth", payload(3000))))
    assert run(["weights", "download", "m", "-q"]) == 0
    newer = payload(3000, 5)
    file_server.add("/m.pth", newer)  # the upstream file was replaced
    assert run(["weights", "download", "m", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sha256"] != sha256_of(newer)  # cache-first: still the old one
    assert run(["weights", "download", "m", "--force", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["sha256"] == sha256_of(newer) and Path(record["path"]).read_bytes() == newer
    assert verify_cached("m", progress=False).sha256 == sha256_of(newer)  # the new copy is the new reference


def test_cli_errors_are_one_stderr_line_and_exit_1(weights_env, capsys):
    assert run(["weights", "download", "rsd-x3"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: 'rsd-x3' is neither")
    assert run(["weights", "path", "rsd-x4", "--offline"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: rsd-x4: hf://sorryhyun/Distilled-ResShift-4x/") and "offline" in err


def test_cli_usage_errors_exit_2(capsys):
    assert run(["weights", "download"]) == 2
    assert run(["weights", "push", "x.safetensors"]) == 2  # --repo is required
    assert run(["weights", "convert", "only-one-argument"]) == 2
    capsys.readouterr()


def test_cli_verify(file_server, make_registry, capsys):
    make_registry(
        url_entry("a", file_server.add("/a.pth", payload(100))),
        url_entry("b", file_server.add("/b.pth", payload(100, 1))),
    )
    assert run(["weights", "verify"]) == 0
    assert "no cached weights to verify" in capsys.readouterr().err

    path_a = resolve_model("a", progress=False).path
    resolve_model("b", progress=False)
    assert run(["weights", "verify", "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["name"], r["status"], r["basis"]) for r in records] == [
        ("a", "ok", "first-download"),
        ("b", "ok", "first-download"),
    ]

    path_a.write_bytes(payload(100, 7))
    assert run(["weights", "verify", "a"]) == 1
    captured = capsys.readouterr()
    assert "mismatch" in captured.out and captured.err.startswith("error: a.pth: sha256 mismatch")
    assert not path_a.exists()
    assert run(["weights", "verify", "a"]) == 1
    assert "'a' is not cached" in capsys.readouterr().err


def test_cli_convert(weights_env, capsys):
    from sr1step.checkpoints import load_model

    source = _tiny_pth(weights_env / "in.pth")
    out = weights_env / "out.safetensors"
    assert run(["weights", "convert", str(source), str(out), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["output"] == str(out) and record["size_bytes"] == out.stat().st_size
    assert load_model(out).descriptor.arch == "resshift-unet"
    assert run(["weights", "convert", str(source), str(weights_env / "out.pth")]) == 1
    assert "must be a .safetensors file" in capsys.readouterr().err
    assert run(["weights", "convert", str(weights_env / "missing.pth"), str(out)]) == 1
    assert "no such file" in capsys.readouterr().err


@pytest.mark.filterwarnings(_HTTPX2_UPLOAD_WARNING)
def test_cli_push(upload_ready, weights_env, capsys):
    checkpoint = _student_safetensors(weights_env / "student.safetensors")
    args = [
        "weights",
        "push",
        str(checkpoint),
        "--repo",
        "me/cli",
        "--private",
        "-m",
        "first upload",
        "--json",
    ]
    assert run(args) == 0
    record = json.loads(capsys.readouterr().out)
    assert (
        record["spec"] == f"hf://me/cli/student.safetensors@{record['commit']}" and record["private"] is True
    )
    assert upload_ready.repo("me/cli").private is True
    commit_body = upload_ready.requests_matching("/commit/")[-1].body.decode()
    assert '"summary": "first upload"' in commit_body

    pth = weights_env / "m.pth"
    pth.write_bytes(b"x")
    assert run(["weights", "push", str(pth), "--repo", "me/cli"]) == 1
    assert "sr1step weights convert" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- the fake Hub


def test_fake_hub_serves_snapshot_download_for_models_and_datasets(hub, weights_env):
    """The fake Hub is shared by other tests: snapshot_download (revision, tree, per-file HEAD/GET) works."""
    from huggingface_hub import snapshot_download

    model_files = {"config.json": b"{}", "model.safetensors": payload(3000), "sub/notes.txt": b"hi"}
    first = hub.commit("o/model", model_files)
    hub.commit("o/model", {"config.json": b'{"v": 2}'})
    folder = snapshot_download("o/model", revision=first, cache_dir=hf_cache_dir(), endpoint=hub.url)
    assert {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()
    } == (model_files)
    hub.commit("o/data", {"set.zip": b"PK..."}, repo_type="dataset")
    folder = snapshot_download("o/data", repo_type="dataset", cache_dir=hf_cache_dir(), endpoint=hub.url)
    assert (Path(folder) / "set.zip").read_bytes() == b"PK..."
    assert hub.requests_matching("^/api/datasets/o/data/revision/main$")
    assert hub.requests_matching("^/datasets/o/data/resolve/")
