"""A user's own style on the embedded base: train with the plain command, then measure the gap closed.

:func:`learn_style` runs what the README tells a new user to run, ``diffusion-lora train --data FOLDER
--out OUT`` (every other setting left to the trainer's recipe), once per training seed (``--seed N``,
nothing else), then generates the same prompts with the base, each LoRA at weight 0.5 and at 1.0.

Two measurements, because one alone misleads on this model:

- **Several seeds.** On the embedded model one LoRA's gap closed moves by up to 30 points with the
  training seed alone (issue 17), so a style is judged by the mean over seeds.
- **Two references.** ``style_distance`` against the style set compares the LoRA's pictures of the
  evaluation prompts with the set's 20 pictures of *other* shapes and colours, so even a perfect LoRA
  keeps a distance (its :attr:`StyleResult.ceiling`). The content-matched reference
  (:func:`matched_references`: the evaluation prompts themselves drawn in the style by the renderer)
  has no such floor: 0 means the LoRA drew each prompt exactly as the style would.
- **The decoder's limit.** A LoRA changes the denoiser only: the best it can do is produce exactly the
  latents the VAE's encoder gives the matched references, and the decoder turns those back into its own
  version of them (:func:`~diffusion_lora.toy.evaluate.round_trip`). :attr:`StyleResult.decoder_ceiling`
  is the gap against the matched references that such a perfect LoRA closes: a style the decoder cannot
  draw cannot be learned, whatever the recipe.

The held-out styles (:data:`~diffusion_lora.toy.styles.HELD_OUT_STYLES`) are the test: they are never
part of base training (:func:`~diffusion_lora.toy.open_world.check_trainable`).
"""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from diffusion_lora.adapters.api import load_lora, remove_lora, set_weights
from diffusion_lora.cli import main as cli_main
from diffusion_lora.metrics import image_stats, style_distance
from diffusion_lora.toy import scenes
from diffusion_lora.toy.evaluate import caption_of, generate, round_trip, score_images

__all__ = ["COLUMNS", "SeedResult", "StyleResult", "learn_style", "matched_references",
           "style_prompts"]

COLUMNS = ("base", "0.5", "1.0")
_PROMPTS = 24
_SEED = 1000  # generation seeds (image i: _SEED + i), the same for every column and training seed


def style_prompts(count: int = _PROMPTS, seed: int = 11) -> list[tuple[str, str, str, str]]:
    """``count`` combos (full-template prompts) for measuring a style, fixed by ``seed``."""
    combos = scenes.all_combos()
    random.Random(seed).shuffle(combos)
    return combos[:count]


def matched_references(style: str, combos: list[tuple[str, str, str, str]], seed: int = 0) -> list[Image.Image]:
    """Each combo drawn in ``style`` by the renderer, at a random position that fits (the picture a
    perfect LoRA would draw for that prompt)."""
    rng = random.Random(seed)
    return [scenes.render(scenes.place(combo, rng, style)) for combo in combos]


@dataclass
class SeedResult:
    """One training seed's LoRA: per reference and column, the style distance (0 = the reference's look)."""

    seed: int
    adapter: Path
    # reference ("set": the style set's pictures; "matched": the prompts drawn in the style) -> column -> distance
    distance: dict[str, dict[str, float]] = field(default_factory=dict)
    shape: dict[str, float] = field(default_factory=dict)  # column -> share of images with the prompt's shape

    def gap_closed(self, reference: str = "set", column: str = "1.0") -> float:
        """Share of the base's distance that ``column`` closes (1 = as close as the reference itself)."""
        d = self.distance[reference]
        return 1.0 - d[column] / d["base"]


@dataclass
class StyleResult:
    style: str
    prompts: list[str]
    runs: list[SeedResult]
    images: dict[str, list[Image.Image]]  # "base", and "SEED:COLUMN" for each run's 0.5 and 1.0
    ceiling: float  # the gap a perfect LoRA (the matched references) would close against the style set
    # the gap against the matched references a LoRA closes that produces their latents exactly (decoded)
    decoder_ceiling: float

    def gap_closed(self, reference: str = "set", column: str = "1.0") -> float:
        """The mean over the training seeds."""
        return statistics.fmean(r.gap_closed(reference, column) for r in self.runs)

    def shape(self, column: str = "1.0") -> float:
        return statistics.fmean(r.shape[column] for r in self.runs)


def learn_style(pipe, folder: str | Path, out_dir: str | Path, *, style: str | None = None,
                seeds: tuple[int, ...] = (0,), extra_args: tuple[str, ...] = ()) -> StyleResult:
    """Train on ``folder`` with the plain command, once per seed into ``out_dir/seed-N``, and measure each
    LoRA on ``pipe`` (the base, no adapter active; each LoRA is loaded for its measurement and removed).
    ``style`` (default: the folder's name) is the renderer's style for the content-matched reference."""
    folder, out_dir = Path(folder), Path(out_dir)
    style = style or folder.name
    combos = style_prompts()
    prompts = [caption_of(c) for c in combos]
    matched = matched_references(style, combos)
    references = {"set": image_stats([Image.open(p) for p in sorted(folder.glob("*.png"))]),
                  "matched": image_stats(matched)}
    set_weights(pipe, {})
    images = {"base": generate(pipe, prompts, seed=_SEED)}
    decoded = round_trip(pipe.vae, matched)
    runs = []
    for seed in seeds:
        run_dir = out_dir / f"seed-{seed}"
        code = cli_main(["train", "--data", str(folder), "--out", str(run_dir), "--seed", str(seed), *extra_args])
        if code != 0:
            raise RuntimeError(f"diffusion-lora train --data {folder} --out {run_dir} --seed {seed} exited with {code}")
        run = SeedResult(seed, run_dir / "lora.safetensors")
        columns = {"base": images["base"]}
        name = f"style_{folder.name}_{seed}"
        load_lora(pipe, run.adapter, name=name)
        try:
            for column in COLUMNS[1:]:
                set_weights(pipe, {name: float(column)})
                columns[column] = images[f"{seed}:{column}"] = generate(pipe, prompts, seed=_SEED)
        finally:
            remove_lora(pipe, name)
        for reference, stats in references.items():
            run.distance[reference] = {c: style_distance(ims, stats).total for c, ims in columns.items()}
        run.shape = {c: score_images(ims, combos).shape for c, ims in columns.items()}
        runs.append(run)
    base_to_set = style_distance(images["base"], references["set"]).total
    ceiling = 1.0 - style_distance(references["matched"], references["set"]).total / base_to_set
    base_to_matched = style_distance(images["base"], references["matched"]).total
    decoder_ceiling = 1.0 - style_distance(decoded, references["matched"]).total / base_to_matched
    return StyleResult(folder.name, prompts, runs, images, ceiling, decoder_ceiling)
