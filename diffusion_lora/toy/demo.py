"""The demo: train a style and a character LoRA on the embedded base, then show and measure them.

:func:`run_demo` trains ``samples/train_style_<style>.toml`` and ``samples/train_character_zorbo.toml``
on ``shapes-sd15`` and writes two grids into ``out_dir``:

* ``comparison.png`` — rows = prompts, columns = base / style LoRA at weight 0.5 / at 1.0;
* ``stacked.png`` — rows = mascot prompts, columns = base / character / character + style.

It also measures what the grids show, on a larger set of prompts: the style distance
(:mod:`diffusion_lora.metrics`) of each column to the style's training images, and how often the
mascot is drawn (:mod:`diffusion_lora.toy.analysis`).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from diffusion_lora.adapters.api import load_lora, set_weights
from diffusion_lora.metrics import image_stats, style_distance
from diffusion_lora.models.loading import load_pipeline
from diffusion_lora.toy import analysis, scenes, styles
from diffusion_lora.toy.datasets import character_scenes
from diffusion_lora.toy.evaluate import caption_of, generate
from diffusion_lora.training.outputs import image_grid
from diffusion_lora.training.trainer import train

__all__ = ["CELL", "DemoResult", "run_demo"]

logger = logging.getLogger(__name__)

GRID_PROMPTS = (
    "a large red star on a black background",
    "a medium blue circle on a white background",
    "a large green triangle on a gray background",
    "a medium purple square on a white background",
)
_EVAL_PROMPTS = 24
CELL = 160  # grid cell side in pixels
_SEED = 1000  # generation seeds; the LoRA runs have their own


@dataclass
class DemoResult:
    style: str
    style_adapter: Path
    character_adapter: Path
    comparison: Path
    stacked: Path
    # style distance (total, 0–3) to the style set of: base, weight 0, 0.5, 1.0; character, both
    distance: dict[str, float] = field(default_factory=dict)
    # fraction of mascot prompts drawn as the mascot: base, character, character + style
    mascot: dict[str, float] = field(default_factory=dict)
    images: dict[str, list[Image.Image]] = field(default_factory=dict)  # the measured sets, by column

    def gap_closed(self, column: str) -> float:
        """Share of the base's style distance that ``column`` closes (1 = as close as the style set)."""
        return 1.0 - self.distance[column] / self.distance["base"]


def _train(samples: Path, config: str, out_dir: Path, data: str, progress: bool) -> Path:
    overrides = [f'data.path="{(samples / "datasets" / data).as_posix()}"', f'output.dir="{out_dir.as_posix()}"']
    result = train(samples / config, overrides=overrides, progress=progress)
    assert result.adapter is not None  # a run without max_steps_this_run always finishes
    return result.adapter


def _eval_prompts() -> list[str]:
    combos = scenes.all_combos()
    random.Random(7).shuffle(combos)
    return [caption_of(c) for c in combos[:_EVAL_PROMPTS]]


def _mascot_prompts() -> list[str]:
    return [s.caption for s in character_scenes(_EVAL_PROMPTS, seed=99)]


def _mascot_rate(images: list[Image.Image]) -> float:
    shapes = scenes.SHAPES + (styles.MASCOT,)
    return sum(analysis.read_image(im, shapes=shapes).shape == styles.MASCOT for im in images) / len(images)


def _grid(columns: dict[str, list[Image.Image]], prompts: list[str] | tuple[str, ...]) -> Image.Image:
    titles = list(columns)
    # 160 px cells: room for the prompt and the column titles in each row's label.
    rows = [[columns[t][r].resize((CELL, CELL), Image.Resampling.NEAREST) for t in titles]
            for r in range(len(prompts))]
    labels = [f"{p}  [{' | '.join(titles)}]" for p in prompts]
    return image_grid(rows, labels)


def run_demo(samples: str | Path, out_dir: str | Path, style: str = "stripes", progress: bool = True) -> DemoResult:
    """Train both LoRAs, write the grids and measure them (see the module docstring)."""
    samples, out_dir = Path(samples), Path(out_dir)
    style_file = _train(samples, f"train_style_{style}.toml", out_dir / style, style, progress)
    char_file = _train(samples, "train_character_zorbo.toml", out_dir / "zorbo", "zorbo", progress)
    pipe = load_pipeline("shapes-sd15")
    pipe.set_progress_bar_config(disable=True)
    grid_prompts, eval_prompts, mascot_prompts = list(GRID_PROMPTS), _eval_prompts(), _mascot_prompts()
    result = DemoResult(style, style_file, char_file, out_dir / "comparison.png", out_dir / "stacked.png")

    def both(label: str) -> list[Image.Image]:
        grid = generate(pipe, grid_prompts, seed=_SEED)
        result.images[label] = generate(pipe, eval_prompts, seed=_SEED)
        return grid

    grids = {"base": both("base")}
    load_lora(pipe, style_file, name="style")
    for weight in (0.0, 0.5, 1.0):
        set_weights(pipe, {"style": weight})
        grids[f"style {weight}"] = both(f"style {weight}")
    _grid({k: grids[k] for k in ("base", "style 0.5", "style 1.0")}, grid_prompts).save(result.comparison)

    load_lora(pipe, char_file, name="zorbo")
    stacked: dict[str, list[Image.Image]] = {}
    for label, weights in (("base", {}), ("zorbo", {"zorbo": 1.0}), ("zorbo + style", {"zorbo": 1.0, "style": 1.0})):
        set_weights(pipe, weights)
        stacked[label] = generate(pipe, mascot_prompts, seed=_SEED)
    _grid({k: v[:4] for k, v in stacked.items()}, mascot_prompts[:4]).save(result.stacked)
    result.images.update({f"mascot {k}": v for k, v in stacked.items()})

    reference = image_stats([Image.open(p) for p in sorted((samples / "datasets" / style).glob("*.png"))])
    for label in ("base", "style 0.0", "style 0.5", "style 1.0", "mascot zorbo", "mascot zorbo + style"):
        result.distance[label] = style_distance(result.images[label], reference).total
    result.mascot = {k: _mascot_rate(v) for k, v in stacked.items()}
    return result
