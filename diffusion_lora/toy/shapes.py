"""The toy world's drawing vocabulary: its shapes, as polygons that fill a box, and its colour palette.

Below both ``scenes`` (what a picture shows) and ``styles`` (how it is drawn), which use it.
"""

from __future__ import annotations

import math

__all__ = ["COLOURS", "SHAPES", "shape_polygon"]

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
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")


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
