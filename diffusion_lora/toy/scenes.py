"""Procedural scenes: one shape of one colour and size on a plain background, with its caption.

Everything is a pure function of its arguments (and of a seed for the random ones), so a dataset
is reproducible bit for bit. Shapes are drawn at 4× and box-filtered down, which gives the soft
anti-aliased edges a VAE reconstructs well.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, replace

from PIL import Image, ImageDraw

from diffusion_lora.toy.shapes import COLOURS, SHAPES, shape_polygon
from diffusion_lora.toy.styles import draw_styled

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "RESOLUTION",
    "SHAPES",
    "SIZES",
    "Scene",
    "all_combos",
    "article",
    "caption_variant",
    "held_out_combos",
    "place",
    "random_scene",
    "reworded",
    "render",
    "shape_polygon",
    "training_combos",
]

RESOLUTION = 64  # pixels, square
_SUPERSAMPLE = 4

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (125, 125, 125),
}
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


# Words a caption may use instead of the template's (natural prompts name things in many ways).
_SYNONYMS: dict[str, tuple[str, ...]] = {
    "small": ("small", "little", "tiny"),
    "medium": ("medium", "medium-sized", "mid-sized"),
    "large": ("large", "big", "huge"),
    "gray": ("gray", "grey"),
    "circle": ("circle", "circle", "disc", "round dot"),
    "square": ("square", "square", "box"),
    "triangle": ("triangle",),
    "star": ("star", "star", "five-pointed star"),
}


def _word(rng: random.Random, word: str) -> str:
    return rng.choice(_SYNONYMS.get(word, (word,)))


def article(word: str) -> str:
    """``"an"`` before a vowel ("an orange star"), else ``"a"``."""
    return "an" if word[:1] in "aeiou" else "a"


def caption_variant(scene: Scene, rng: random.Random) -> str:
    """A natural rewording of ``scene.caption``: size or background left out, another order, synonyms.

    Every variant still names the colour and the shape, which is what a short prompt ("a blue
    circle") asks for; the mascot's caption is kept as it is (its trigger word is the point)."""
    return reworded(scene, rng)[0]


# What a caption that leaves out the size or the background stands for: the first of these that the
# allowed combos hold (a short prompt draws a medium shape on white, as a template caption would say).
_DEFAULT_SIZES = ("medium", "large", "small")
_DEFAULT_BACKGROUNDS = ("white", "gray", "black")


def reworded(scene: Scene, rng: random.Random, combos: list[Combo] | None = None) -> tuple[str, str]:
    """``(rewording, template)``: :func:`caption_variant`'s rewording of ``scene.caption`` (the same draw
    from ``rng``) and the template caption it stands for: the scene's, with the size and background the
    rewording leaves out set to the first default that ``combos`` (default: all) allow."""
    if scene.shape == "zorbo":
        return scene.caption, scene.caption
    size, colour, shape, bg = (_word(rng, scene.size), scene.colour, _word(rng, scene.shape),
                               _word(rng, scene.background))
    a_size, a_colour, a_shape = article(size), article(colour), article(shape)
    forms = (  # (text, names the size, names the background)
        (f"{a_colour} {colour} {shape}", False, False),
        (f"{colour} {shape}", False, False),
        (f"{a_size} {size} {colour} {shape}", True, False),
        (f"{a_colour} {colour} {shape} on {bg}", False, True),
        (f"{a_colour} {colour} {shape} on a {bg} background", False, True),
        (f"{a_size} {size} {colour} {shape} on {bg}", True, True),
        (f"{colour} {shape}, {size}, {bg} background", True, True),
        (f"{a_shape} {shape}, {colour}, on a {bg} background", False, True),
        (f"{bg} background with {a_size} {size} {colour} {shape}", True, True),
        (f"a picture of {a_colour} {colour} {shape}", False, False),
    )
    text, says_size, says_bg = rng.choice(forms)
    allowed = None if combos is None else set(combos)
    for background in (scene.background,) if says_bg else _DEFAULT_BACKGROUNDS:
        for size in (scene.size,) if says_size else _DEFAULT_SIZES:
            if allowed is None or (size, colour, scene.shape, background) in allowed:
                return text, replace(scene, size=size, background=background).caption
    return text, scene.caption


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
    scene = place(rng.choice(combos if combos is not None else all_combos()), rng, style)
    return replace(scene, cx=round(scene.cx, 2), cy=round(scene.cy, 2))


def place(combo: Combo, rng: random.Random, style: str = "plain") -> Scene:
    """``combo`` drawn in ``style`` at a random position from ``rng`` where the whole shape fits."""
    size, colour, shape, background = combo
    half = SIZES[size] / 2
    margin = 3
    cx = rng.uniform(half + margin, RESOLUTION - half - margin)
    cy = rng.uniform(half + margin, RESOLUTION - half - margin)
    return Scene(shape, colour, size, background, cx, cy, style)


def render(scene: Scene, resolution: int = RESOLUTION) -> Image.Image:
    """The scene as an RGB image of ``resolution``² pixels (positions scale with the resolution)."""
    big = resolution * _SUPERSAMPLE
    k = big / RESOLUTION
    image = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = scene.box
    draw_styled(image, draw, scene, (left * k, top * k, right * k, bottom * k), k)
    return image.resize((resolution, resolution), Image.Resampling.BOX)
