"""Every hyper-parameter of ``sr1step distill`` in one typed config tree.

Defaults are RSD.yaml's (reference ``distillation.md`` §2.9); each method may change the defaults of the shared
sections (TAD-SR trains with batch 8, 30k iterations, default AdamW betas and a 5k warm-up). Choices the papers
leave open are named fields with the reference's recommended default; ``choices_not_from_paper`` lists them.

Sources, applied in order: method defaults → ``--config FILE`` (TOML, YAML or JSON, nested tables per section)
→ ``--set section.key=value``. The resolved config is saved as ``RUN_DIR/config.json``.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from sr1step.distill.degradations import DegradationConfig
from sr1step.errors import ConfigError

METHODS = ("rsd", "tad-sr", "yonos-sr")


@dataclass
class ModelConfig:
    teacher: str = "resshift"  # the teacher family (ResShift-family methods)
    teacher_weights: str = "resshift-v1"  # registry name, local file or hf:// spec (RSD and TAD-SR: v1)
    vae: str = "vq-f4"
    scale: int = 4


@dataclass
class TrainConfig:
    iterations: int = 3000  # optimizer steps of the student
    batch: int = 64  # global batch, split over ranks
    microbatch: int = 8  # per-rank micro-batch; gradients accumulate over the rest
    lr: float = 5e-5
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup: int = 0  # linear learning-rate warm-up of the student, in iterations (TAD-SR: 5000)
    ema_rate: float = 0.999
    seed: int = 123456
    save_freq: int = 1000
    val_freq: int = 1000
    log_freq: int = 1
    keep_checkpoints: int = 2  # training checkpoints kept on disk (the newest ones)
    device: str = "auto"
    vq_dtype: str = "auto"  # VQ autoencoder precision: auto = fp16 on CUDA, fp32 elsewhere (RSD: fp16)
    num_workers: int = 4
    # our choice, not from a paper: a GT whose LR came out non-finite is dropped from the batch (RSD does this)
    drop_nonfinite: bool = True


@dataclass
class DataConfig:
    dirs: list[str] = field(default_factory=list)  # HR image folders (recursive)
    gt_size: int = 256
    paired_lq: str | None = None  # with paired_gt: train on fixed LQ/GT pairs instead of degrading on the fly
    paired_gt: str | None = None
    val_dir: str | None = None  # held-out pairs: <val_dir>/lr and <val_dir>/hr, matched by name
    val_images: int = 16  # at most this many validation pairs are scored
    # our choice, not from a paper: "batch" shares per-batch degradation choices across the per-rank batch as
    # Real-ESRGAN/RSD do; "sample" draws them per sample, which makes results independent of how the global
    # batch is split over ranks and micro-batches (then the pool is not needed)
    degradation_grouping: str = "batch"
    degradation: DegradationConfig = field(default_factory=DegradationConfig)


@dataclass
class RSDConfig:
    n_fake_loop: int = 5  # K fake updates per student update
    nodes: tuple[int, ...] = (
        3,
        7,
        10,
        14,
    )  # our choice (reference default): N = 4 evenly spaced, ending at T−1
    noise_channels: int = 1
    lpips_weight: float = 2.0
    gan_weight: float = 3e-3
    sid_normalization: bool = True
    # the ResShift-VSD baseline (Algorithm 2): stop gradients at the teacher/fake outputs
    stop_gradient_scores: bool = False
    # our choices (reference defaults), not from the paper:
    head_channels: int = 0  # discriminator head width (0 = the bottleneck width)
    fresh_lpips_noise: bool = True  # draw a new ε for the separate LPIPS forward at t = T


@dataclass
class TADSRConfig:
    reg_weight: float = 1.0
    hsd_weight: float = 1.0
    adv_weight: float = 0.02
    hsd_steps: tuple[int, ...] = (0, 1, 2)  # t_h drawn from these
    disc_steps: tuple[int, ...] = tuple(range(14))  # t_d drawn from these
    # "gaussian" (our default) or "uniform" (the released code's U[0,1) draw, quirk Q1)
    perturbation: str = "gaussian"
    disc_taps: tuple[str, ...] = (
        "input_blocks.3",
        "input_blocks.6",
        "input_blocks.9",
        "input_blocks.11",
        "middle_block",
    )
    disc_logits: int = 64  # c_dim of each 1-D head
    disc_lr: float = 5e-5


@dataclass
class YonosConfig:
    """YONOS-SR scale distillation (reference ``distillation.md`` §6). The paper states the stage chain (teacher at
    N/2 for the student at N), the x0-space losses, one-step DDIM inference and decoder fine-tuning on top of the
    frozen UNet; every other default here is our choice (§6.9), listed by ``choices_not_from_paper``.

    ``train.iterations`` is derived: len(stages) × stage_iterations + decoder_iterations.
    """

    base: str = "hf://stabilityai/stable-diffusion-2-base"  # our choice: SD 2 base (the paper's is unknown)
    stages: tuple[int, ...] = (2, 4)  # scale chain, each twice the previous; (2, 4, 8) with model.scale=8
    stage_iterations: int = 10000  # our choice: UNet iterations per stage
    decoder_iterations: int = 2000  # our choice: decoder fine-tuning iterations (0 = keep the base decoder)
    # our choice: v keeps x0 well conditioned at t = T (an ε-model divides by α_T ≈ 0.07 there); also epsilon,
    # sample (x0)
    prediction: str = "v_prediction"
    schedule: str = "base"  # our choice: the base's β schedule; "zero_snr" rescales it to α_T = 0
    # our choice: w(λ) on the x0 error: "snr_trunc" max(SNR, 1); "min_snr" min(SNR, gamma); "uniform" 1
    loss_weighting: str = "snr_trunc"
    min_snr_gamma: float = 5.0
    # our choice: t ~ U{0..T−1}; "terminal" trains only t = T−1 (the inference step)
    timesteps: str = "uniform"
    lr_upsample: str = "bicubic"  # our choice (§6.9): LR → HR size before the VAE encoder; or "bilinear"
    one_step_start: str = "noise"  # our choice (§6.9): z_T = ε; "lr" starts from α_T·z_lr + σ_T·ε
    # our choice: the teacher's ×N/2 LR is the same Real-ESRGAN degradation draw as the student's ×N LR
    shared_degradation: bool = True
    next_stage_from: str = "ema"  # our choice: a stage's student and teacher start from the previous EMA
    precision: str = "auto"  # our choice: autocast of UNet/VAE passes: auto = bf16 on CUDA, fp32 on CPU
    gradient_checkpointing: bool = False
    decoder_lr: float = 1e-5  # our choice
    decoder_l1_weight: float = 1.0  # our choice
    decoder_lpips_weight: float = 1.0  # our choice
    decoder_gan_weight: float = 0.0  # our choice: the optional patch GAN (hinge) is off by default
    decoder_gan_channels: int = 64  # our choice: PatchGAN width and depth (pix2pix's 64 / 3)
    decoder_gan_layers: int = 3
    empty_prompt: str = ""  # our choice: the fixed cross-attention context is the empty prompt's embedding
    latent_tile: int = 64  # inference tile in latents (SD: 512 HR px), the paper's patch size

    def validate(self) -> None:
        def one_of(name: str, allowed: tuple[str, ...]) -> None:
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"yonos.{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}"
                )

        if not self.stages or self.stages[0] < 2:
            raise ConfigError(f"yonos.stages must start at a scale >= 2, got {list(self.stages)}")
        for i in range(1, len(self.stages)):
            if self.stages[i] != 2 * self.stages[i - 1]:
                raise ConfigError(
                    f"yonos.stages {list(self.stages)}: each stage's teacher is the previous stage at half the "
                    "scale, so every scale must double the previous one"
                )
        if self.stage_iterations < 1 or self.decoder_iterations < 0:
            raise ConfigError("yonos.stage_iterations must be >= 1 and yonos.decoder_iterations >= 0")
        from sr1step.models.yonos import LR_UPSAMPLING, ONE_STEP_STARTS, PREDICTIONS, SCHEDULES

        one_of("prediction", PREDICTIONS)
        one_of("schedule", SCHEDULES)
        one_of("loss_weighting", ("snr_trunc", "min_snr", "uniform"))
        one_of("timesteps", ("uniform", "terminal"))
        one_of("lr_upsample", LR_UPSAMPLING)
        one_of("one_step_start", ONE_STEP_STARTS)
        one_of("next_stage_from", ("ema", "online"))
        one_of("precision", ("auto", "fp32", "bf16"))
        if self.schedule == "zero_snr" and self.prediction == "epsilon":
            raise ConfigError("yonos.schedule zero_snr needs prediction v_prediction or sample (α_T = 0)")
        if self.min_snr_gamma <= 0 or self.decoder_lr <= 0:
            raise ConfigError("yonos.min_snr_gamma and yonos.decoder_lr must be > 0")
        weights = (self.decoder_l1_weight, self.decoder_lpips_weight, self.decoder_gan_weight)
        if min(weights) < 0 or (self.decoder_iterations and not any(weights)):
            raise ConfigError("yonos.decoder_*_weight must be >= 0, and one > 0 when decoder_iterations > 0")
        if self.decoder_gan_channels < 1 or self.decoder_gan_layers < 1 or self.latent_tile < 1:
            raise ConfigError("yonos.decoder_gan_channels, decoder_gan_layers and latent_tile must be >= 1")

    @property
    def total_iterations(self) -> int:
        return len(self.stages) * self.stage_iterations + self.decoder_iterations


@dataclass
class DistillConfig:
    method: str = "rsd"
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rsd: RSDConfig = field(default_factory=RSDConfig)
    tadsr: TADSRConfig = field(default_factory=TADSRConfig)
    yonos: YonosConfig = field(default_factory=YonosConfig)

    @classmethod
    def for_method(cls, method: str) -> DistillConfig:
        """Defaults for a method (shared sections adjusted the way the method's released config has them)."""
        if method not in METHODS:
            raise ConfigError(f"unknown distillation method {method!r}; choose from {', '.join(METHODS)}")
        config = cls(method=method)
        if method == "tad-sr":
            config.train = TrainConfig(
                iterations=30000, batch=8, microbatch=8, betas=(0.9, 0.999), warmup=5000
            )
        elif method == "yonos-sr":
            config.model = ModelConfig(teacher="sd", teacher_weights="", vae="", scale=4)
            config.train = TrainConfig(
                batch=16, microbatch=4, betas=(0.9, 0.999), iterations=YonosConfig().total_iterations
            )
            config.data = DataConfig(gt_size=512)  # the paper's 512² HR crops (Fig. 2)
        return config

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(
                f"unknown distillation method {self.method!r}; choose from {', '.join(METHODS)}"
            )
        t = self.train
        if t.iterations < 1 or t.batch < 1 or t.microbatch < 1:
            raise ConfigError("train.iterations, train.batch and train.microbatch must be >= 1")
        if not 0 <= t.ema_rate < 1:
            raise ConfigError(f"train.ema_rate must be in [0, 1), got {t.ema_rate}")
        if t.save_freq < 1 or t.val_freq < 1 or t.log_freq < 1 or t.keep_checkpoints < 1:
            raise ConfigError("train.save_freq, val_freq, log_freq and keep_checkpoints must be >= 1")
        if t.vq_dtype not in ("auto", "fp16", "bf16", "fp32"):
            raise ConfigError(f"train.vq_dtype must be auto, fp16, bf16 or fp32, got {t.vq_dtype!r}")
        if self.data.degradation_grouping not in ("batch", "sample"):
            raise ConfigError("data.degradation_grouping must be 'batch' or 'sample'")
        if self.data.gt_size % self.model.scale:
            raise ConfigError(
                f"data.gt_size {self.data.gt_size} must be divisible by the scale {self.model.scale}"
            )
        if self.data.degradation.scale != self.model.scale:
            self.data.degradation = dataclasses.replace(self.data.degradation, scale=self.model.scale)
        if (self.data.paired_lq is None) != (self.data.paired_gt is None):
            raise ConfigError("data.paired_lq and data.paired_gt go together")
        if self.rsd.n_fake_loop < 1 or not self.rsd.nodes or any(not 0 <= n < 15 for n in self.rsd.nodes):
            raise ConfigError("rsd.n_fake_loop must be >= 1 and rsd.nodes steps of the 15-step schedule")
        if self.tadsr.perturbation not in ("gaussian", "uniform"):
            raise ConfigError("tadsr.perturbation must be 'gaussian' or 'uniform'")

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)


def choices_not_from_paper(method: str) -> list[str]:
    """The named fields whose defaults are sr1step's choice (the README lists them too)."""
    common = ["train.drop_nonfinite", "data.degradation_grouping"]
    per_method = {
        "rsd": ["rsd.nodes", "rsd.head_channels", "rsd.fresh_lpips_noise"],
        "tad-sr": ["tadsr.perturbation"],
        "yonos-sr": [
            "yonos.base",
            "yonos.stage_iterations",
            "yonos.decoder_iterations",
            "yonos.prediction",
            "yonos.schedule",
            "yonos.loss_weighting",
            "yonos.timesteps",
            "yonos.lr_upsample",
            "yonos.one_step_start",
            "yonos.shared_degradation",
            "yonos.next_stage_from",
            "yonos.precision",
            "yonos.decoder_lr",
            "yonos.decoder_l1_weight",
            "yonos.decoder_lpips_weight",
            "yonos.decoder_gan_weight",
            "yonos.decoder_gan_channels",
            "yonos.empty_prompt",
            "train.lr",
            "train.batch",
            "train.ema_rate",
        ],
    }
    return common + per_method.get(method, [])


# --------------------------------------------------------------------------------------------- (de)serialising


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _to_plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, tuple | list):
        return [_to_plain(v) for v in value]
    return value


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, globalns={**globals(), "DegradationConfig": DegradationConfig})


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Convert a TOML/YAML/JSON/--set value to the field's declared type, or raise a ConfigError naming it."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a table of settings")
        if hint is DegradationConfig:
            return DegradationConfig.from_dict(value)
        return _build(hint, value, where)
    if origin in (tuple, list):
        if isinstance(value, str):
            value = (
                [v for v in value.split(",") if v.strip()]
                if not value.strip().startswith("[")
                else json.loads(value)
            )
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        item = args[0] if args else Any
        return (tuple if origin is tuple else list)(_coerce(v, item, where) for v in value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if hint in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        try:
            number = hint(value)
        except (TypeError, ValueError):
            raise ConfigError(
                f"{where} must be {'an integer' if hint is int else 'a number'}, got {value!r}"
            ) from None
        if hint is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return number
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    return value


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    hints = _hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"unknown setting {where + '.' if where else ''}{unknown[0]} (known: {', '.join(sorted(known))})"
        )
    base = cls()
    for name, value in values.items():
        setattr(base, name, _coerce(value, hints[name], f"{where}.{name}" if where else name))
    return base


def merge(config: DistillConfig, values: dict[str, Any]) -> DistillConfig:
    """Apply a nested dict of settings (from a file) on top of ``config``."""
    hints = _hints(DistillConfig)
    for section, content in values.items():
        if section not in hints:
            raise ConfigError(f"unknown config section {section!r} (known: {', '.join(hints)})")
        current = getattr(config, section)
        if not dataclasses.is_dataclass(current):
            setattr(config, section, _coerce(content, hints[section], section))
            continue
        if not isinstance(content, dict):
            raise ConfigError(f"config section {section!r} must be a table")
        if isinstance(current, DegradationConfig):
            setattr(config, section, DegradationConfig.from_dict({**current.to_dict(), **content}))
            continue
        sub_hints = _hints(type(current))
        for key, value in content.items():
            if key not in sub_hints:
                raise ConfigError(f"unknown setting {section}.{key} (known: {', '.join(sorted(sub_hints))})")
            if isinstance(getattr(current, key), DegradationConfig):
                merged = {**getattr(current, key).to_dict(), **value} if isinstance(value, dict) else value
                setattr(current, key, _coerce(merged, sub_hints[key], f"{section}.{key}"))
            else:
                setattr(current, key, _coerce(value, sub_hints[key], f"{section}.{key}"))
    return config


def apply_override(config: DistillConfig, assignment: str) -> DistillConfig:
    """``section.key=value`` (``data.degradation.noise2=false`` reaches into the degradation config)."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects section.key=value, got {assignment!r}")
    path, raw = assignment.split("=", 1)
    parts = path.strip().split(".")
    if parts == ["method"]:
        config.method = raw.strip()
        return config
    if len(parts) < 2:
        raise ConfigError(f"--set {assignment!r}: name a setting as section.key")
    nested: Any = _parse_scalar(raw.strip())
    for part in reversed(parts[1:]):
        nested = {part: nested}
    return merge(config, {parts[0]: nested})


def _parse_scalar(text: str) -> Any:
    """JSON when it parses (numbers, true/false, lists, null), else the plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def load_file(path: Path) -> dict[str, Any]:
    """Read a TOML, YAML or JSON config file into a nested dict."""
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib  # type: ignore[no-redef]
            return tomllib.loads(text)
        if suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ModuleNotFoundError:
                raise ConfigError(
                    f"{path}: reading YAML needs PyYAML (pip install pyyaml), or use TOML/JSON"
                ) from None
            data = yaml.safe_load(text)
            return data or {}
        if suffix == ".json":
            return json.loads(text)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - parser errors of three libraries
        raise ConfigError(f"{path}: cannot parse config ({str(exc).splitlines()[0]})") from None
    raise ConfigError(f"{path}: unknown config format {suffix!r} (use .toml, .yaml or .json)")


def resolve_config(
    method: str,
    config_file: Path | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
) -> DistillConfig:
    """Method defaults → saved/base dict → file → --set overrides, validated."""
    config = DistillConfig.for_method(method)
    if base:
        config = merge(config, {k: v for k, v in base.items() if k != "method"})
    if config_file is not None:
        data = load_file(config_file)
        file_method = data.pop("method", method)
        if file_method != method:
            raise ConfigError(f"{config_file}: method {file_method!r} does not match --method {method!r}")
        config = merge(config, data)
    for assignment in overrides or []:
        config = apply_override(config, assignment)
        if config.method != method:
            raise ConfigError("the method is chosen with --method, not --set")
    config.validate()
    return config
