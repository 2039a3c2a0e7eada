"""Aspect-ratio buckets: the bucket sizes, which bucket an image goes to, and the resize + crop into it.

Sizes are ``(width, height)`` pairs in pixels, as PIL writes them, except the SDXL geometry in
:class:`Prepared`, which is ``(height, width)`` / ``(top, left)`` as diffusers' SDXL pipelines take it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from ..errors import ConfigError

Size = tuple[int, int]


def make_buckets(resolution: int, step: int = 64, min_side: int = 256, max_side: int = 2048) -> list[Size]:
    """All ``(width, height)`` buckets of area ≤ ``resolution²``, from tall to wide (kohya's rule).

    For every width from ``min_side`` to ``max_side`` in steps of ``step``, the largest height that is a
    multiple of ``step``, at most ``max_side`` and keeps ``width * height <= resolution**2``; a pair
    whose height falls under ``min_side`` is left out; each pair is added transposed too, so the set
    is symmetric between tall and wide. The square ``(resolution, resolution)`` is always
    there. Sorted, no duplicates.
    """
    _check_positive(step=step, resolution=resolution, min_side=min_side, max_side=max_side)
    for name, value in (("resolution", resolution), ("min_side", min_side), ("max_side", max_side)):
        if value % step:
            raise ConfigError(f"{name}: {value} is not a multiple of step {step}; use a multiple of {step}")
    if not min_side <= resolution <= max_side:
        raise ConfigError(
            f"resolution: {resolution} is outside [min_side, max_side] = [{min_side}, {max_side}]; "
            "widen the bucket side limits or change the resolution"
        )
    max_area = resolution * resolution
    buckets = {(resolution, resolution)}
    for width in range(min_side, max_side + 1, step):
        height = min(max_side, (max_area // width) // step * step)
        if height >= min_side:
            buckets.update(((width, height), (height, width)))  # both ways, so tall and wide match
    return sorted(buckets)


def assign_bucket(size: Size, buckets: Sequence[Size], *, no_upscale: bool = False, step: int = 64) -> Size:
    """The bucket for an image of ``size = (width, height)``.

    The bucket whose aspect ratio is nearest to the image's (distance of log-ratios, so tall and wide
    count alike); on a tie, the larger area. With ``no_upscale``, an image that would have to be
    enlarged to cover that bucket gets a bucket of its own instead: its size, shrunk to fit the largest
    bucket area if needed, with each side rounded down to a multiple of ``step`` (at least ``step``) —
    so it is only ever shrunk (an image under ``step`` pixels on a side is the one exception, and
    :func:`~diffusion_lora.training.dataset.validate_images` rejects those).
    """
    width, height = size
    _check_positive(step=step, width=width, height=height)
    if not buckets:
        raise ConfigError("buckets: empty; build them with make_buckets()")
    ratio = math.log(width / height)

    def rank(bucket: Size) -> tuple[float, int]:
        # Rounded so that exact ties (e.g. 2:1 vs 1:2 from a square) are decided by area, not float noise.
        return (round(abs(math.log(bucket[0] / bucket[1]) - ratio), 9), -bucket[0] * bucket[1])

    best = min(buckets, key=rank)
    if not no_upscale or (width >= best[0] and height >= best[1]):
        return best
    max_area = max(w * h for w, h in buckets)
    shrink = min(1.0, math.sqrt(max_area / (width * height)))
    own_w = max(step, int(width * shrink) // step * step)
    own_h = max(step, int(height * shrink) // step * step)
    return (own_w, own_h)


@dataclass(frozen=True)
class Prepared:
    """An image resized and cropped to its bucket, with the geometry SDXL conditions on.

    ``original_size``: (height, width) of the image before resizing. ``crop_top_left``: (top, left) of
    the crop in the resized image. ``target_size``: (height, width) of the bucket. ``resized_size``:
    (height, width) of the image after resizing, before cropping (needed to mirror the crop on flip).
    """

    image: Image.Image
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_size: tuple[int, int]
    resized_size: tuple[int, int]


def resize_and_crop(img: Image.Image, bucket: Size, *, center: bool, rng: random.Random | None) -> Prepared:
    """Resize ``img`` (LANCZOS) to the smallest size covering ``bucket`` at the same aspect ratio, then crop.

    The crop is centred, or placed at a random offset drawn from ``rng`` (required when ``center`` is
    false, so that the offset is reproducible).
    """
    bucket_w, bucket_h = bucket
    width, height = img.size
    _check_positive(bucket_width=bucket_w, bucket_height=bucket_h, width=width, height=height)
    if not center and rng is None:
        raise ConfigError("rng: a random crop needs a random.Random; pass one, or center=True")
    scale = max(bucket_w / width, bucket_h / height)
    new_w = max(bucket_w, round(width * scale))
    new_h = max(bucket_h, round(height * scale))
    if (new_w, new_h) != (width, height):
        img = img.resize((new_w, new_h), Image.Resampling.LANCZOS)
    if center:
        left, top = (new_w - bucket_w) // 2, (new_h - bucket_h) // 2
    else:
        assert rng is not None
        left, top = rng.randint(0, new_w - bucket_w), rng.randint(0, new_h - bucket_h)
    if (new_w, new_h) != (bucket_w, bucket_h):
        img = img.crop((left, top, left + bucket_w, top + bucket_h))
    return Prepared(
        image=img,
        original_size=(height, width),
        crop_top_left=(top, left),
        target_size=(bucket_h, bucket_w),
        resized_size=(new_h, new_w),
    )


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ConfigError(f"{name}: {value} must be a positive number of pixels")
