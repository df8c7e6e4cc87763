"""The model registry: ``weights.toml`` parsed into validated, frozen ``WeightsEntry`` records.

The registry ships inside the package (``sr1step/weights/weights.toml``, a byte-identical copy of the
repository's root ``weights.toml``; a test keeps the two equal). ``SR1STEP_REGISTRY`` replaces it at run time.
"""

from __future__ import annotations

import dataclasses
import os
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sr1step.errors import WeightsError, WeightsNotFoundError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

if TYPE_CHECKING:
    from sr1step.checkpoints import InferenceSpec

REGISTRY_ENV = "SR1STEP_REGISTRY"

KNOWN_ARCHS = ("resshift-unet", "vq-f4", "yonos-sd")
KNOWN_FAMILIES = ("resshift", "sinsr", "rsd", "tad-sr", "yonos-sr")
KNOWN_ROLES = ("student", "teacher", "vae")
SCHEDULES = ("s15", "s4")
NOISE_MODES = ("none", "concat", "add")
LQ_MODES = ("lr", "pixel", "latent")  # the values of sr1step.checkpoints.InferenceSpec.lq_mode
PRIOR_NOISE_SCALES = ("kappa_sqrt_eta", "kappa")  # ... and of InferenceSpec.prior_noise_scale
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")
UNET_HINTS = ("schedule", "noise_mode", "noise_channels", "lq_mode", "decode_quantize", "prior_noise_scale")

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class HubSource:
    """A file in a Hugging Face Hub model repository."""

    repo: str
    filename: str
    revision: str | None = None  # None = the default branch ("main"); a 40-hex commit pins it
    sha256: str | None = None  # None = checked against the Hub's own LFS sha256

    def describe(self) -> str:
        rev = f"@{self.revision}" if self.revision else ""
        return f"hf://{self.repo}/{self.filename}{rev}"


@dataclass(frozen=True)
class UrlSource:
    """A file at a plain HTTP(S) URL (GitHub release assets, Google Drive)."""

    url: str
    filename: str
    sha256: str | None = None  # None = unpinned: the hash recorded at first download is the reference
    size: int | None = None

    def describe(self) -> str:
        return self.url


Source = HubSource | UrlSource


@dataclass(frozen=True)
class WeightsEntry:
    """One model of the registry.

    The inference hints (``schedule`` … ``prior_noise_scale``) exist for ResShift-UNet models only and use the
    names and values of ``sr1step.checkpoints.InferenceSpec``; a safetensors file's own metadata wins over them.
    """

    name: str
    description: str
    arch: str  # one of KNOWN_ARCHS
    family: str  # one of KNOWN_FAMILIES
    role: str  # student | teacher | vae
    license: str
    sources: tuple[Source, ...] = ()
    scale: int | None = None  # None for the autoencoder
    schedule: str | None = None  # s15 | s4
    vae: str | None = None  # registry name of the autoencoder this model decodes with
    noise_mode: str | None = None  # none | concat | add (the student's extra noise input)
    noise_channels: int | None = None
    lq_mode: str | None = None  # lr (official) | pixel | latent (ComfyUI students)
    decode_quantize: bool | None = None  # snap to the VQ codebook before decoding (official) or not
    prior_noise_scale: str | None = None  # kappa_sqrt_eta: z_T = z_y + 1.98ε (official) | kappa: z_y + 2ε
    default_for_scale: bool = False
    available: bool = True
    how_to_get: str | None = None
    paper: str | None = None
    origin: str | None = None
    approx_size_mb: float | None = None  # informational; never used for verification
    notes: str | None = None

    @property
    def steps(self) -> int | None:
        """Network evaluations per image: 1 for students, the schedule length for teachers."""
        if self.schedule is None:
            return None
        return 1 if self.role == "student" else int(self.schedule[1:])


def registry_file() -> Path:
    """The registry in use: ``SR1STEP_REGISTRY`` if set, else the copy packaged with sr1step."""
    override = os.environ.get(REGISTRY_ENV)
    return Path(override).expanduser() if override else Path(__file__).with_name("weights.toml")


def load_registry(path: str | os.PathLike[str] | None = None) -> dict[str, WeightsEntry]:
    """Parse and validate a registry file (default: ``registry_file()``)."""
    file = Path(path) if path is not None else registry_file()
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise WeightsError(f"{file}: cannot read the weights registry ({exc.strerror or exc})") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise WeightsError(f"{file}: not a valid TOML registry ({exc})") from exc
    entries: dict[str, WeightsEntry] = {}
    for name, table in data.items():
        if not isinstance(table, dict):
            raise WeightsError(f"{file}: top-level key '{name}' must be a [table] describing one model")
        entries[name] = _parse_entry(file, name, table)
    _check_cross_references(file, entries)
    return entries


class _Table:
    """Typed access to one TOML table; every problem names the file, the entry and the key."""

    def __init__(self, file: Path, where: str, table: Mapping[str, Any]) -> None:
        self.file, self.where, self.values = file, where, dict(table)

    def fail(self, message: str) -> WeightsError:
        return WeightsError(f"{self.file}: [{self.where}] {message}")

    def take(
        self, key: str, kind: type | tuple[type, ...], required: bool = False, choices: tuple = ()
    ) -> Any:
        if key not in self.values:
            if required:
                raise self.fail(f"missing required field '{key}'")
            return None
        value = self.values.pop(key)
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # bool is an int subclass: a `scale = true` typo must not pass as 1.
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            names = "/".join(t.__name__ for t in kinds)
            raise self.fail(f"field '{key}' must be {names}, got {value!r}")
        if choices and value not in choices:
            raise self.fail(f"field '{key}' is {value!r}, expected one of {', '.join(map(str, choices))}")
        return value

    def finish(self) -> None:
        if self.values:
            raise self.fail(f"unknown field(s): {', '.join(sorted(self.values))}")


def _parse_entry(file: Path, name: str, raw: Mapping[str, Any]) -> WeightsEntry:
    table = _Table(file, name, raw)
    if not NAME_RE.match(name):
        raise table.fail("model names use lowercase letters, digits, '.', '_' and '-' only")
    arch = table.take("arch", str, required=True, choices=KNOWN_ARCHS)
    unet = arch == "resshift-unet"
    fields: dict[str, Any] = {
        "name": name,
        "description": table.take("description", str, required=True),
        "arch": arch,
        "family": table.take("family", str, required=True, choices=KNOWN_FAMILIES),
        "role": table.take("role", str, required=True, choices=KNOWN_ROLES),
        "license": table.take("license", str, required=True),
        "scale": table.take("scale", int),
        "schedule": table.take("schedule", str, required=unet, choices=SCHEDULES),
        "vae": table.take("vae", str, required=unet),
        "noise_mode": table.take("noise_mode", str, required=unet, choices=NOISE_MODES),
        "noise_channels": table.take("noise_channels", int, required=unet),
        "lq_mode": table.take("lq_mode", str, required=unet, choices=LQ_MODES),
        "decode_quantize": table.take("decode_quantize", bool, required=unet),
        "prior_noise_scale": table.take("prior_noise_scale", str, required=unet, choices=PRIOR_NOISE_SCALES),
        "default_for_scale": bool(table.take("default_for_scale", bool)),
        "available": table.take("available", bool) is not False,
        "how_to_get": table.take("how_to_get", str),
        "paper": table.take("paper", str),
        "origin": table.take("origin", str),
        "approx_size_mb": table.take("approx_size_mb", (int, float)),
        "notes": table.take("notes", str),
    }
    raw_sources = table.take("sources", list) or []
    table.finish()
    if not unet and any(fields[key] is not None for key in UNET_HINTS):
        raise table.fail(f"the inference hints ({', '.join(UNET_HINTS)}) apply to resshift-unet models only")
    if fields["role"] == "vae" and fields["scale"] is not None:
        raise table.fail("an autoencoder has no 'scale'")
    if fields["role"] != "vae" and (fields["scale"] is None or fields["scale"] < 1):
        raise table.fail("field 'scale' (a positive integer) is required for students and teachers")
    if unet and (fields["noise_mode"] == "none") != (fields["noise_channels"] == 0):
        raise table.fail("noise_channels must be 0 exactly when noise_mode is 'none'")
    sources = tuple(_parse_source(file, f"{name}.sources[{i}]", src) for i, src in enumerate(raw_sources))
    if fields["available"] and not sources:
        raise table.fail("an available model needs at least one [[sources]] entry")
    if not fields["available"] and not fields["how_to_get"]:
        raise table.fail("an entry with available = false needs a 'how_to_get' message")
    if fields["default_for_scale"] and (not fields["available"] or fields["role"] != "student"):
        raise table.fail("default_for_scale is only allowed on an available student")
    return WeightsEntry(sources=sources, **fields)


def _parse_source(file: Path, where: str, raw: Any) -> Source:
    if not isinstance(raw, dict):
        raise WeightsError(f"{file}: [{where}] each source must be a table")
    table = _Table(file, where, raw)
    kind = table.take("type", str, required=True, choices=("hub", "url"))
    sha256 = table.take("sha256", str)
    if sha256 is not None and not SHA256_RE.match(sha256):
        raise table.fail(f"sha256 must be 64 lowercase hex digits, got {sha256!r}")
    if kind == "hub":
        repo = table.take("repo", str, required=True)
        filename = table.take("filename", str, required=True)
        revision = table.take("revision", str)
        table.finish()
        if not REPO_RE.match(repo):
            raise table.fail(f"repo must look like 'owner/name', got {repo!r}")
        if not filename.strip() or filename.startswith("/") or ".." in filename.split("/"):
            raise table.fail(f"filename must be a relative path inside the repository, got {filename!r}")
        return HubSource(repo=repo, filename=filename, revision=revision or None, sha256=sha256)
    url = table.take("url", str, required=True)
    filename = table.take("filename", str)
    size = table.take("size", int)
    table.finish()
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise table.fail(f"url must be an http(s) URL, got {url!r}")
    filename = filename or Path(urllib.parse.unquote(parsed.path)).name
    if not filename or "/" in filename or "\\" in filename or filename in (".", ".."):
        raise table.fail(f'cannot take a file name from {url!r}: add filename = "..."')
    if size is not None and size <= 0:
        raise table.fail("size must be a positive number of bytes")
    return UrlSource(url=url, filename=filename, sha256=sha256, size=size)


def _check_cross_references(file: Path, entries: Mapping[str, WeightsEntry]) -> None:
    defaults: dict[int, str] = {}
    for entry in entries.values():
        if entry.vae is not None:
            vae = entries.get(entry.vae)
            if vae is None or vae.role != "vae":
                raise WeightsError(f"{file}: [{entry.name}] vae '{entry.vae}' is not an autoencoder entry")
        if entry.default_for_scale and entry.scale is not None:
            if entry.scale in defaults:
                raise WeightsError(
                    f"{file}: [{entry.name}] is a second default for x{entry.scale} "
                    f"(already '{defaults[entry.scale]}')"
                )
            defaults[entry.scale] = entry.name


def default_model_for_scale(scale: int, registry: Mapping[str, WeightsEntry] | None = None) -> str:
    """The registry name ``sr1step upscale -x SCALE`` uses when no ``--model`` is given."""
    entries = registry if registry is not None else load_registry()
    for entry in entries.values():
        if entry.default_for_scale and entry.scale == scale:
            return entry.name
    scales = sorted({e.scale for e in entries.values() if e.default_for_scale and e.scale is not None})
    listed = ", ".join(f"x{s}" for s in scales) or "none"
    raise WeightsNotFoundError(
        f"no default model for x{scale} in {registry_file()} (defaults exist for: {listed})"
    )


def inference_spec(entry: WeightsEntry) -> InferenceSpec:
    """The registry's inference settings for a ResShift-UNet entry, as ``sr1step.checkpoints.InferenceSpec``."""
    from sr1step.checkpoints import InferenceSpec
    from sr1step.diffusion import SCHEDULE_PRESETS

    if entry.arch != "resshift-unet" or entry.schedule is None:
        raise WeightsError(f"'{entry.name}' is a {entry.arch} entry: it has no ResShift inference settings")
    return InferenceSpec(
        family=entry.family,
        steps=entry.steps or 1,
        schedule=dict(SCHEDULE_PRESETS[entry.schedule]),
        scale=entry.scale,
        prior_noise_scale=entry.prior_noise_scale or "kappa_sqrt_eta",
        lq_mode=entry.lq_mode or "lr",
        decode_quantize=bool(entry.decode_quantize),
        vae=entry.vae or "vq-f4",
    )


def entry_as_dict(entry: WeightsEntry) -> dict[str, Any]:
    """A JSON-friendly view of an entry (each source tagged with its type)."""
    data = dataclasses.asdict(entry)
    data["sources"] = [
        {"type": "hub" if isinstance(s, HubSource) else "url", **dataclasses.asdict(s)} for s in entry.sources
    ]
    return data
