"""Training images read safely: decoded to 8-bit RGB within pixel and memory limits, and every image
checked before training, each problem reported at once."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageMode, ImageOps

from ..errors import ConfigError, DatasetError
from .buckets import Size
from .files import open_regular
from .scan import ImageItem

DEFAULT_MAX_PIXELS = 178_956_970  # PIL's own Image.MAX_IMAGE_PIXELS default
# Decoded pixel data (pixels × the mode's bits per pixel) allowed per image: an 8-bit RGB photo of
# 89 megapixels; a small, well-compressed 16-bit or RGBA file must not inflate to gigabytes.
DEFAULT_MAX_DECODED_BYTES = 256 * 2**20
_EXIF_ORIENTATION = 0x0112


@contextlib.contextmanager
def _open_image(
    path: Path, max_pixels: int, max_bytes: int = DEFAULT_MAX_DECODED_BYTES
) -> Iterator[Image.Image]:
    """``path`` opened lazily (header only) as a regular file, refusing more than ``max_pixels`` pixels
    or ``max_bytes`` of decoded pixel data before any decoding; the image and file close on exit."""
    with open_regular(path) as fh:
        try:
            with warnings.catch_warnings():
                # Our own limit below replaces PIL's warning; PIL's global limit is left untouched.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(fh)
        except Image.DecompressionBombError as exc:
            raise DatasetError(f"{path}: refused as a decompression bomb ({exc})") from exc
        except (OSError, ValueError, SyntaxError) as exc:
            raise DatasetError(f"{path}: not a readable image ({exc}); re-export it or remove it") from exc
        with img:
            _check_limits(path, img, max_pixels, max_bytes)
            yield img


def _check_limits(path: Path, img: Image.Image, max_pixels: int, max_bytes: int) -> None:
    width, height = img.size
    if width * height > max_pixels:
        raise DatasetError(
            f"{path}: {width}x{height} = {width * height} pixels is over the limit of {max_pixels} "
            "(possible decompression bomb); shrink the image or raise max_pixels if it is genuine"
        )
    decoded = width * height * _bits_per_pixel(img.mode) // 8
    if decoded > max_bytes:
        raise DatasetError(
            f"{path}: {width}x{height} {img.mode} decodes to {decoded:,} bytes, over the limit of {max_bytes:,} "
            "(possible decompression bomb); shrink it or save it with 8 bits per channel"
        )


def _bits_per_pixel(mode: str) -> int:
    try:
        info = ImageMode.getmode(mode)
        return len(info.bands) * 8 * int(info.typestr[-1])
    except (KeyError, ValueError, AttributeError):
        return 128  # an unknown mode: assume the widest (4 × 32-bit float)


def _decode(path: Path, img: Image.Image) -> Image.Image:
    try:
        img.load()
        return _to_rgb(ImageOps.exif_transpose(img))
    except Exception as exc:  # PIL's decoders raise many types (OSError, SyntaxError, zlib.error, ...)
        raise DatasetError(
            f"{path}: cannot be decoded ({type(exc).__name__}: {exc}); the file is corrupt or truncated"
        ) from exc


def load_image(path: str | os.PathLike[str], *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The image at ``path`` as 8-bit RGB, upright per its EXIF orientation.

    Transparency is composited on white; grayscale, 16-bit and 32-bit gray are scaled to 8 bits;
    CMYK and other modes are converted. An image over ``max_pixels`` pixels, or one that cannot be
    read or decoded, raises :class:`DatasetError` naming the path.
    """
    path = Path(path)
    with _open_image(path, max_pixels) as img:
        return _decode(path, img)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        return Image.fromarray(_gray_to_uint8(np.asarray(img)), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _gray_to_uint8(values: np.ndarray) -> np.ndarray:
    """Scale high-depth gray to 0..255: float in [0, 1] or [0, 255]; integers as 16-bit unless all ≤ 255.

    Converted a band of rows at a time, so the float64 work space stays small whatever the image size.
    """
    is_float = values.dtype.kind == "f"
    peak = float(values.max()) if values.size else 0.0
    out = np.empty(values.shape, dtype=np.uint8)
    rows = max(1, (1 << 16) // max(1, values.shape[-1] if values.ndim > 1 else values.size))
    for top in range(0, max(1, values.shape[0]), rows):
        band = values[top : top + rows].astype(np.float64)
        if is_float and peak <= 1.0:
            band = band * 255.0
        elif peak > 255:
            band = np.clip(band, 0, 65535) / 257.0
        out[top : top + rows] = np.clip(np.rint(band), 0, 255)
    return out


def image_size(path: str | os.PathLike[str], *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Size:
    """``(width, height)`` of the image as :func:`load_image` returns it (EXIF rotation applied), from the header."""
    path = Path(path)
    with _open_image(path, max_pixels) as img:
        width, height = img.size
        # A PNG's EXIF may sit after the pixel data, and PIL would decode the whole image to find it.
        if img.format == "PNG" and "exif" not in img.info:
            return (width, height)
        try:
            orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
        except Exception:  # noqa: BLE001 - bad EXIF: load_image/validate_images report it when decoding
            orientation = 1
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def validate_images(
    items: Iterable[ImageItem], *, min_side: int, skip_bad: bool, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[list[ImageItem], list[str]]:
    """Check every item before training; returns ``(good items, problem lines)``.

    Each image is opened and decoded once. Problems: unreadable, corrupt or truncated files; a side
    under a quarter of ``min_side`` (and under 2 pixels, whatever ``min_side``); over ``max_pixels``;
    the items' own :attr:`ImageItem.problems`. Each is a ``"path: reason"`` line. Unless ``skip_bad``,
    any problem raises one :class:`DatasetError` listing all of them.
    """
    if min_side < 0:
        raise ConfigError(f"min_side: {min_side} must be 0 or more")
    good: list[ImageItem] = []
    problems: list[str] = []
    for item in items:
        found = [f"{item.path}: {reason}" for reason in item.problems]
        if not item.problems or item.path.is_file():
            image_problem = _check_image(item.path, min_side, max_pixels)
            if image_problem:
                found.append(image_problem)
        for paired in (item.control, item.mask):  # decoded like the target; resized to it, so any size
            problem = None if paired is None else _check_image(paired, 0, max_pixels)
            if problem:
                found.append(problem)
        if found:
            problems.extend(found)
        else:
            good.append(item)
    if problems and not skip_bad:
        listing = "\n".join(f"  {line}" for line in problems)
        raise DatasetError(
            f"{len(problems)} problem(s) in the training images:\n{listing}\n"
            "Fix or remove these files, or skip them (skip_bad=True)."
        )
    return good, problems


def _check_image(path: Path, min_side: int, max_pixels: int) -> str | None:
    smallest = max(2.0, min_side / 4)
    try:
        with _open_image(path, max_pixels) as img:
            width, height = img.size
            if min(width, height) < smallest:
                return (
                    f"{path}: {width}x{height} pixels is too small (each side must be at least "
                    f"{smallest:g}, a quarter of the smallest bucket side {min_side}); use a larger image"
                )
            _decode(path, img)
    except DatasetError as exc:
        return str(exc)
    return None
