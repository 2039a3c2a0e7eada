"""The one way library code and tests call a diffusers pipeline to make images.

Pipelines differ in how they want to be called: Flux.2's first positional argument is ``image``, not
``prompt``; Flux.1 Kontext rescales every request to one megapixel unless ``max_area`` is given;
Kontext, Fill and Control variants need image inputs. :func:`run_pipeline` passes the prompt by
keyword, keeps the requested size, and checks the variant's image inputs before any work is done.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import ConfigError
from ..families import detect_variant

__all__ = ["IMAGE_INPUTS", "check_image_inputs", "run_pipeline"]

# image inputs a variant may need, with the CLI option that gives each
IMAGE_INPUTS: Mapping[str, str] = {"image": "--image", "mask_image": "--mask", "control_image": "--control-image"}


def _check_inputs(pipe: Any, images: Mapping[str, Any]) -> None:
    variant = detect_variant(pipe)
    missing = [name for name in variant.inputs if images.get(name) is None]
    if missing:
        options = ", ".join(IMAGE_INPUTS.get(name, name) for name in missing)
        raise ConfigError(f"{variant.title} ({type(pipe).__name__}) needs {options}: pass the image(s)")
    extra = [name for name, value in images.items() if value is not None and name not in variant.inputs]
    if extra:
        options = ", ".join(IMAGE_INPUTS.get(name, name) for name in extra)
        raise ConfigError(f"{variant.title} ({type(pipe).__name__}) takes no {options}; leave it out")


def check_image_inputs(pipe: Any, images: Mapping[str, Any]) -> None:
    """ConfigError when ``images`` lacks an image input the pipeline's variant needs or has one it does not
    take (what :func:`run_pipeline` checks), for callers that check before any work."""
    _check_inputs(pipe, {k: v for k, v in images.items() if v is not None})


def run_pipeline(pipe: Any, prompt: str | Sequence[str], *, images: Mapping[str, Any] | None = None,
                 **kwargs: Any) -> Any:
    """``pipe(prompt=prompt, **images, **kwargs)`` with the fixes every pipeline needs; its output object.

    ``images`` holds the variant's image inputs (``image``, ``mask_image``, ``control_image``);
    ConfigError names a missing one, or one the variant does not take, before anything runs.
    """
    images = {k: v for k, v in (images or {}).items() if v is not None}
    _check_inputs(pipe, images)
    accepted = inspect.signature(pipe.__call__).parameters
    if "max_area" in accepted and "height" in kwargs and "width" in kwargs:
        # Kontext: keep the requested size (its default rescales everything to 1024²)
        kwargs.setdefault("max_area", kwargs["height"] * kwargs["width"])
        if "_auto_resize" in accepted:
            kwargs.setdefault("_auto_resize", False)
    return pipe(prompt=prompt if isinstance(prompt, str) else list(prompt), **images, **kwargs)
