"""Style adherence: how close a set of images is, in look, to a reference set (a LoRA's style set).

A style is what stays the same across a set of pictures of different things, so the metric compares
*set averages* of three simple image statistics, each in [0, 1]:

``colour``
    Total-variation distance between the sets' mean histograms of the foreground's saturation ×
    brightness (HSV S and V, 4 levels each, 16 bins; the foreground is defined under ``solidity``):
    0 when the sets are equally vivid, pale and dark, 1 when they share no bin. Hue and the
    background are left out on purpose: they say *what* is drawn (a red circle on black), not how.
``edges``
    Relative difference in edge density ``|a - b| / max(a, b)``, where edge density is the
    fraction of pixels whose largest channel gradient (``|dx| + |dy|`` of 0–255 values) exceeds
    48. Outlines, stripes and noise raise it.
``solidity``
    Difference in solidity: the foreground's pixels (those that differ from the border's median
    colour by more than 60 in some channel) divided by the area of their convex hull. About 1 for
    solid convex shapes, low for outlines and open textures.

``distance = colour + edges + solidity`` (0–3). How much of a gap a LoRA closes is
``1 - distance(lora images, style set) / distance(base images, style set)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

__all__ = ["ImageStats", "StyleDistance", "foreground_pixels", "image_stats", "pixel_array", "style_distance"]

_LEVELS = 4
_EDGE_THRESHOLD = 48
FOREGROUND_THRESHOLD = 60  # 0–255 per channel


def pixel_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """``image`` as an int16 ``[H, W, 3]`` array of 0–255 RGB values."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    return np.asarray(image, dtype=np.int16)


def foreground_pixels(image: Image.Image | np.ndarray, threshold: int = FOREGROUND_THRESHOLD) -> np.ndarray:
    """Boolean ``[H, W]``: pixels that differ from the border's median colour by > ``threshold``."""
    pixels = pixel_array(image)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    return np.abs(pixels - np.median(border, axis=0)).max(axis=-1) > threshold


@dataclass(frozen=True)
class ImageStats:
    """The statistics of a set of images (means over the set)."""

    histogram: np.ndarray  # [16] saturation × brightness, sums to 1
    edge_density: float
    solidity: float


@dataclass(frozen=True)
class StyleDistance:
    colour: float
    edges: float
    solidity: float

    @property
    def total(self) -> float:
        return self.colour + self.edges + self.solidity


def _hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of integer (x, y) pixel corners (Andrew's monotone chain)."""
    pts = sorted(set(map(tuple, points.tolist())))
    if len(pts) < 3:
        return float(len(pts))

    def half(seq: list) -> list:
        out: list = []
        for p in seq:
            while len(out) >= 2 and ((out[-1][0] - out[-2][0]) * (p[1] - out[-2][1])
                                     - (out[-1][1] - out[-2][1]) * (p[0] - out[-2][0])) <= 0:
                out.pop()
            out.append(p)
        return out

    hull = half(pts)[:-1] + half(pts[::-1])[:-1]
    xs, ys = np.array([p[0] for p in hull], float), np.array([p[1] for p in hull], float)
    return float(abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))) / 2)


def _solidity(mask: np.ndarray) -> float:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return 1.0
    # Each pixel is a unit square: the hull of its four corners covers it whole.
    corners = np.concatenate([np.stack([xs + dx, ys + dy], axis=1) for dx in (0, 1) for dy in (0, 1)])
    return float(min(1.0, len(xs) / _hull_area(corners)))


def _one(image: Image.Image) -> tuple[np.ndarray, float, float]:
    rgb = image.convert("RGB")
    pixels = np.asarray(rgb, dtype=np.int16)
    foreground = foreground_pixels(pixels)
    sv = np.asarray(rgb.convert("HSV"), dtype=np.int16)[..., 1:]
    q = (sv[foreground] if foreground.any() else sv.reshape(-1, 2)) * _LEVELS // 256
    hist = np.bincount(q[:, 0] * _LEVELS + q[:, 1], minlength=_LEVELS**2).astype(np.float64)
    grad = np.zeros(pixels.shape[:2], dtype=np.int32)
    grad[:, :-1] += np.abs(np.diff(pixels, axis=1)).max(axis=-1)
    grad[:-1, :] += np.abs(np.diff(pixels, axis=0)).max(axis=-1)
    edges = float((grad > _EDGE_THRESHOLD).mean())
    return hist / hist.sum(), edges, _solidity(foreground)


def image_stats(images: Sequence[Image.Image]) -> ImageStats:
    """Mean statistics of ``images`` (any sizes; at least one image)."""
    if not images:
        raise ValueError("image_stats needs at least one image")
    parts = [_one(im) for im in images]
    return ImageStats(
        histogram=np.mean([p[0] for p in parts], axis=0),
        edge_density=float(np.mean([p[1] for p in parts])),
        solidity=float(np.mean([p[2] for p in parts])),
    )


def style_distance(images: Sequence[Image.Image] | ImageStats, reference: Sequence[Image.Image] | ImageStats
                   ) -> StyleDistance:
    """Distance in look between two image sets (or their precomputed :class:`ImageStats`)."""
    a = images if isinstance(images, ImageStats) else image_stats(images)
    b = reference if isinstance(reference, ImageStats) else image_stats(reference)
    return StyleDistance(
        colour=float(0.5 * np.abs(a.histogram - b.histogram).sum()),
        edges=abs(a.edge_density - b.edge_density) / max(a.edge_density, b.edge_density, 1e-6),
        solidity=abs(a.solidity - b.solidity),
    )
