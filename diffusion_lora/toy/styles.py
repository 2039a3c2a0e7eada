"""Looks the base model never produces, and the mascot character, for the sample LoRA datasets.

A style changes how a scene is drawn, never what it shows, so one caption describes the scene in
every style: ``outline`` draws only a 3-pixel contour, ``stripes`` fills with diagonal stripes of
the colour and white, ``pastel`` draws everything in a fixed pastel palette on a cream ground.
The mascot, called by the made-up trigger word ``zorbo``, is an orange ghost with two eyes.

:data:`STYLES` are the looks the base model's VAE trains on (its UNet sees only ``plain``).
:data:`HELD_OUT_STYLES` stand for a user's own style and are never part of base training (the base
trainer refuses them): ``checker`` fills the shape with a checkerboard of its colour and a darker
shade (a pattern), ``faded`` grades the whole picture to washed-out, warm, lifted-black colours (a
colour grading), ``ink`` draws a near-black contour around the filled shape (a line treatment).
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np
from PIL import Image, ImageDraw

from diffusion_lora.toy.shapes import COLOURS, shape_polygon

__all__ = ["HELD_OUT_STYLES", "MASCOT", "MASCOT_COLOUR", "STYLES", "draw_styled", "mascot_polygon"]

STYLES: tuple[str, ...] = ("plain", "outline", "stripes", "pastel")
HELD_OUT_STYLES: tuple[str, ...] = ("checker", "faded", "ink")
MASCOT = "zorbo"  # the trigger word; several CLIP tokens, like real trigger words
MASCOT_COLOUR = "orange"
_OUTLINE_WIDTH = 3.0  # pixels of the 64×64 image
_STRIPE_PERIOD = 8.0  # pixels of the 64×64 image, along x + y
_PASTEL_GROUND = (250, 236, 214)
_CHECKER_CELL = 4.0  # pixels of the 64×64 image
_CHECKER_SHADE = 0.55  # the dark cells' colour, as a share of the shape's colour
_INK = (15, 15, 25)
_INK_WIDTH = 2.0  # pixels of the 64×64 image


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
    elif scene.style == "checker":
        draw.polygon(points, fill=colour)
        mask = Image.new("L", image.size, 0)
        ImageDraw.Draw(mask).polygon(points, fill=255)
        cell = _CHECKER_CELL * k
        ys, xs = np.indices((image.size[1], image.size[0]))
        dark = ((xs // cell + ys // cell) % 2 == 1) & (np.asarray(mask) > 0)
        shade = Image.new("RGB", image.size, tuple(round(_CHECKER_SHADE * c) for c in colour))
        image.paste(shade, (0, 0), Image.fromarray((dark * 255).astype(np.uint8)))
    elif scene.style == "ink":
        draw.polygon(points, fill=colour, outline=_INK, width=round(_INK_WIDTH * k))
    elif scene.style == "faded":
        draw.polygon(points, fill=colour)
    else:
        raise ValueError(f"unknown style {scene.style!r}; expected one of {STYLES + HELD_OUT_STYLES}")
    if scene.shape == MASCOT:
        _draw_eyes(draw, box)
    if scene.style == "faded":
        image.paste(_faded(image))


def _faded(image: Image.Image) -> Image.Image:
    """Washed-out film grading: 30 % desaturated, contrast 0.85 around lifted blacks, a warm cast."""
    rgb = np.asarray(image, dtype=np.float32)
    luma = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    graded = (0.7 * rgb + 0.3 * luma[..., None]) * 0.85 + 35 + np.array([10, 4, -10], dtype=np.float32)
    return Image.fromarray(np.clip(np.rint(graded), 0, 255).astype(np.uint8))


def _draw_eyes(draw: ImageDraw.ImageDraw, box: tuple[float, float, float, float]) -> None:
    left, top, right, bottom = box
    w, h = right - left, bottom - top
    for ex in (left + 0.32 * w, left + 0.68 * w):
        ey, er = top + 0.38 * h, 0.12 * w
        draw.ellipse((ex - er, ey - er, ex + er, ey + er), fill=(255, 255, 255))
        pr = er * 0.5
        draw.ellipse((ex - pr, ey - pr + er * 0.2, ex + pr, ey + pr + er * 0.2), fill=(20, 20, 20))
