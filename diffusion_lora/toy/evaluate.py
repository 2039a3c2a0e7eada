"""How well a pipeline follows toy-world prompts: generate, read back, count."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from diffusion_lora.toy import analysis, scenes

__all__ = ["PromptScore", "caption_of", "generate", "prompt_following"]


@dataclass(frozen=True)
class PromptScore:
    colour: float  # fraction of images whose foreground colour is the prompt's
    shape: float  # fraction of images whose shape is the prompt's
    images: list[Image.Image]
    readings: list[analysis.Reading]


def caption_of(combo: tuple[str, str, str, str]) -> str:
    size, colour, shape, background = combo
    return scenes.Scene(shape, colour, size, background, 32.0, 32.0).caption


def generate(pipe, prompts: Sequence[str], seed: int = 0, steps: int = 20, guidance: float = 5.0,
             batch: int = 25) -> list[Image.Image]:
    """One image per prompt; image ``i`` uses generator seed ``seed + i`` whatever the batching."""
    images: list[Image.Image] = []
    for start in range(0, len(prompts), batch):
        chunk = list(prompts[start : start + batch])
        gens = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        out = pipe(prompt=chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                   height=scenes.RESOLUTION, width=scenes.RESOLUTION)
        images += out.images
    return images


def prompt_following(pipe, combos: Sequence[tuple[str, str, str, str]], **kwargs) -> PromptScore:
    """Generate one image per combo's caption and score colour and shape (see :mod:`.analysis`)."""
    images = generate(pipe, [caption_of(c) for c in combos], **kwargs)
    readings = [analysis.read_image(im) for im in images]
    colour = sum(r.colour == c[1] for r, c in zip(readings, combos)) / len(combos)
    shape = sum(r.shape == c[2] for r, c in zip(readings, combos)) / len(combos)
    return PromptScore(colour, shape, images, readings)
