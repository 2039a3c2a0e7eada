"""Sample LoRA datasets: folders of PNG images with ``.txt`` captions, written deterministically."""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image

from diffusion_lora.toy import scenes, styles

__all__ = ["SAMPLE_SETS", "character_scenes", "style_scenes", "write_set"]

# name -> (kind, style); every set has 20 images. checker, faded and ink are held-out styles
# (styles.HELD_OUT_STYLES): a user's own style, never part of base training.
SAMPLE_SETS: dict[str, tuple[str, str]] = {
    "outline": ("style", "outline"),
    "stripes": ("style", "stripes"),
    "pastel": ("style", "pastel"),
    "checker": ("style", "checker"),
    "faded": ("style", "faded"),
    "ink": ("style", "ink"),
    "zorbo": ("character", "plain"),
}
_SET_SIZE = 20


def style_scenes(style: str, count: int = _SET_SIZE, seed: int = 0) -> list[scenes.Scene]:
    """``count`` scenes of varied content in ``style``."""
    rng = random.Random(f"style-{style}-{seed}")
    return [scenes.random_scene(rng, style=style) for _ in range(count)]


def character_scenes(count: int = _SET_SIZE, seed: int = 0, style: str = "plain") -> list[scenes.Scene]:
    """``count`` scenes of the mascot at varied sizes, places and backgrounds."""
    rng = random.Random(f"character-{seed}")
    out = []
    for _ in range(count):
        s = scenes.random_scene(rng, style=style)
        out.append(scenes.Scene(styles.MASCOT, styles.MASCOT_COLOUR, s.size, s.background, s.cx, s.cy, style))
    return out


def write_set(folder: str | Path, items: list[scenes.Scene]) -> list[Path]:
    """Write ``NNN.png`` + ``NNN.txt`` (the caption) per scene into ``folder``; returns the images."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, scene in enumerate(items):
        image: Image.Image = scenes.render(scene)
        path = folder / f"{i:03d}.png"
        image.save(path, optimize=True)
        (folder / f"{i:03d}.txt").write_text(scene.caption + "\n")
        paths.append(path)
    return paths
