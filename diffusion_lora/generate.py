"""Text-to-image generation with stacked adapters, A1111 ``<lora:…>`` prompt tags and PNG parameters.

Each image gets its own seed (``seed + index``), so the same seed always gives the same pixels, and
its PNG carries the generation parameters in a ``parameters`` text chunk the way AUTOMATIC1111 writes
them, so UIs and sharing sites can read them back.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, PngImagePlugin
from tqdm.auto import tqdm

from .adapters import list_loras, set_weights
from .errors import ConfigError, FormatError
from .families import detect_family
from .formats.atomic import atomic_write_bytes, write_new_file
from .formats.hashes import addnet_hash, legacy_hash
from .models.image_inputs import image_inputs
from .models.invoke import call_parameters, check_image_inputs, pipeline_name, run_pipeline
from .models.loading import native_size
from .models.samplers import choose, infotext_fields, parse_names, swapped_scheduler
from .prompt_tags import LoraTag, parse_lora_tags, resolve_tag, tag_weight

__all__ = ["GeneratedImage", "GenerationSettings", "ImageFolder", "LoraTag", "generate", "iter_generate",
           "parse_lora_tags"]

logger = logging.getLogger(__name__)

_MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 64-bit seeds
_MAX_GUIDANCE = 100.0  # far above any useful CFG scale (A1111's slider stops at 30)
_AREA_FACTOR = 16  # default size limit: 16x the model's native pixel count (4x each side) ...
_MIN_PIXEL_LIMIT = 2048 * 2048  # ... but never below 2048x2048, so small and tiny models may render big


@dataclass
class GenerationSettings:
    """What one ``generate`` call asks for; sizes in pixels, ``guidance`` is the CFG scale.

    ``max_pixels`` bounds ``height × width`` (default: 16× the model's native pixel count, at least
    2048²), so a typo cannot ask for an image that exhausts memory.
    """

    prompts: Sequence[str]
    negative_prompt: str | None = None
    steps: int = 20
    guidance: float | None = None
    seed: int = 0
    height: int | None = None
    width: int | None = None
    num_images: int = 1
    loras: Mapping[str, float] = field(default_factory=dict)  # name -> weight, always applied
    lora_dirs: Sequence[str] = ()
    max_pixels: int | None = None
    # the variant's image inputs (Flux.1 Kontext: image; Fill: image and mask_image; Control:
    # control_image), each a path or a PIL image
    image: Any = None
    mask_image: Any = None
    control_image: Any = None
    # A1111's sampler and schedule type names (``Euler a``, ``DPM++ 2M``, ``DPM++ 2M Karras``; ``Karras``,
    # ``Exponential``); None: the pipeline's own scheduler
    sampler: str | None = None
    scheduler: str | None = None

    def image_inputs(self) -> dict[str, Any]:
        """The image inputs that are given, by pipeline argument name."""
        given = {"image": self.image, "mask_image": self.mask_image, "control_image": self.control_image}
        return {k: v for k, v in given.items() if v is not None}

    def __post_init__(self) -> None:
        if isinstance(self.prompts, str) or not self.prompts:
            raise ConfigError("prompts: give a list of at least one prompt")
        for i, prompt in enumerate(self.prompts):
            _check_text(f"prompts[{i}]", prompt)
        if self.negative_prompt is not None:
            _check_text("negative_prompt", self.negative_prompt)
        for key in ("steps", "num_images", "seed", "height", "width", "max_pixels"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"{key} must be a whole number, got {value!r}")
        for key in ("steps", "num_images"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be at least 1, got {getattr(self, key)}")
        if not 0 <= self.seed <= _MAX_SEED - (self.num_images - 1):
            raise ConfigError(f"seed must be between 0 and {_MAX_SEED - (self.num_images - 1)}, got {self.seed}")
        for key in ("height", "width"):
            value = getattr(self, key)
            if value is not None and (value < 8 or value % 8):
                raise ConfigError(f"{key} must be a positive multiple of 8, got {value}")
        if self.max_pixels is not None and self.max_pixels < 64:
            raise ConfigError(f"max_pixels must be at least 64, got {self.max_pixels}")
        g = self.guidance
        if g is not None and (isinstance(g, bool) or not isinstance(g, (int, float))
                              or not math.isfinite(g) or not 0 <= g <= _MAX_GUIDANCE):
            raise ConfigError(f"guidance must be a number from 0 to {_MAX_GUIDANCE:g}, got {g!r}")
        parse_names(self.sampler, self.scheduler)  # an unknown name is refused before any model loads


def _check_text(key: str, text: object) -> None:
    if not isinstance(text, str):
        raise ConfigError(f"{key} must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: bytes that were not UTF-8 on the command line
        raise ConfigError(f"{key}: contains bytes that are not valid UTF-8; write the prompt in UTF-8") from None


@dataclass
class GeneratedImage:
    image: Image.Image
    prompt: str
    seed: int
    parameters: str  # the A1111 "parameters" text

    def png_bytes(self) -> bytes:
        """The image as PNG, with the ``parameters`` text chunk."""
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", self.parameters)
        buffer = io.BytesIO()
        self.image.save(buffer, format="PNG", pnginfo=info)
        return buffer.getvalue()

    def save(self, path: str | os.PathLike) -> Path:
        """Write the PNG to ``path`` atomically (temp file + rename; a symlink there is replaced, not followed)."""
        out = Path(path)
        atomic_write_bytes(out, self.png_bytes(), what="image")
        return out


_INDEXED = re.compile(r"(\d{1,9})-")  # a longer number is not ours; counting past it would make names too long
_MAX_NAME_TRIES = 10_000


class ImageFolder:
    """An output folder whose images are numbered ``NNNNN-SEED.png`` after the highest number there.

    Images are only ever added: each is written under a name nothing holds yet (see
    :func:`~diffusion_lora.formats.atomic.write_new_file`), so no earlier image, no file planted
    there and no symlink is ever replaced or written through, even with two runs writing at once.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise ConfigError(f"{self.path}: exists and is not a folder; give a folder for the images") from None
        except OSError as exc:
            raise ConfigError(f"{self.path}: cannot create the output folder: {exc.strerror or exc}") from None
        self._next: int | None = None

    def _highest_index(self) -> int:
        highest = -1
        try:
            with os.scandir(self.path) as entries:
                for entry in entries:
                    m = _INDEXED.match(entry.name)
                    if m:
                        highest = max(highest, int(m.group(1)))
        except OSError as exc:
            raise ConfigError(f"{self.path}: cannot list the output folder: {exc.strerror or exc}") from None
        return highest

    def add(self, result: GeneratedImage) -> Path:
        """Write ``result`` under the next free number and return its path."""
        data = result.png_bytes()
        if self._next is None:
            self._next = self._highest_index() + 1
        for _ in range(_MAX_NAME_TRIES):
            path = self.path / f"{self._next:05d}-{result.seed}.png"
            self._next += 1
            try:
                write_new_file(path, data, what="image")
                return path
            except FileExistsError:
                continue  # taken meanwhile (another run), or a planted entry: take the next number
        raise FormatError(f"{self.path}: found no free image name after {_MAX_NAME_TRIES} tries")


def check_size(pipe: Any, settings: GenerationSettings) -> tuple[int, int]:
    """(height, width) the pipeline will produce, refused when over the pixel limit."""
    native = native_size(pipe) or 1024
    height, width = settings.height or native, settings.width or native
    limit = settings.max_pixels or max(_AREA_FACTOR * native * native, _MIN_PIXEL_LIMIT)
    if height * width > limit:
        why = "max_pixels" if settings.max_pixels else (
            f"{_AREA_FACTOR}x the model's native {native}x{native}, at least 2048x2048")
        raise ConfigError(
            f"height x width {height}x{width} is {height * width} pixels, over the limit of {limit} ({why}); "
            "generate smaller and upscale, or raise max_pixels (--max-pixels) if the memory is there"
        )
    return height, width


def _guidance_used(pipe: Any, settings: GenerationSettings) -> tuple[float | None, float | None]:
    """(CFG scale, distilled guidance) as the pipeline will use them: the setting or the call's default."""
    accepted = call_parameters(pipe)

    def default(key: str) -> float | None:
        value = accepted.get(key)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    guidance = settings.guidance if settings.guidance is not None else default("guidance_scale")
    if "true_cfg_scale" in accepted:  # Flux: guidance_scale is the distilled guidance (Forge's field)
        return default("true_cfg_scale"), guidance
    config = getattr(getattr(pipe, "transformer", None), "config", None) or {}
    if config.get("guidance_embeds"):  # Flux.2 dev: only distilled guidance, no true CFG at all
        return 1.0, guidance
    return guidance, None


def call_kwargs(pipe: Any, settings: GenerationSettings) -> dict[str, Any]:
    accepted = call_parameters(pipe)
    kwargs: dict[str, Any] = {"num_inference_steps": settings.steps}
    optional = {
        "guidance_scale": settings.guidance,
        "negative_prompt": settings.negative_prompt,
        "height": settings.height,
        "width": settings.width,
    }
    for key, value in optional.items():
        if value is None:
            continue
        if key not in accepted:
            raise ConfigError(f"{type(pipe).__name__} does not accept {key}; leave it out")
        kwargs[key] = value
    return kwargs


def _plain(text: str) -> str:
    # PNG text is UTF-8: a lone surrogate (from a non-UTF-8 file name) is written as its escape.
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def parameters_text(pipe: Any, prompt: str, settings: GenerationSettings, seed: int, size: tuple[int, int],
                     tags: Sequence[str], hashes: Mapping[str, str], model_file: str | None = None) -> str:
    """A1111's infotext: prompt line, negative prompt line, then the fields in A1111's order."""
    lines = [f"{prompt} {' '.join(tags)}".strip()]
    if settings.negative_prompt:
        lines.append(f"Negative prompt: {settings.negative_prompt}")
    cfg, distilled = _guidance_used(pipe, settings)
    sampler, schedule = infotext_fields(pipe, settings.sampler, settings.scheduler)
    fields: list[tuple[str, object]] = [
        ("Steps", settings.steps),
        ("Sampler", sampler),
        ("Schedule type", schedule),
        ("CFG scale", None if cfg is None else f"{cfg:g}"),
        ("Distilled CFG Scale", None if distilled is None else f"{distilled:g}"),
        ("Seed", seed),
        ("Size", f"{size[0]}x{size[1]}"),
        ("Model hash", _model_hash(model_file)),
        ("Model", _model_name(pipe, model_file)),
        ("Lora hashes", '"' + ", ".join(f"{n}: {h}" for n, h in hashes.items()) + '"' if hashes else None),
        ("Family", detect_family(pipe).name),
    ]
    text = ", ".join(f"{key}: {value}" for key, value in fields if value is not None)
    return _plain("\n".join(lines + [text]))


def _model_hash(model_file: str | None) -> str | None:
    if not model_file:
        return None
    try:
        # A1111's original "Model hash" (8 hex digits of 64 KiB at 1 MiB; Civitai's AutoV1): reading
        # 64 KiB keeps it cheap, where the newer 10-digit form hashes the whole multi-GB checkpoint.
        return legacy_hash(model_file)
    except FormatError:  # a hash is a courtesy in the PNG; never fail generation for it
        return None


def _model_name(pipe: Any, model_file: str | None) -> str | None:
    if model_file:
        return Path(model_file).stem  # A1111 names a checkpoint by its file's stem
    model = pipeline_name(pipe)
    return Path(str(model)).name if model else None


def _short_hash(file: str | None) -> str | None:
    if not file:
        return None
    try:
        # Computed, not copied from the file's sshs_model_hash, which a file may state wrongly.
        return addnet_hash(file)[:12]
    except Exception:  # a hash is a courtesy in the PNG; never fail generation for it
        return None


def _tag_text(pipe: Any, name: str, weight: Any) -> str:
    """An adapter's weight as an A1111 tag; a per-block weight the syntax cannot hold shows its default."""
    if not isinstance(weight, Mapping):
        return LoraTag(name, float(weight)).as_text()
    encoders = [c for c in detect_family(pipe).text_encoders if c in weight]
    te = {weight[c] for c in encoders}
    default = float(weight.get("default", 1.0))
    if set(weight) <= {"default", *encoders} and len(te) == 1:
        return LoraTag(name, default, float(te.pop())).as_text()
    return LoraTag(name, default).as_text()


def pixels_or_oom(pipe: Any, prompt: str | Sequence[str], generator: torch.Generator | Sequence[torch.Generator],
                  kwargs: dict[str, Any], size: tuple[int, int],
                  images: Mapping[str, Image.Image]) -> list[Image.Image]:
    """The pipeline's images for ``prompt`` (one per prompt), an out-of-memory error turned into a ConfigError."""
    try:
        return list(run_pipeline(pipe, prompt, generator=generator, images=images, **kwargs).images)
    except (MemoryError, RuntimeError) as exc:  # torch.OutOfMemoryError is a RuntimeError
        text = str(exc)
        oom = isinstance(exc, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError)))
        if not oom and "out of memory" not in text and "can't allocate memory" not in text:
            raise
        raise ConfigError(
            f"height x width {size[0]}x{size[1]}: ran out of memory generating the image "
            f"({type(exc).__name__}); use a smaller --height/--width (memory grows with the pixel count)"
        ) from None


def iter_generate(pipe: Any, settings: GenerationSettings, *, progress: bool = True,
                  model_file: str | os.PathLike | None = None) -> Iterator[GeneratedImage]:
    """Yield ``num_images`` images per prompt, one at a time, applying ``settings.loras`` plus each prompt's tags.

    Image ``i`` of a prompt uses seed ``settings.seed + i``; same settings → same pixels. Everything a
    prompt's tags ask for is checked (and loaded) before its first image. ``model_file``, the base
    checkpoint when it is one file, adds A1111's ``Model hash`` and names the model by its stem.
    """
    kwargs = call_kwargs(pipe, settings)
    size = check_size(pipe, settings)
    images = image_inputs(settings.image_inputs())  # read (and refused) before any image is made
    check_image_inputs(pipe, images)
    choice = choose(pipe, settings.sampler, settings.scheduler)  # refused before any work
    scheduler = choice.build(pipe.scheduler) if choice is not None else None
    if images and "max_area" in call_parameters(pipe):
        kwargs.setdefault("height", size[0])  # Kontext: the checked size, not its one-megapixel default
        kwargs.setdefault("width", size[1])
    # Every prompt's tags are parsed and resolved (their files loaded) before the first image, so a
    # bad tag in the last prompt fails the run before it has spent any time.
    plans = []
    for raw in settings.prompts:
        prompt, tags = parse_lora_tags(raw)
        active: dict[str, Any] = dict(settings.loras)
        for tag in tags:
            active[resolve_tag(pipe, tag, settings.lora_dirs)] = tag_weight(pipe, tag)
        plans.append((prompt, active))
    model = os.fspath(model_file) if model_file is not None else None
    hashes = _lora_hashes(pipe)
    bar = tqdm(total=len(plans) * settings.num_images, desc="generate", unit="img", disable=not progress)
    pipe.set_progress_bar_config(disable=True)
    try:
        for prompt, active in plans:
            set_weights(pipe, active)
            shown = [_tag_text(pipe, n, w) for n, w in active.items()]
            used = {n: hashes[n] for n in active if hashes.get(n)}
            for index in range(settings.num_images):
                seed = settings.seed + index
                generator = torch.Generator(device="cpu").manual_seed(seed)
                with swapped_scheduler(pipe, scheduler):  # the pipeline's own is back after each call
                    image = pixels_or_oom(pipe, prompt, generator, kwargs, size, images)[0]
                text = parameters_text(pipe, prompt, settings, seed, image.size, shown, used, model)
                yield GeneratedImage(image, prompt, seed, text)
                bar.update(1)
    finally:
        bar.close()


def _lora_hashes(pipe: Any) -> dict[str, str | None]:
    """Each loaded adapter's short AddNet hash, computed once per file."""
    return {info.name: _short_hash(info.file) for info in list_loras(pipe)}


def generate(pipe: Any, settings: GenerationSettings, *, progress: bool = True,
             model_file: str | os.PathLike | None = None) -> list[GeneratedImage]:
    """All images of :func:`iter_generate` as a list."""
    return list(iter_generate(pipe, settings, progress=progress, model_file=model_file))
