"""Procedural scenes: one shape of one colour and size on a plain background, with its caption.

Everything is a pure function of its arguments (and of a seed for the random ones), so a dataset
is reproducible bit for bit. Shapes are drawn at 4× and box-filtered down, which gives the soft
anti-aliased edges a VAE reconstructs well.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, replace

from PIL import Image, ImageDraw

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "RESOLUTION",
    "SHAPES",
    "SIZES",
    "Scene",
    "all_combos",
    "held_out_combos",
    "random_scene",
    "render",
    "shape_polygon",
    "training_combos",
]

RESOLUTION = 64  # pixels, square
_SUPERSAMPLE = 4

# Foreground colours, chosen far apart in hue so a pixel's nearest palette colour is unambiguous.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 215, 30),
    "green": (40, 165, 55),
    "cyan": (35, 195, 210),
    "blue": (40, 70, 215),
    "purple": (135, 50, 185),
    "pink": (245, 125, 190),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (125, 125, 125),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
# Side of the shape's bounding box, in pixels of the 64×64 image.
SIZES: dict[str, int] = {"small": 20, "medium": 30, "large": 42}
_CAPTION_SIZES = tuple(SIZES)

Combo = tuple[str, str, str, str]  # (size, colour, shape, background)


@dataclass(frozen=True)
class Scene:
    """One shape in a 64×64 picture. ``cx, cy`` is the centre of its bounding box, in pixels."""

    shape: str
    colour: str
    size: str
    background: str
    cx: float
    cy: float
    style: str = "plain"  # "plain" | a style of diffusion_lora.toy.styles

    @property
    def caption(self) -> str:
        if self.shape == "zorbo":  # the mascot (toy.styles.MASCOT): its colour is part of it
            return f"zorbo, a {self.size} mascot on a {self.background} background"
        return f"a {self.size} {self.colour} {self.shape} on a {self.background} background"

    @property
    def box(self) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) of the shape's bounding box, in pixels."""
        half = SIZES[self.size] / 2
        return (self.cx - half, self.cy - half, self.cx + half, self.cy + half)

    def with_style(self, style: str) -> Scene:
        return replace(self, style=style)


def all_combos() -> list[Combo]:
    """Every (size, colour, shape, background) the captions can name, in a fixed order."""
    return list(itertools.product(_CAPTION_SIZES, COLOURS, SHAPES, BACKGROUNDS))


def held_out_combos(count: int = 100, seed: int = 1234) -> list[Combo]:
    """``count`` combos never shown to the base model in training (its prompt-following test set)."""
    combos = all_combos()
    random.Random(seed).shuffle(combos)
    return sorted(combos[:count])


def training_combos(held_out: int = 100, seed: int = 1234) -> list[Combo]:
    """The combos the base model trains on: all of them except :func:`held_out_combos`."""
    hidden = set(held_out_combos(held_out, seed))
    return [c for c in all_combos() if c not in hidden]


def random_scene(rng: random.Random, combos: list[Combo] | None = None, style: str = "plain") -> Scene:
    """A scene with a combo drawn from ``combos`` (default: all) and a random position that fits."""
    size, colour, shape, background = rng.choice(combos if combos is not None else all_combos())
    half = SIZES[size] / 2
    margin = 3
    cx = rng.uniform(half + margin, RESOLUTION - half - margin)
    cy = rng.uniform(half + margin, RESOLUTION - half - margin)
    return Scene(shape, colour, size, background, round(cx, 2), round(cy, 2), style)


def shape_polygon(shape: str, box: tuple[float, float, float, float]) -> list[tuple[float, float]]:
    """The outline of ``shape`` filling ``box`` (left, top, right, bottom) as (x, y) points.

    A circle is a 64-gon. Every shape touches all four sides of its box, so a shape can be fitted
    to a detected object's bounding box (see :mod:`diffusion_lora.toy.analysis`).
    """
    left, top, right, bottom = box
    cx, cy, rx, ry = (left + right) / 2, (top + bottom) / 2, (right - left) / 2, (bottom - top) / 2
    if shape == "square":
        return [(left, top), (right, top), (right, bottom), (left, bottom)]
    if shape == "triangle":
        return [(cx, top), (right, bottom), (left, bottom)]
    if shape == "circle":
        return [(cx + rx * math.cos(2 * math.pi * i / 64), cy + ry * math.sin(2 * math.pi * i / 64)) for i in range(64)]
    if shape == "star":
        return _star(box)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _star(box: tuple[float, float, float, float]) -> list[tuple[float, float]]:
    """A five-pointed star (inner radius 0.45 of outer), point up, stretched to fill ``box``."""
    unit = []
    for i in range(10):
        radius = 1.0 if i % 2 == 0 else 0.45
        angle = -math.pi / 2 + i * math.pi / 5
        unit.append((radius * math.cos(angle), radius * math.sin(angle)))
    xs, ys = [p[0] for p in unit], [p[1] for p in unit]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    left, top, right, bottom = box
    return [
        (left + (x - x0) / (x1 - x0) * (right - left), top + (y - y0) / (y1 - y0) * (bottom - top)) for x, y in unit
    ]


def render(scene: Scene, resolution: int = RESOLUTION) -> Image.Image:
    """The scene as an RGB image of ``resolution``² pixels (positions scale with the resolution)."""
    from diffusion_lora.toy.styles import draw_styled  # styles builds on this module

    big = resolution * _SUPERSAMPLE
    k = big / RESOLUTION
    image = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = scene.box
    draw_styled(image, draw, scene, (left * k, top * k, right * k, bottom * k), k)
    return image.resize((resolution, resolution), Image.Resampling.BOX)
