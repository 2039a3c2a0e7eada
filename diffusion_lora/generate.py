"""Text-to-image generation with stacked adapters, A1111 ``<lora:…>`` prompt tags and PNG parameters.

Each image gets its own seed (``seed + index``), so the same seed always gives the same pixels, and
its PNG carries the generation parameters in a ``parameters`` text chunk the way AUTOMATIC1111 writes
them, so UIs and sharing sites can read them back.
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, PngImagePlugin
from tqdm.auto import tqdm

from .adapters import list_loras, load_lora, set_weights
from .adapters.files import default_adapter_name
from .errors import ConfigError
from .families import detect_family
from .formats.hashes import addnet_hash

logger = logging.getLogger(__name__)

_TAG = re.compile(r"<lora:([^:>]+)(?::([^:>]*))?>")


@dataclass(frozen=True)
class LoraTag:
    """One ``<lora:NAME_OR_PATH:WEIGHT>`` tag of a prompt."""

    target: str
    weight: float


def parse_lora_tags(prompt: str) -> tuple[str, list[LoraTag]]:
    """Split A1111-style ``<lora:NAME_OR_PATH:WEIGHT>`` tags (weight defaults to 1) out of a prompt."""
    tags = []
    for m in _TAG.finditer(prompt):
        raw = (m.group(2) or "1").strip()
        try:
            weight = float(raw)
        except ValueError:
            raise ConfigError(f"prompt tag {m.group(0)!r}: weight {raw!r} is not a number") from None
        tags.append(LoraTag(m.group(1).strip(), weight))
    clean = re.sub(r"\s+,", ",", re.sub(r"\s{2,}", " ", _TAG.sub("", prompt))).strip().strip(",").strip()
    return clean, tags


@dataclass
class GenerationSettings:
    """What one ``generate`` call asks for; sizes in pixels, ``guidance`` is the CFG scale."""

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

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ConfigError("prompts: give at least one prompt")
        for key in ("steps", "num_images"):
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"{key} must be at least 1, got {getattr(self, key)}")
        for key in ("height", "width"):
            value = getattr(self, key)
            if value is not None and (value < 8 or value % 8):
                raise ConfigError(f"{key} must be a positive multiple of 8, got {value}")


@dataclass
class GeneratedImage:
    image: Image.Image
    prompt: str
    seed: int
    parameters: str  # the A1111 "parameters" text

    def save(self, path: str | Path) -> Path:
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", self.parameters)
        out = Path(path)
        self.image.save(out, pnginfo=info)
        return out


def _resolve_tag(pipe: Any, tag: LoraTag, lora_dirs: Sequence[str]) -> str:
    """The adapter name a tag refers to, loading the file when it is not loaded yet."""
    loaded = {info.name for info in list_loras(pipe)}
    if tag.target in loaded:
        return tag.target
    candidates = [Path(tag.target), Path(tag.target + ".safetensors")]
    candidates += [Path(d) / (tag.target + ".safetensors") for d in lora_dirs]
    for path in candidates:
        if path.is_file():
            name = default_adapter_name(path)
            if name in loaded:
                return name
            return load_lora(pipe, path, name=name, weight=tag.weight)
    raise ConfigError(
        f"<lora:{tag.target}:…>: no loaded adapter of that name and no file "
        f"{tag.target!r} (also looked in {', '.join(lora_dirs) or 'no --lora-dir'})"
    )


def _call_kwargs(pipe: Any, settings: GenerationSettings) -> dict[str, Any]:
    accepted = inspect.signature(pipe.__call__).parameters
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


def _parameters_text(pipe: Any, prompt: str, settings: GenerationSettings, seed: int, size: tuple[int, int],
                     active: Mapping[str, float], hashes: Mapping[str, str]) -> str:
    tags = " ".join(f"<lora:{n}:{w:g}>" for n, w in active.items())
    lines = [f"{prompt} {tags}".strip()]
    if settings.negative_prompt:
        lines.append(f"Negative prompt: {settings.negative_prompt}")
    fields = [
        f"Steps: {settings.steps}",
        f"Sampler: {type(pipe.scheduler).__name__}",
    ]
    if settings.guidance is not None:
        fields.append(f"CFG scale: {settings.guidance:g}")
    fields += [f"Seed: {seed}", f"Size: {size[0]}x{size[1]}"]
    model = getattr(pipe.config, "_name_or_path", None)
    if model:
        fields.append(f"Model: {Path(str(model)).name}")
    if hashes:
        fields.append('Lora hashes: "' + ", ".join(f"{n}: {h}" for n, h in hashes.items()) + '"')
    fields.append(f"Family: {detect_family(pipe).name}")
    return "\n".join(lines + [", ".join(fields)])


def _short_hash(file: str | None) -> str | None:
    if not file:
        return None
    try:
        # Computed, not copied from the file's sshs_model_hash, which a file may state wrongly.
        return addnet_hash(file)[:12]
    except Exception:  # a hash is a courtesy in the PNG; never fail generation for it
        return None


def generate(pipe: Any, settings: GenerationSettings, *, progress: bool = True) -> list[GeneratedImage]:
    """Generate ``num_images`` images per prompt, applying ``settings.loras`` plus each prompt's tags.

    Image ``i`` of a prompt uses seed ``settings.seed + i``; same settings → same pixels.
    """
    kwargs = _call_kwargs(pipe, settings)
    results: list[GeneratedImage] = []
    total = len(settings.prompts) * settings.num_images
    bar = tqdm(total=total, desc="generate", unit="img", disable=not progress)
    pipe.set_progress_bar_config(disable=True)
    try:
        for raw_prompt in settings.prompts:
            prompt, tags = parse_lora_tags(raw_prompt)
            active = dict(settings.loras)
            for tag in tags:
                active[_resolve_tag(pipe, tag, settings.lora_dirs)] = tag.weight
            set_weights(pipe, active)
            files = {info.name: info.file for info in list_loras(pipe)}
            hashes = {n: h for n in active if (h := _short_hash(files.get(n)))}
            for index in range(settings.num_images):
                seed = settings.seed + index
                generator = torch.Generator(device="cpu").manual_seed(seed)
                image = pipe(prompt, generator=generator, **kwargs).images[0]
                text = _parameters_text(pipe, prompt, settings, seed, image.size, active, hashes)
                results.append(GeneratedImage(image, prompt, seed, text))
                bar.update(1)
    finally:
        bar.close()
    return results
