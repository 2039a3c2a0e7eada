"""Training configuration: one frozen dataclass per TOML section, checked on construction.

``load_config("train.toml", ["train.steps=20"])`` reads a TOML file (or a nested mapping), applies
``section.key=value`` overrides and returns a :class:`TrainConfig`. Every problem is a
:class:`~diffusion_lora.errors.ConfigError` that names the dotted key: an unknown key (with a
did-you-mean suggestion), a wrong type (``bool`` is not an integer; an integer is a fine float), a
value out of range, a missing required key, or two settings that contradict each other. Nothing is
silently ignored or corrected. Closed sets are ``StrEnum``s, so TOML's plain strings are accepted and
``cfg.train.loss == "huber"`` holds.
"""

from __future__ import annotations

import difflib
import enum
import functools
import math
import os
import tomllib
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar, get_args, get_origin, get_type_hints

from ..errors import ConfigError
from ..models.loading import DEFAULT_MODEL

__all__ = [
    "FLAG_KEYS", "CacheSection", "CheckpointSection", "DataSection", "LatentCache", "LogSection",
    "LoraSection", "Loss", "MixedPrecision", "ModelDtype", "ModelSection", "OptimizerName",
    "OptimizerSection", "OutputSection", "PriorSection", "SampleSection", "SaveFormat",
    "SchedulerName", "SchedulerSection", "TextCache", "TimestepSampling", "TrainConfig", "TrainSection",
    "flags_to_overrides", "load_config", "resolve_sizes", "with_overrides",
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
    L2 = "l2"
    HUBER = "huber"


class TimestepSampling(enum.StrEnum):
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


class SaveFormat(enum.StrEnum):
    DIFFUSERS = "diffusers"
    KOHYA = "kohya"
    COMFYUI = "comfyui"


# CLI flag name -> the dotted key it sets.
FLAG_KEYS: Mapping[str, str] = types.MappingProxyType({
    "model": "model.name", "data": "data.path", "out": "output.dir", "steps": "train.steps",
    "rank": "lora.rank", "lr": "train.learning_rate", "resolution": "data.resolution",
    "batch_size": "train.batch_size", "seed": "train.seed",
})

_SEED_MAX = 2**64 - 1  # torch.Generator's range
MAX_REPEATS = 10_000  # per image and epoch; more is a typo (or a hostile folder name), not a plan
# The adapter file <name>.safetensors is written through a temp file ".<name>.safetensors.<12 hex>.tmp",
# which must fit the usual 255-byte file-name limit.
_MAX_NAME_BYTES = 200
# Bucket limits a config leaves unset (kohya's defaults at 512 px), widened to hold the resolution.
_MIN_BUCKET, _MAX_BUCKET, _BUCKET_STEP = 256, 2048, 64


# ---------------------------------------------------------------- field rules


@dataclass(frozen=True)
class _Rule:
    """Range of a numeric field (applied to each element of a list) plus an optional whole-value check
    that returns a problem description or None."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    multiple_of: int | None = None
    check: Callable[[Any], str | None] | None = None
    required_help: str = ""

    def bounds(self) -> str:
        parts = [f"{op} {b}" for op, b in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
                 if b is not None]
        return " and ".join(parts)


def _f(default: Any = MISSING, *, factory: Any = MISSING, **rule: Any) -> Any:
    """A dataclass field with a :class:`_Rule`; no default and no factory means required."""
    return field(default=default, default_factory=factory, metadata={"rule": _Rule(**rule)})


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
        return "must be a preset name (attn, attn-ff, all-linear) or a non-empty list of module names"
    return None


def _pair(v: list[float]) -> str | None:
    return None if len(v) == 2 else f"expected 2 values [beta1, beta2], got {len(v)}"


def _some(v: list[Any]) -> str | None:
    return "must hold at least one value" if not v else None


# ---------------------------------------------------------------- sections


class _Section:
    """Base of the section dataclasses: coerces and checks every field after construction."""

    SECTION: ClassVar[str]

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in fields(self):  # type: ignore[arg-type]
            key = f"{self.SECTION}.{f.name}"
            value = _convert(getattr(self, f.name), hints[f.name], key)
            object.__setattr__(self, f.name, value)
            _check_rule(value, f.metadata["rule"], key)


_section = dataclass(frozen=True, kw_only=True)


@_section
class ModelSection(_Section):
    SECTION: ClassVar[str] = "model"
    name: str = _f(DEFAULT_MODEL, check=_nonempty)
    dtype: ModelDtype = _f(ModelDtype.FLOAT32)


@_section
class DataSection(_Section):
    SECTION: ClassVar[str] = "data"
    path: str = _f(check=_nonempty, required_help="the folder of training images")
    instance_prompt: str = _f("")
    trigger_word: str = _f("", check=_one_tag)
    caption_extension: str = _f(".txt", check=_extension)
    # None: the model's native size, filled in once the model is loaded (resolve_sizes); the bucket
    # settings left None then follow the resolution.
    resolution: int | None = _f(None, ge=32, le=4096, multiple_of=8)
    buckets: bool = _f(True)
    bucket_step: int | None = _f(None, ge=8, le=512, multiple_of=8)
    min_bucket: int | None = _f(None, ge=8, le=8192)
    max_bucket: int | None = _f(None, ge=8, le=8192)
    no_upscale: bool = _f(False)
    center_crop: bool = _f(True)
    flip: bool = _f(False)
    caption_dropout: float = _f(0.0, ge=0, le=1)
    shuffle_captions: bool = _f(False)
    keep_tokens: int = _f(0, ge=0)
    repeats: int = _f(1, ge=1, le=MAX_REPEATS)
    skip_bad_images: bool = _f(False)


@_section
class PriorSection(_Section):
    SECTION: ClassVar[str] = "prior"
    class_dir: str = _f("")
    class_prompt: str = _f("")
    weight: float = _f(1.0, ge=0)
    num_images: int = _f(0, ge=0)


@_section
class LoraSection(_Section):
    SECTION: ClassVar[str] = "lora"
    rank: int = _f(16, ge=1, le=1024)
    alpha: float | None = _f(None, gt=0)
    targets: str | list[str] = _f("attn", check=_targets)
    text_encoder: bool = _f(False)
    use_dora: bool = _f(False)
    use_rslora: bool = _f(False)

    @property
    def effective_alpha(self) -> float:
        """``alpha``, or ``rank`` when it is unset."""
        return float(self.rank) if self.alpha is None else self.alpha


@_section
class TrainSection(_Section):
    SECTION: ClassVar[str] = "train"
    steps: int = _f(500, ge=1)
    batch_size: int = _f(1, ge=1)
    gradient_accumulation: int = _f(1, ge=1)
    learning_rate: float = _f(1e-4, gt=0)
    text_encoder_lr: float | None = _f(None, gt=0)
    seed: int = _f(0, ge=0, le=_SEED_MAX)
    mixed_precision: MixedPrecision = _f(MixedPrecision.NO)
    gradient_checkpointing: bool = _f(False)
    noise_offset: float = _f(0.0, ge=0)
    min_snr_gamma: float | None = _f(None, gt=0)
    loss: Loss = _f(Loss.L2)
    huber_delta: float = _f(0.1, gt=0)
    timestep_sampling: TimestepSampling = _f(TimestepSampling.UNIFORM)
    logit_mean: float = _f(0.0)
    logit_std: float = _f(1.0, gt=0)
    shift: float | None = _f(None, gt=0)
    zero_terminal_snr: bool = _f(False)
    guidance: float = _f(1.0, ge=0)
    max_grad_norm: float = _f(1.0, ge=0)
    # Steps whose loss or gradients are NaN/Inf that may be skipped (no update) before the run stops.
    max_nonfinite_steps: int = _f(0, ge=0)


@_section
class OptimizerSection(_Section):
    SECTION: ClassVar[str] = "optimizer"
    name: OptimizerName = _f(OptimizerName.ADAMW)
    weight_decay: float = _f(1e-2, ge=0)
    betas: list[float] = _f(factory=lambda: [0.9, 0.999], gt=0, lt=1, check=_pair)
    eps: float = _f(1e-8, gt=0)


@_section
class SchedulerSection(_Section):
    SECTION: ClassVar[str] = "scheduler"
    name: SchedulerName = _f(SchedulerName.CONSTANT)
    warmup_steps: int = _f(0, ge=0)


@_section
class CacheSection(_Section):
    SECTION: ClassVar[str] = "cache"
    latents: LatentCache = _f(LatentCache.MEMORY)
    text: TextCache = _f(TextCache.AUTO)
    dir: str = _f("")


@_section
class CheckpointSection(_Section):
    SECTION: ClassVar[str] = "checkpoint"
    every: int = _f(0, ge=0)
    keep: int = _f(2, ge=1)


@_section
class SampleSection(_Section):
    SECTION: ClassVar[str] = "sample"
    every: int = _f(0, ge=0)
    prompts: list[str] = _f(factory=list)
    seeds: list[int] = _f(factory=lambda: [0], ge=0, le=_SEED_MAX, check=_some)
    steps: int = _f(20, ge=1)
    guidance: float | None = _f(None, ge=0)
    width: int | None = _f(None, ge=8, le=8192, multiple_of=8)
    height: int | None = _f(None, ge=8, le=8192, multiple_of=8)


@_section
class OutputSection(_Section):
    SECTION: ClassVar[str] = "output"
    dir: str = _f(check=_nonempty, required_help="the folder the LoRA, checkpoints and samples go to")
    name: str = _f("lora", check=_file_stem)
    save_format: SaveFormat = _f(SaveFormat.DIFFUSERS)


@_section
class LogSection(_Section):
    SECTION: ClassVar[str] = "log"
    tensorboard: bool = _f(True)
    every: int = _f(10, ge=1)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
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

    def __post_init__(self) -> None:
        for name, cls in _section_types().items():
            value = getattr(self, name)
            if not isinstance(value, cls):
                raise ConfigError(f"{name}: expected a {cls.__name__}, got {_show(value)}")
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

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Nested plain data (enums as strings, unset optional values left out): JSON- and TOML-able."""
        return {
            f.name: {k.name: _plain(v) for k in fields(s) if (v := getattr(s, k.name)) is not None}
            for f in fields(self) for s in [getattr(self, f.name)]
        }

    def to_toml(self) -> str:
        """A TOML document that loads back to an equal config."""
        blocks = [
            "\n".join([f"[{name}]"] + [f"{k} = {_toml_value(v)}" for k, v in body.items()])
            for name, body in self.to_dict().items()
        ]
        return "\n\n".join(blocks) + "\n"


def _cross_check(cfg: TrainConfig) -> None:
    t = cfg.train
    _check_buckets(cfg.data)
    if cfg.prior.num_images > 0 and not cfg.prior.class_prompt.strip():
        raise ConfigError(f"prior.class_prompt: required when prior.num_images > 0 (it is "
                          f"{cfg.prior.num_images}); set it, e.g. \"a photo of a dog\", or set prior.num_images = 0")
    if cfg.sample.every > 0 and not cfg.sample.prompts:
        raise ConfigError(f"sample.prompts: empty while sample.every = {cfg.sample.every}; add at least one "
                          "prompt or set sample.every = 0")
    if cfg.scheduler.warmup_steps >= t.steps:
        raise ConfigError(f"scheduler.warmup_steps: {cfg.scheduler.warmup_steps} must be smaller than "
                          f"train.steps ({t.steps})")
    if cfg.lora.text_encoder and cfg.cache.text in (TextCache.MEMORY, TextCache.DISK):
        raise ConfigError(f"cache.text: {cfg.cache.text.value!r} cannot be used with lora.text_encoder = true "
                          "(a trained text encoder's outputs change every step); set cache.text to \"auto\" "
                          "or \"off\"")
    if t.text_encoder_lr is not None and not cfg.lora.text_encoder:
        raise ConfigError("train.text_encoder_lr: set while lora.text_encoder = false, so it would be ignored; "
                          "set lora.text_encoder = true or remove train.text_encoder_lr")


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
        data = DataSection(**{**_values(d), "resolution": res, "bucket_step": step, "min_bucket": low,
                              "max_bucket": high})
        return TrainConfig(**{**_values(cfg), "data": data})
    except ConfigError as e:
        if d.resolution is not None:
            raise
        raise ConfigError(f"{e} (data.resolution is not set, so it is the model's native size, {res})") from None


def _values(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in fields(obj)}


# ---------------------------------------------------------------- types and ranges


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


@functools.cache
def _section_types() -> dict[str, type[_Section]]:
    hints = _hints(TrainConfig)
    return {f.name: hints[f.name] for f in fields(TrainConfig)}


_NOUNS = {bool: ("a boolean (true or false)", "booleans"), int: ("an integer", "integers"),
          float: ("a number", "numbers"), str: ("a string", "strings")}


def _describe(hint: Any) -> str:
    if get_origin(hint) is types.UnionType:
        return " or ".join(_describe(a) for a in get_args(hint) if a is not type(None))
    if get_origin(hint) is list:
        return "a list of " + _NOUNS[get_args(hint)[0]][1]
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in hint)
    return _NOUNS[hint][0]


def _show(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _convert(value: Any, hint: Any, key: str) -> Any:
    """``value`` as ``hint`` (ints become floats, strings become enum members), or a ConfigError."""
    origin = get_origin(hint)
    if origin is types.UnionType:
        return _convert_union(value, hint, key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_describe(hint)}, got {_show(value)}")
        return [_convert(v, get_args(hint)[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return _convert_enum(value, hint, key)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{key}: {value!r} is not a finite number")
        return number
    if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return str(value) if hint is str else value
    raise ConfigError(f"{key}: expected {_describe(hint)}, got {_show(value)}")


def _convert_union(value: Any, hint: Any, key: str) -> Any:
    args = get_args(hint)
    if value is None and type(None) in args:
        return None
    for arg in args:
        is_list = get_origin(arg) is list
        if is_list and isinstance(value, (list, tuple)):
            return _convert(value, arg, key)  # its element errors are the useful ones
        if arg is not type(None) and not is_list:
            try:
                return _convert(value, arg, key)
            except ConfigError:
                pass
    raise ConfigError(f"{key}: expected {_describe(hint)}, got {_show(value)}")


def _convert_enum(value: Any, hint: type[enum.Enum], key: str) -> enum.Enum:
    if isinstance(value, hint):
        return value
    if isinstance(value, str):
        try:
            return hint(value)
        except ValueError:
            raise ConfigError(f"{key}: expected {_describe(hint)}, got {value!r}"
                              f"{_did_you_mean(value, [m.value for m in hint], listing='', cutoff=0.5)}") from None
    raise ConfigError(f"{key}: expected {_describe(hint)}, got {_show(value)}")


def _check_rule(value: Any, rule: _Rule, key: str) -> None:
    if value is None:
        return
    if rule.check is not None and (problem := rule.check(value)):
        raise ConfigError(f"{key}: {problem}")
    items = enumerate(value) if isinstance(value, list) else [(None, value)]
    for i, v in items:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        k = key if i is None else f"{key}[{i}]"
        if ((rule.ge is not None and v < rule.ge) or (rule.gt is not None and v <= rule.gt)
                or (rule.le is not None and v > rule.le) or (rule.lt is not None and v >= rule.lt)):
            raise ConfigError(f"{k}: {v!r} is out of range; expected a value {rule.bounds()}")
        if rule.multiple_of and v % rule.multiple_of:
            raise ConfigError(f"{k}: {v!r} is not a multiple of {rule.multiple_of}")


def _did_you_mean(word: str, options: Iterable[str], listing: str = "choose from", cutoff: float = 0.6) -> str:
    """``"; did you mean X?"`` for the closest option, else ``"; <listing> a, b, c"`` (nothing if no listing)."""
    options = list(options)
    close = difflib.get_close_matches(word, options, n=1, cutoff=cutoff)
    if close:
        return f"; did you mean {close[0]}?"
    return f"; {listing} {', '.join(options)}" if listing else ""


# ---------------------------------------------------------------- loading


def load_config(source: str | os.PathLike[str] | Mapping[str, Any], overrides: Sequence[str] = ()) -> TrainConfig:
    """A checked :class:`TrainConfig` from a TOML file path or a nested mapping, after ``overrides``
    (``"section.key=value"``, the value parsed as TOML or taken as a bare string) are applied."""
    raw = _read(source)
    for text in overrides:
        section, key, value = _parse_override(text)
        body = raw.setdefault(section, {})
        if not isinstance(body, dict):
            raise ConfigError(f"{section}: expected a table ([{section}]), got {_show(body)}")
        body[key] = value
    return _from_mapping(raw)


def with_overrides(cfg: TrainConfig, overrides: Sequence[str]) -> TrainConfig:
    """``cfg`` with ``section.key=value`` overrides applied and everything checked again."""
    return load_config(cfg.to_dict(), overrides)


def flags_to_overrides(flags: Mapping[str, Any]) -> list[str]:
    """Override strings for named CLI flags (:data:`FLAG_KEYS`); flags whose value is None are skipped.
    A string value is passed as typed on the command line; other values are written as TOML."""
    out = []
    for flag, value in flags.items():
        if flag not in FLAG_KEYS:
            raise ConfigError(f"--{flag}: unknown flag{_did_you_mean(flag, FLAG_KEYS)}")
        if value is not None:
            out.append(f"{FLAG_KEYS[flag]}={value if isinstance(value, str) else _toml_value(value)}")
    return out


def _read(source: Any) -> dict[str, Any]:
    if isinstance(source, Mapping):
        return {k: dict(v) if isinstance(v, Mapping) else v for k, v in source.items()}
    if not isinstance(source, (str, os.PathLike)):
        raise ConfigError(f"config: expected a TOML file path or a mapping, got {_show(source)}")
    path = os.fspath(source)
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: invalid TOML: the file is not UTF-8 text") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file: {e.strerror or e}") from None


def _section_class(section: Any) -> type[_Section]:
    types_ = _section_types()
    if section not in types_:
        raise ConfigError(f"{section}: unknown section{_did_you_mean(str(section), types_, 'valid sections are')}")
    return types_[section]


def _field_of(cls: type[_Section], key: Any) -> Any:
    known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    if key not in known:
        hint = _did_you_mean(str(key), known, listing="valid keys are")
        raise ConfigError(f"{cls.SECTION}.{key}: unknown key{hint}")
    return known[key]


def _from_mapping(raw: Mapping[str, Any]) -> TrainConfig:
    sections: dict[str, Any] = {}
    for name in raw:
        _section_class(name)
    for name, cls in _section_types().items():
        body = raw.get(name, {})
        if not isinstance(body, Mapping):
            raise ConfigError(f"{name}: expected a table ([{name}]), got {_show(body)}")
        for key in body:
            _field_of(cls, key)
        for f in fields(cls):  # type: ignore[arg-type]
            if f.default is MISSING and f.default_factory is MISSING and f.name not in body:
                raise ConfigError(f"{name}.{f.name}: required key is missing; set it to "
                                  f"{f.metadata['rule'].required_help}")
        sections[name] = cls(**body)
    return TrainConfig(**sections)


def _parse_override(text: str) -> tuple[str, str, Any]:
    dotted, eq, value_text = text.partition("=")
    section, dot, key = dotted.strip().partition(".")
    if not eq or not dot or not section or not key or "." in key:
        raise ConfigError(f"override {text!r}: expected section.key=value, e.g. train.steps=20")
    try:
        _field_of(_section_class(section), key)
    except ConfigError as e:
        raise ConfigError(f"{e} (in override {text!r})") from None
    hint = _hints(_section_class(section))[key]
    return section, key, _parse_value(value_text.strip(), hint)


def _parse_value(text: str, hint: Any) -> Any:
    """A TOML value; text that is not one, or that a string setting would reject as another type
    (``output.name=2024``), is taken as a bare string."""
    try:
        doc = tomllib.loads(f"v = {text}")
    except tomllib.TOMLDecodeError:
        return text
    if set(doc) != {"v"}:
        return text
    value = doc["v"]
    accepts = get_args(hint) if get_origin(hint) is types.UnionType else (hint,)
    wants_str = any(a is str or (isinstance(a, type) and issubclass(a, enum.Enum)) for a in accepts)
    if wants_str and not isinstance(value, (str, list)):
        return text
    return value


# ---------------------------------------------------------------- TOML writing


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, str):
        return '"' + "".join(
            _ESCAPES.get(c) or (f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c) for c in value
        ) + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {_show(value)} as TOML")
