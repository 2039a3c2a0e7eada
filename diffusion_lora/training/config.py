"""The training configuration's schema: one frozen dataclass per TOML section, checked on construction.

``load_config("train.toml", ["train.steps=20"])`` reads a TOML file (or a nested mapping), applies
``section.key=value`` overrides and returns a :class:`TrainConfig`. The checking itself (unknown keys
with a did-you-mean suggestion, types, ranges, required keys; every error a
:class:`~diffusion_lora.errors.ConfigError` naming the dotted key) is :mod:`.typed_config`'s; this
module declares the sections, their ranges and the rules across settings. Nothing is silently
ignored or corrected. Closed sets are enums of strings, so TOML's plain strings are accepted and
``cfg.train.loss == "huber"`` holds.
"""

from __future__ import annotations

import enum
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from ..errors import ConfigError
from ..formats.detect import FileFormat
from ..models.loading import DEFAULT_MODEL
from ..models.quantize import Quantize
from .typed_config import ConfigRoot, Section, load, setting

__all__ = [
    "CacheSection", "CheckpointSection", "DataSection", "FileFormat", "LatentCache", "LogSection",
    "LoraSection", "Loss", "MixedPrecision", "ModelDtype", "ModelSection", "OptimizerName",
    "OptimizerSection", "OutputSection", "PriorSection", "Quantize", "SampleSection",
    "SchedulerName", "SchedulerSection", "TextCache", "TimestepSampling", "TrainConfig", "TrainSection",
    "load_config", "resolve_sizes",
]


class ModelDtype(enum.StrEnum):
    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"


class MixedPrecision(enum.StrEnum):
    NO = "no"
    FP16 = "fp16"
    BF16 = "bf16"


class Loss(enum.StrEnum):
    """Element-wise training loss (``train.loss``): squared error, or kohya's pseudo-Huber."""

    L2 = "l2"
    HUBER = "huber"


class TimestepSampling(enum.StrEnum):
    """How flow-matching noise levels σ are drawn (``train.timestep_sampling``); ``sigmoid`` is another
    name for ``logit_normal``."""

    UNIFORM = "uniform"
    SIGMOID = "sigmoid"
    LOGIT_NORMAL = "logit_normal"
    SHIFT = "shift"


class OptimizerName(enum.StrEnum):
    ADAMW = "adamw"
    ADAMW_8BIT = "adamw8bit"
    PRODIGY = "prodigy"


class SchedulerName(enum.StrEnum):
    CONSTANT = "constant"
    CONSTANT_WITH_WARMUP = "constant_with_warmup"
    LINEAR = "linear"
    COSINE = "cosine"


class LatentCache(enum.StrEnum):
    MEMORY = "memory"
    DISK = "disk"
    OFF = "off"


class TextCache(enum.StrEnum):
    AUTO = "auto"  # memory while the text encoder is frozen, off while it is trained
    MEMORY = "memory"
    DISK = "disk"
    OFF = "off"


class TextEncoders(enum.StrEnum):
    AUTO = "auto"  # free them after encoding every caption when nothing needs them any more
    FREE = "free"  # the same, and an error when something still needs them
    KEEP = "keep"


_SEED_MAX = 2**64 - 1  # torch.Generator's range
MAX_REPEATS = 10_000  # per image and epoch; more is a typo (or a hostile folder name), not a plan
# The adapter file <name>.safetensors is written through a temp file ".<name>.safetensors.<12 hex>.tmp",
# which must fit the usual 255-byte file-name limit.
_MAX_NAME_BYTES = 200
# Bucket limits a config leaves unset (kohya's defaults at 512 px), widened to hold the resolution.
_MIN_BUCKET, _MAX_BUCKET, _BUCKET_STEP = 256, 2048, 64


# ---------------------------------------------------------------- checks of single settings


def _nonempty(v: str) -> str | None:
    return "must not be empty" if not v.strip() else None


def _file_stem(v: str) -> str | None:
    if not v.strip() or v in (".", "..") or "/" in v or "\\" in v or "\0" in v:
        return f"{v!r} is not a file stem; use a plain name without path separators, e.g. \"my_style\""
    if len(v.encode("utf-8", "surrogatepass")) > _MAX_NAME_BYTES:
        return (f"is {len(v.encode('utf-8', 'surrogatepass'))} bytes long; file names are limited, so use at "
                f"most {_MAX_NAME_BYTES} bytes")
    return None


def _extension(v: str) -> str | None:
    return None if v.startswith(".") and len(v) > 1 else f"{v!r} must start with a dot, e.g. \".txt\""


def _one_tag(v: str) -> str | None:
    return f"{v!r} contains a comma; a trigger word is one tag" if "," in v else None


def _targets(v: str | list[str]) -> str | None:
    items = [v] if isinstance(v, str) else v
    if not items or any(not s.strip() for s in items):
        return "must be a preset name (auto, attn, attn-ff, all-linear, all) or a non-empty list of module names"
    return None


def _pair(v: list[float]) -> str | None:
    return None if len(v) == 2 else f"expected 2 values [beta1, beta2], got {len(v)}"


def _some(v: list[Any]) -> str | None:
    return "must hold at least one value" if not v else None


# ---------------------------------------------------------------- sections


_section = dataclass(frozen=True, kw_only=True)


@_section
class ModelSection(Section):
    SECTION: ClassVar[str] = "model"
    name: str = setting(DEFAULT_MODEL, check=_nonempty)
    dtype: ModelDtype = setting(ModelDtype.FLOAT32)
    # QLoRA: the denoiser's linear layers quantized at load ("nf4", "int8", "fp8"); unset or "none": not.
    quantize: Quantize | None = setting(None)

    def __post_init__(self) -> None:
        if isinstance(self.quantize, str) and self.quantize.strip().lower() == "none":  # TOML has no null
            object.__setattr__(self, "quantize", None)
        super().__post_init__()


@_section
class DataSection(Section):
    SECTION: ClassVar[str] = "data"
    path: str = setting(check=_nonempty, required_help="the folder of training images")
    instance_prompt: str = setting("")
    trigger_word: str = setting("", check=_one_tag)
    caption_extension: str = setting(".txt", check=_extension)
    # None: the model's native size, filled in once the model is loaded (resolve_sizes); the bucket
    # settings left None then follow the resolution.
    resolution: int | None = setting(None, ge=32, le=4096, multiple_of=8)
    buckets: bool = setting(True)
    bucket_step: int | None = setting(None, ge=8, le=512, multiple_of=8)
    min_bucket: int | None = setting(None, ge=8, le=8192)
    max_bucket: int | None = setting(None, ge=8, le=8192)
    no_upscale: bool = setting(False)
    center_crop: bool = setting(True)
    flip: bool = setting(False)
    caption_dropout: float = setting(0.0, ge=0, le=1)
    shuffle_captions: bool = setting(False)
    keep_tokens: int = setting(0, ge=0)
    repeats: int = setting(1, ge=1, le=MAX_REPEATS)
    skip_bad_images: bool = setting(False)
    # Paired data (Flux.1 Kontext / Control, ai-toolkit's convention): a folder of control (reference)
    # images with the targets' file stems; control_dir is another name for it.
    control_path: str = setting("")
    control_dir: str = setting("")
    allow_unpaired: bool = setting(False)  # Kontext: a target without a control trains as text-to-image
    mask_path: str = setting("")  # Flux.1 Fill: masks (white = repaint) with the targets' stems; unset: random boxes

    @property
    def control_folder(self) -> str:
        """``control_path``, or its other name ``control_dir``."""
        return self.control_path or self.control_dir


@_section
class PriorSection(Section):
    SECTION: ClassVar[str] = "prior"
    class_dir: str = setting("")
    class_prompt: str = setting("")
    weight: float = setting(1.0, ge=0)
    num_images: int = setting(0, ge=0)


@_section
class LoraSection(Section):
    SECTION: ClassVar[str] = "lora"
    rank: int = setting(16, ge=1, le=1024)
    alpha: float | None = setting(None, gt=0)
    # "auto": chosen from the model's family once it is loaded (training.recipe)
    targets: str | list[str] = setting("auto", check=_targets)
    text_encoder: bool = setting(False)
    use_dora: bool = setting(False)
    use_rslora: bool = setting(False)

    @property
    def effective_alpha(self) -> float:
        """``alpha``, or ``rank`` when it is unset."""
        return float(self.rank) if self.alpha is None else self.alpha


@_section
class TrainSection(Section):
    SECTION: ClassVar[str] = "train"
    # Unset (None): chosen from the model and the number of training images (training.recipe).
    steps: int | None = setting(None, ge=1)
    batch_size: int | None = setting(None, ge=1)
    gradient_accumulation: int = setting(1, ge=1)
    learning_rate: float | None = setting(None, gt=0)
    text_encoder_lr: float | None = setting(None, gt=0)
    seed: int = setting(0, ge=0, le=_SEED_MAX)
    mixed_precision: MixedPrecision = setting(MixedPrecision.NO)
    gradient_checkpointing: bool = setting(False)
    noise_offset: float = setting(0.0, ge=0)
    min_snr_gamma: float | None = setting(None, gt=0)
    loss: Loss = setting(Loss.L2)
    huber_delta: float = setting(0.1, gt=0)
    timestep_sampling: TimestepSampling = setting(TimestepSampling.UNIFORM)
    logit_mean: float = setting(0.0)
    logit_std: float = setting(1.0, gt=0)
    shift: float | None = setting(None, gt=0)
    zero_terminal_snr: bool = setting(False)
    guidance: float = setting(1.0, ge=0)
    max_grad_norm: float = setting(1.0, ge=0)
    # Steps whose loss or gradients are NaN/Inf that may be skipped (no update) before the run stops.
    max_nonfinite_steps: int = setting(0, ge=0)


@_section
class OptimizerSection(Section):
    SECTION: ClassVar[str] = "optimizer"
    name: OptimizerName = setting(OptimizerName.ADAMW)
    weight_decay: float = setting(1e-2, ge=0)
    betas: list[float] = setting(factory=lambda: [0.9, 0.999], gt=0, lt=1, check=_pair)
    eps: float = setting(1e-8, gt=0)
    # LoRA+ (kohya's names): the up factors (B) learn this many times faster than the down factors (A).
    # Unset = off. The denoiser uses loraplus_unet_lr_ratio, else loraplus_lr_ratio; the text encoders
    # loraplus_text_encoder_lr_ratio, else loraplus_lr_ratio (see optimizers.param_groups).
    loraplus_lr_ratio: float | None = setting(None, ge=1)
    loraplus_unet_lr_ratio: float | None = setting(None, ge=1)
    loraplus_text_encoder_lr_ratio: float | None = setting(None, ge=1)

    @property
    def loraplus_ratios(self) -> tuple[float | None, float | None]:
        """The LoRA+ ratio of the denoiser and of the text encoders (None: no LoRA+ for that part)."""
        return (self.loraplus_unet_lr_ratio or self.loraplus_lr_ratio,
                self.loraplus_text_encoder_lr_ratio or self.loraplus_lr_ratio)


@_section
class SchedulerSection(Section):
    SECTION: ClassVar[str] = "scheduler"
    name: SchedulerName = setting(SchedulerName.CONSTANT)
    warmup_steps: int = setting(0, ge=0)


@_section
class CacheSection(Section):
    SECTION: ClassVar[str] = "cache"
    latents: LatentCache = setting(LatentCache.MEMORY)
    text: TextCache = setting(TextCache.AUTO)
    text_encoders: TextEncoders = setting(TextEncoders.AUTO)
    dir: str = setting("")


@_section
class CheckpointSection(Section):
    SECTION: ClassVar[str] = "checkpoint"
    every: int = setting(0, ge=0)
    keep: int = setting(2, ge=1)


@_section
class SampleSection(Section):
    SECTION: ClassVar[str] = "sample"
    every: int = setting(0, ge=0)
    prompts: list[str] = setting(factory=list)
    seeds: list[int] = setting(factory=lambda: [0], ge=0, le=_SEED_MAX, check=_some)
    steps: int = setting(20, ge=1)
    guidance: float | None = setting(None, ge=0)
    width: int | None = setting(None, ge=8, le=8192, multiple_of=8)
    height: int | None = setting(None, ge=8, le=8192, multiple_of=8)


@_section
class OutputSection(Section):
    SECTION: ClassVar[str] = "output"
    dir: str = setting(check=_nonempty, required_help="the folder the LoRA, checkpoints and samples go to")
    name: str = setting("lora", check=_file_stem)
    save_format: FileFormat = setting(FileFormat.DIFFUSERS)


@_section
class LogSection(Section):
    SECTION: ClassVar[str] = "log"
    tensorboard: bool = setting(True)
    every: int = setting(10, ge=1)


@dataclass(frozen=True, kw_only=True)
class TrainConfig(ConfigRoot):
    """A whole training run's settings; construction checks every section and the cross-field rules."""

    model: ModelSection
    data: DataSection
    prior: PriorSection = field(default_factory=PriorSection)
    lora: LoraSection = field(default_factory=LoraSection)
    train: TrainSection = field(default_factory=TrainSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    scheduler: SchedulerSection = field(default_factory=SchedulerSection)
    cache: CacheSection = field(default_factory=CacheSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    sample: SampleSection = field(default_factory=SampleSection)
    output: OutputSection
    log: LogSection = field(default_factory=LogSection)

    def check(self) -> None:
        """The rules across settings (see :func:`_cross_check`)."""
        _cross_check(self)

    @property
    def text_cache(self) -> TextCache:
        """``cache.text`` with ``auto`` resolved: memory while the text encoder is frozen, else off."""
        if self.cache.text is not TextCache.AUTO:
            return self.cache.text
        return TextCache.OFF if self.lora.text_encoder else TextCache.MEMORY

    @property
    def cache_dir(self) -> str:
        """``cache.dir``, or ``<output.dir>/cache`` when it is empty."""
        return self.cache.dir or os.path.join(self.output.dir, "cache")


def _cross_check(cfg: TrainConfig) -> None:
    t = cfg.train
    _check_buckets(cfg.data)
    if cfg.data.control_path and cfg.data.control_dir:
        raise ConfigError("data.control_dir: another name for data.control_path, and both are set; keep one")
    if cfg.prior.num_images > 0 and not cfg.prior.class_prompt.strip():
        raise ConfigError(f"prior.class_prompt: required when prior.num_images > 0 (it is "
                          f"{cfg.prior.num_images}); set it, e.g. \"a photo of a dog\", or set prior.num_images = 0")
    if cfg.sample.every > 0 and not cfg.sample.prompts:
        raise ConfigError(f"sample.prompts: empty while sample.every = {cfg.sample.every}; add at least one "
                          "prompt or set sample.every = 0")
    if t.steps is not None and cfg.scheduler.warmup_steps >= t.steps:
        raise ConfigError(f"scheduler.warmup_steps: {cfg.scheduler.warmup_steps} must be smaller than "
                          f"train.steps ({t.steps})")
    if cfg.lora.text_encoder and cfg.cache.text in (TextCache.MEMORY, TextCache.DISK):
        raise ConfigError(f"cache.text: {cfg.cache.text.value!r} cannot be used with lora.text_encoder = true "
                          "(a trained text encoder's outputs change every step); set cache.text to \"auto\" "
                          "or \"off\"")
    _check_loraplus(cfg)
    if t.text_encoder_lr is not None and not cfg.lora.text_encoder:
        raise ConfigError("train.text_encoder_lr: set while lora.text_encoder = false, so it would be ignored; "
                          "set lora.text_encoder = true or remove train.text_encoder_lr")


def _check_loraplus(cfg: TrainConfig) -> None:
    o = cfg.optimizer
    keys = [k for k in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")
            if getattr(o, k) is not None]
    if keys and o.name is OptimizerName.PRODIGY:
        # Prodigy estimates one step size for all groups from their updates; a fixed B/A ratio on top
        # is not what LoRA+ prescribes (kohya warns it is meaningless), so refuse instead of guessing.
        raise ConfigError(f"optimizer.{keys[0]}: LoRA+ needs a fixed learning rate, and optimizer.name = prodigy "
                          "sets its own; use optimizer.name = \"adamw\" (or adamw8bit) or remove the LoRA+ ratio")
    if o.loraplus_text_encoder_lr_ratio is not None and not cfg.lora.text_encoder:
        raise ConfigError("optimizer.loraplus_text_encoder_lr_ratio: set while lora.text_encoder = false, so it "
                          "would be ignored; set lora.text_encoder = true or remove it")


def _check_buckets(d: DataSection) -> None:
    """Only the bucket settings the config sets are checked against each other; unset ones follow."""
    res, step = d.resolution, d.bucket_step
    if d.min_bucket is not None and d.max_bucket is not None and d.min_bucket > d.max_bucket:
        raise ConfigError(f"data.min_bucket: {d.min_bucket} is larger than data.max_bucket ({d.max_bucket})")
    if res is not None and d.min_bucket is not None and d.min_bucket > res:
        raise ConfigError(f"data.min_bucket: {d.min_bucket} is larger than data.resolution ({res}); "
                          f"lower data.min_bucket to at most {res}")
    if res is not None and d.max_bucket is not None and res > d.max_bucket:
        raise ConfigError(f"data.max_bucket: {d.max_bucket} is smaller than data.resolution ({res}); "
                          f"raise data.max_bucket to at least {res}")
    if step is None:
        return
    for key, value in (("resolution", res), ("min_bucket", d.min_bucket), ("max_bucket", d.max_bucket)):
        if value is not None and value % step:
            raise ConfigError(f"data.{key}: {value} is not a multiple of data.bucket_step ({step}); "
                              f"use a multiple of {step} or change data.bucket_step")


def resolve_sizes(cfg: TrainConfig, native: int) -> TrainConfig:
    """``cfg`` with every size concrete: ``data.resolution`` (unset: ``native``, the model's own image
    size) and the bucket settings left unset, which follow the resolution: ``bucket_step`` 64 (or the
    largest power of two ≤ 64 dividing the resolution), ``min_bucket`` 256 and ``max_bucket`` 2048 (the
    usual values at 512 px), widened to include the resolution. Settings the config gives are kept, and
    one that contradicts the resolution is a ConfigError naming both."""
    d = cfg.data
    res = d.resolution if d.resolution is not None else native
    step = d.bucket_step if d.bucket_step is not None else math.gcd(res, _BUCKET_STEP)
    low = d.min_bucket if d.min_bucket is not None else min(_MIN_BUCKET, res)
    high = d.max_bucket if d.max_bucket is not None else max(_MAX_BUCKET, res)
    try:
        data = replace(d, resolution=res, bucket_step=step, min_bucket=low, max_bucket=high)
        return replace(cfg, data=data)
    except ConfigError as e:
        if d.resolution is not None:
            raise
        raise ConfigError(f"{e} (data.resolution is not set, so it is the model's native size, {res})") from None


def load_config(source: str | os.PathLike[str] | Mapping[str, Any], overrides: Sequence[str] = ()) -> TrainConfig:
    """A checked :class:`TrainConfig` from a TOML file path or a nested mapping, after ``overrides``
    (``"section.key=value"``, the value parsed as TOML or taken as a bare string) are applied."""
    return load(TrainConfig, source, overrides)
