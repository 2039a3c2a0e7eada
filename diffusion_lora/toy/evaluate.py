"""How well the base model works: prompt following (generate, read back, count) and how well its VAE
reconstructs pictures (mean absolute error and PSNR)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from diffusion_lora.toy import analysis, scenes

__all__ = [
    "PromptScore", "Reconstruction", "caption_of", "generate", "prompt_following", "reconstruction", "round_trip",
    "score_images", "short_caption",
]


@dataclass(frozen=True)
class PromptScore:
    colour: float  # fraction of images whose foreground colour is the prompt's
    shape: float  # fraction of images whose shape is the prompt's
    images: list[Image.Image]
    readings: list[analysis.Reading]


def caption_of(combo: tuple[str, str, str, str]) -> str:
    size, colour, shape, background = combo
    return scenes.Scene(shape, colour, size, background, 32.0, 32.0).caption


def short_caption(combo: tuple[str, str, str, str]) -> str:
    """The natural short prompt for ``combo``: "a blue circle", "an orange star" (no size, no background)."""
    _, colour, shape, _ = combo
    return f"{scenes.article(colour)} {colour} {shape}"


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


def prompt_following(pipe, combos: Sequence[tuple[str, str, str, str]],
                     caption: Callable[[tuple[str, str, str, str]], str] = caption_of, **kwargs) -> PromptScore:
    """Generate one image per combo's ``caption`` (default: the full template) and score colour and
    shape (see :mod:`.analysis`)."""
    return score_images(generate(pipe, [caption(c) for c in combos], **kwargs), combos)


def score_images(images: Sequence[Image.Image], combos: Sequence[tuple[str, str, str, str]]) -> PromptScore:
    """How often the shape reader finds image ``i``'s combo's colour and shape (see :mod:`.analysis`)."""
    readings = [analysis.read_image(im) for im in images]
    colour = sum(r.colour == c[1] for r, c in zip(readings, combos)) / len(combos)
    shape = sum(r.shape == c[2] for r, c in zip(readings, combos)) / len(combos)
    return PromptScore(colour, shape, list(images), readings)


@dataclass(frozen=True)
class Reconstruction:
    mae: float  # mean absolute error per channel, in 0–255 levels
    psnr: float  # dB, from the mean squared error over the whole set


def round_trip(vae, images: Sequence[Image.Image], batch: int = 32) -> list[Image.Image]:
    """``images`` encoded by ``vae`` to the posterior mean and decoded again, rounded to 8 bits: the
    closest a denoiser that reproduces their latents exactly can come to them."""
    out_images: list[Image.Image] = []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            x = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images[start : start + batch]])
            t = torch.from_numpy(x).permute(0, 3, 1, 2) / 127.5 - 1.0
            t = t.to(device=vae.device, dtype=vae.dtype)
            out = vae.decode(vae.encode(t).latent_dist.mean).sample.float().cpu()
            y = torch.round((out.clamp(-1, 1) + 1) * 127.5).permute(0, 2, 3, 1).numpy().astype(np.uint8)
            out_images += [Image.fromarray(a) for a in y]
    return out_images


def reconstruction(vae, images: Sequence[Image.Image], batch: int = 32) -> Reconstruction:
    """How well ``vae`` reconstructs ``images`` (:func:`round_trip`)."""
    abs_sum = sq_sum = count = 0.0
    for im, back in zip(images, round_trip(vae, images, batch)):
        x = np.asarray(im.convert("RGB"), dtype=np.float64)
        d = np.asarray(back, dtype=np.float64) - x
        abs_sum += float(np.abs(d).sum())
        sq_sum += float((d**2).sum())
        count += x.size
    mse = sq_sum / count
    return Reconstruction(abs_sum / count, 10 * math.log10(255**2 / max(mse, 1e-12)))
