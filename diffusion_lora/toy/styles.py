"""Looks the base model never produces, and the mascot character, for the sample LoRA datasets.

A style changes how a scene is drawn, never what it shows, so one caption describes the scene in
every style: ``outline`` draws only a 3-pixel contour, ``stripes`` fills with diagonal stripes of
the colour and white, ``pastel`` draws everything in a fixed pastel palette on a cream ground.
The mascot, called by the made-up trigger word ``zorbo``, is an orange ghost with two eyes.
"""

from __future__ import annotations

import math
from typing import Protocol

from PIL import Image, ImageDraw

from diffusion_lora.toy.shapes import COLOURS, shape_polygon

__all__ = ["MASCOT", "MASCOT_COLOUR", "STYLES", "draw_styled", "mascot_polygon"]

STYLES: tuple[str, ...] = ("plain", "outline", "stripes", "pastel")
MASCOT = "zorbo"  # the trigger word; several CLIP tokens, like real trigger words
MASCOT_COLOUR = "orange"
_OUTLINE_WIDTH = 3.0  # pixels of the 64×64 image
_STRIPE_PERIOD = 8.0  # pixels of the 64×64 image, along x + y
_PASTEL_GROUND = (250, 236, 214)


class Drawn(Protocol):
    """What :func:`draw_styled` needs of a scene (``scenes.Scene`` has it)."""

    shape: str
    colour: str
    style: str


def mascot_polygon(box: tuple[float, float, float, float]) -> list[tuple[float, float]]:
    """The mascot's silhouette filling ``box``: a dome, straight sides, a hem of three scallops."""
    left, top, right, bottom = box
    w, h = right - left, bottom - top
    r = w / 2
    dome = [(left + r - r * math.cos(math.pi * i / 24), top + r - r * math.sin(math.pi * i / 24)) for i in range(25)]
    hem_top = bottom - 0.16 * h
    hem = []
    for i in range(3 * 8 + 1):  # three downward scallops from right to left
        t = i / 8
        x = right - t * w / 3
        hem.append((x, hem_top + (bottom - hem_top) * abs(math.sin(math.pi * t))))
    return dome + [(right, top + r)] + hem + [(left, hem_top)]


def _polygon(shape: str, box: tuple[float, float, float, float]) -> list[tuple[float, float]]:
    return mascot_polygon(box) if shape == MASCOT else shape_polygon(shape, box)


def _pastel(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(round(0.45 * c + 0.55 * 255) for c in rgb)  # type: ignore[return-value]


def draw_styled(
    image: Image.Image,
    draw: ImageDraw.ImageDraw,
    scene: Drawn,
    box: tuple[float, float, float, float],
    k: float,
) -> None:
    """Draw ``scene``'s shape into ``image`` (drawn at ``k`` pixels per 64×64 pixel) in its style."""
    colour = COLOURS[MASCOT_COLOUR if scene.shape == MASCOT else scene.colour]
    points = _polygon(scene.shape, box)
    if scene.style == "plain":
        draw.polygon(points, fill=colour)
    elif scene.style == "outline":
        draw.polygon(points, outline=colour, width=round(_OUTLINE_WIDTH * k))
    elif scene.style == "stripes":
        mask = Image.new("L", image.size, 0)
        ImageDraw.Draw(mask).polygon(points, fill=255)
        stripes = Image.new("RGB", image.size, (255, 255, 255))
        sdraw = ImageDraw.Draw(stripes)
        period = _STRIPE_PERIOD * k
        for offset in range(-image.size[0], image.size[0], max(1, round(period))):
            sdraw.polygon(
                [(offset, 0), (offset + period / 2, 0), (offset + period / 2 + image.size[1], image.size[1]),
                 (offset + image.size[1], image.size[1])],
                fill=colour,
            )
        image.paste(stripes, (0, 0), mask)
    elif scene.style == "pastel":
        draw.rectangle((0, 0, image.size[0], image.size[1]), fill=_PASTEL_GROUND)
        draw.polygon(points, fill=_pastel(colour))
    else:
        raise ValueError(f"unknown style {scene.style!r}; expected one of {STYLES}")
    if scene.shape == MASCOT:
        _draw_eyes(draw, box)


def _draw_eyes(draw: ImageDraw.ImageDraw, box: tuple[float, float, float, float]) -> None:
    left, top, right, bottom = box
    w, h = right - left, bottom - top
    for ex in (left + 0.32 * w, left + 0.68 * w):
        ey, er = top + 0.38 * h, 0.12 * w
        draw.ellipse((ex - er, ey - er, ex + er, ey + er), fill=(255, 255, 255))
        pr = er * 0.5
        draw.ellipse((ex - pr, ey - pr + er * 0.2, ex + pr, ey + pr + er * 0.2), fill=(20, 20, 20))
