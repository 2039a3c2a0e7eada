"""What a client asks the server for (a :class:`Job`), the limits every job is checked against, and the result.

A job is untrusted input: everything a small request could inflate (steps, pixels, images, adapters,
prompt length) is bounded by :class:`ServeLimits`, and a job over a limit is refused with a
:class:`RequestLimitError` that names the limit, before it takes a queue slot.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath, PureWindowsPath

from ..errors import ConfigError, RequestLimitError
from ..generate import GeneratedImage
from ..prompt_tags import LoraTag, parse_lora_tags

__all__ = ["AdapterRef", "Job", "JobResult", "ServeLimits"]

_MAX_SEED = 2**64 - 1
_MAX_WEIGHT = 100.0  # far beyond any useful blend factor; bounds what a request can do to activations
_MAX_NAME = 1000  # characters of an adapter name (a relative path inside the adapter folders)
_MAX_SIDE = 16384  # pixels per side, whatever max_pixels allows (a 8 x 10^6 strip is a mistake, not an image)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _check_name(name: object) -> None:
    """An adapter name is a relative path without '..' (resolved, and checked again, inside the folders)."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError("loras: an adapter name must be a non-empty string")
    shown = ascii(name[:80])
    if len(name) > _MAX_NAME or _CONTROL.search(name):
        raise ConfigError(f"loras: adapter name {shown} is over {_MAX_NAME} characters or holds control characters")
    pure = PurePosixPath(name.replace("\\", "/"))
    if pure.is_absolute() or PureWindowsPath(name).drive or ".." in pure.parts:
        raise ConfigError(f"loras: adapter name {shown} must be a name or a relative path inside the adapter "
                          "folders, without '..'")


@dataclass(frozen=True)
class AdapterRef:
    """One adapter of a request's stack: a name inside the adapter folders (a file stem or a relative path,
    as in A1111's ``<lora:NAME:…>``), its weight, and optionally a different text-encoder weight."""

    name: str
    weight: float = 1.0
    text_encoder_weight: float | None = None

    def __post_init__(self) -> None:
        _check_name(self.name)
        for key in ("weight", "text_encoder_weight"):
            value = getattr(self, key)
            if value is None and key == "text_encoder_weight":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or abs(value) > _MAX_WEIGHT:
                raise ConfigError(f"loras[{self.name!r}].{key} must be a number from -{_MAX_WEIGHT:g} to "
                                  f"{_MAX_WEIGHT:g}, got {value!r}")

    @classmethod
    def from_tag(cls, tag: LoraTag) -> AdapterRef:
        return cls(tag.target, tag.weight, tag.text_encoder_weight)

    def as_tag(self) -> LoraTag:
        return LoraTag(self.name, float(self.weight),
                       None if self.text_encoder_weight is None else float(self.text_encoder_weight))


@dataclass(frozen=True)
class Job:
    """One generation request: ``count`` images of one prompt, image ``i`` with seed ``seed + i``.

    ``prompt`` may carry A1111 ``<lora:NAME:W>`` tags; they join ``loras`` (a tag naming an adapter
    already in ``loras`` replaces it). ``sampler``/``scheduler`` are A1111's names (None: the model's own
    scheduler). ``guidance`` is the CFG scale (None: the pipeline's default).
    """

    prompt: str
    negative_prompt: str = ""
    loras: Sequence[AdapterRef] = ()
    steps: int = 20
    guidance: float | None = None
    width: int | None = None
    height: int | None = None
    seed: int = 0
    count: int = 1
    sampler: str | None = None
    scheduler: str | None = None

    def __post_init__(self) -> None:
        for key in ("prompt", "negative_prompt"):
            if not isinstance(getattr(self, key), str):
                raise ConfigError(f"{key} must be a string, got {type(getattr(self, key)).__name__}")
        for key in ("steps", "seed", "count", "width", "height"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"{key} must be a whole number, got {value!r}")
        if isinstance(self.loras, (str, bytes)):
            raise ConfigError("loras must be a list of AdapterRef")
        # a tuple: a list the caller keeps could change after the limits were checked
        try:
            object.__setattr__(self, "loras", tuple(self.loras))
        except TypeError:
            raise ConfigError(f"loras must be a list of AdapterRef, got {type(self.loras).__name__}") from None
        if self.steps < 1 or self.count < 1:
            raise ConfigError(f"steps and count must be at least 1, got steps={self.steps}, count={self.count}")
        if not 0 <= self.seed <= _MAX_SEED - (self.count - 1):
            raise ConfigError(f"seed must be between 0 and {_MAX_SEED - (self.count - 1)}, got {self.seed}")
        for key in ("width", "height"):
            value = getattr(self, key)
            if value is not None and (value < 8 or value % 8 or value > _MAX_SIDE):
                raise ConfigError(f"{key} must be a positive multiple of 8 up to {_MAX_SIDE}, got {value}")
        g = self.guidance
        if g is not None and (isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g)
                              or not 0 <= g <= 100):
            raise ConfigError(f"guidance must be a number from 0 to 100, got {g!r}")
        if not all(isinstance(r, AdapterRef) for r in self.loras):
            raise ConfigError("loras must be a list of AdapterRef")
        for key in ("sampler", "scheduler"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or len(value) > 100):
                raise ConfigError(f"{key} must be a name (a string of at most 100 characters), got {value!r:.100}")

    def stack(self) -> tuple[str, tuple[AdapterRef, ...]]:
        """(prompt without tags, the adapter stack: ``loras`` then the prompt's tags, one entry per name)."""
        text, tags = parse_lora_tags(self.prompt)
        refs: dict[str, AdapterRef] = {r.name: r for r in self.loras}
        for tag in tags:
            refs[tag.target] = AdapterRef.from_tag(tag)
        return text, tuple(refs.values())


@dataclass(frozen=True)
class ServeLimits:
    """Per-request bounds and the queue's size. ``max_pixels`` None: 4× the model's native pixel count."""

    max_steps: int = 150
    max_pixels: int | None = None
    max_images: int = 16  # images per request (A1111's batch_size × n_iter)
    max_adapters: int = 8  # adapters per request
    max_prompt_chars: int = 4000
    max_queue: int = 64  # images waiting (beyond that: ServerBusyError, HTTP 429)

    def __post_init__(self) -> None:
        for key in ("max_steps", "max_images", "max_adapters", "max_prompt_chars", "max_queue"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"limits.{key} must be a whole number of at least 1, got {value!r}")
        if self.max_pixels is not None and (not isinstance(self.max_pixels, int) or self.max_pixels < 64):
            raise ConfigError(f"limits.max_pixels must be at least 64, got {self.max_pixels!r}")

    def check(self, job: Job, size: tuple[int, int], native: int) -> None:
        """Raise :class:`RequestLimitError` naming the first limit ``job`` (of ``size`` = (h, w)) exceeds."""
        for key, value in (("prompt", job.prompt), ("negative_prompt", job.negative_prompt)):
            if len(value) > self.max_prompt_chars:
                raise RequestLimitError(f"{key} has {len(value)} characters, over the limit of "
                                        f"{self.max_prompt_chars} (max_prompt_chars)")
        if job.steps > self.max_steps:
            raise RequestLimitError(f"steps {job.steps} is over the limit of {self.max_steps} (max_steps)")
        if job.count > self.max_images:
            raise RequestLimitError(f"{job.count} images in one request is over the limit of {self.max_images} "
                                    "(max_images; A1111's batch_size × n_iter)")
        if job.count > self.max_queue:  # would never fit the queue: a limit, not a busy server
            raise RequestLimitError(f"{job.count} images in one request is over the queue's size of "
                                    f"{self.max_queue} (max_queue)")
        limit = self.max_pixels or 4 * native * native
        if size[0] * size[1] > limit:
            raise RequestLimitError(f"height x width {size[0]}x{size[1]} is {size[0] * size[1]} pixels, over the "
                                    f"limit of {limit} (max_pixels)")
        if len(job.loras) > self.max_adapters:  # before the tags are parsed: duplicates count too
            raise RequestLimitError(f"{len(job.loras)} adapters in one request is over the limit of "
                                    f"{self.max_adapters} (max_adapters)")
        _, stack = job.stack()
        if len(stack) > self.max_adapters:
            raise RequestLimitError(f"{len(stack)} adapters in one request is over the limit of "
                                    f"{self.max_adapters} (max_adapters)")


@dataclass
class JobResult:
    """The images of one job, in seed order, each with its PNG ``parameters`` text."""

    images: list[GeneratedImage] = field(default_factory=list)

    @property
    def seeds(self) -> list[int]:
        return [image.seed for image in self.images]
