"""Image inputs of a pipeline variant (a Kontext reference, a Fill image and mask, a Control image), read safely.

A variant's ``inputs`` (``families.Variant.inputs``) name the call arguments its pipeline needs
beside the prompt: ``image``, ``mask_image``, ``control_image`` (``models.invoke.run_pipeline``
checks them). :func:`read_input_image` opens a user's path as a regular file (a FIFO cannot hang
it), refuses files and pixel counts over a bound before decoding, and decodes it to RGB (or
grayscale for a mask).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any

from PIL import Image, ImageOps

from ..errors import ConfigError
from ..formats.regular_file import open_regular

MAX_INPUT_BYTES = 256 * 2**20  # an input image file
MAX_INPUT_PIXELS = 8192 * 8192  # before decoding: more is a decompression bomb, not a reference image
# the command-line / config spelling of each pipeline argument
OPTION = {"image": "image", "mask_image": "mask", "control_image": "control_image"}


def read_input_image(path: str | os.PathLike[str], what: str, *, gray: bool = False,
                     max_pixels: int = MAX_INPUT_PIXELS) -> Image.Image:
    """The image at ``path`` as RGB (``gray``: 8-bit grayscale), upright per its EXIF orientation.

    ConfigError naming ``what`` and the path when it is not a regular readable image file, is over
    :data:`MAX_INPUT_BYTES` or has more than ``max_pixels`` pixels.
    """
    with open_regular(path, error=ConfigError, what=f"{what} ") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > MAX_INPUT_BYTES:
            raise ConfigError(f"{what} {path}: {size:,} bytes is over the limit of {MAX_INPUT_BYTES:,}; "
                              "use a smaller file")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(fh)
                width, height = img.size
                if width * height > max_pixels:
                    raise ConfigError(f"{what} {path}: {width}x{height} is over the limit of {max_pixels:,} "
                                      "pixels; shrink it")
                img.load()
        except ConfigError:
            raise
        except Exception as exc:  # PIL raises many types for a bad file (OSError, SyntaxError, zlib.error ...)
            raise ConfigError(f"{what} {path}: not a readable image ({type(exc).__name__}: {exc})") from None
    img = ImageOps.exif_transpose(img)
    if gray:
        return img.convert("L")
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")


def image_inputs(paths: Mapping[str, Any]) -> dict[str, Image.Image]:
    """Each given input (a path or a PIL image) as the PIL image the pipeline takes; masks grayscale."""
    out: dict[str, Image.Image] = {}
    for key, value in paths.items():
        if value is None:
            continue
        if isinstance(value, Image.Image):
            out[key] = value.convert("L") if key == "mask_image" else value.convert("RGB")
        elif isinstance(value, (str, os.PathLike)):
            out[key] = read_input_image(value, OPTION.get(key, key), gray=key == "mask_image")
        else:
            raise ConfigError(f"{OPTION.get(key, key)}: expected a path or a PIL image, got {type(value).__name__}")
    return out
