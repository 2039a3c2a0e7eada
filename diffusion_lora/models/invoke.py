"""The one way library code and tests call a diffusers pipeline to make images.

Pipelines differ in how they want to be called: Flux.2's first positional argument is ``image``, not
``prompt``; Flux.1 Kontext rescales every request to one megapixel unless ``max_area`` is given;
Kontext, Fill and Control variants need image inputs; a modular pipeline (Flux.3) returns its state
unless asked for an output and takes one ``str`` prompt per call. :func:`run_pipeline` passes the
prompt by keyword, keeps the requested size, and checks the variant's image inputs before any work
is done.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from diffusers import ModularPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

from ..errors import ConfigError
from ..families import detect_variant

__all__ = ["IMAGE_INPUTS", "call_parameters", "check_image_inputs", "pipeline_name", "run_pipeline"]

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
    if isinstance(pipe, ModularPipeline):
        return _run_modular(pipe, prompt, images, kwargs)
    accepted = inspect.signature(pipe.__call__).parameters
    if "max_area" in accepted and "height" in kwargs and "width" in kwargs:
        # Kontext: keep the requested size (its default rescales everything to 1024²)
        kwargs.setdefault("max_area", kwargs["height"] * kwargs["width"])
        if "_auto_resize" in accepted:
            kwargs.setdefault("_auto_resize", False)
    return pipe(prompt=prompt if isinstance(prompt, str) else list(prompt), **images, **kwargs)


def _run_modular(pipe: Any, prompt: str | Sequence[str], images: Mapping[str, Any], kwargs: dict[str, Any]) -> Any:
    """A modular pipeline's images (or, for ``output_type="latent"``, its final denoiser-space latents)
    as an :class:`ImagePipelineOutput`. It takes one ``str`` prompt per call: a list runs one by one."""
    latent = kwargs.get("output_type") == "latent"
    if latent:  # the modular decoder has no latent output type; its state holds the final latents
        kwargs = {k: v for k, v in kwargs.items() if k != "output_type"}
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    guider = getattr(pipe, "guider", None)
    guidance = kwargs.pop("guidance_scale", None)
    if guidance is not None and guider is None:
        raise ConfigError(f"{type(pipe).__name__} has no guider: it takes no guidance_scale; leave it out")
    if guidance is not None:  # the CFG scale is a setting of the guider component: swapped for this call
        pipe.update_components(guider=guider.new(guidance_scale=float(guidance)))
    try:
        outs = [pipe(prompt=p, **images, **kwargs, output="latents" if latent else "images") for p in prompts]
    finally:
        if guidance is not None:
            pipe.update_components(guider=guider)
    if len(outs) == 1:
        return ImagePipelineOutput(images=outs[0])
    if isinstance(outs[0], torch.Tensor):
        return ImagePipelineOutput(images=torch.cat(outs))
    if isinstance(outs[0], np.ndarray):
        return ImagePipelineOutput(images=np.concatenate(outs))
    return ImagePipelineOutput(images=[image for out in outs for image in out])


def is_modular(pipe: Any) -> bool:
    """True for a diffusers modular pipeline (one ``str`` prompt per call: a list of prompts runs one by one)."""
    return isinstance(pipe, ModularPipeline)


def call_parameters(pipe: Any) -> Mapping[str, Any]:
    """The inputs a pipeline's call takes -> their defaults (None where there is none): the call's
    signature, or a modular pipeline's block inputs (its ``__call__`` takes ``**kwargs``)."""
    if isinstance(pipe, ModularPipeline):
        params = {p.name: p.default for p in pipe.blocks.inputs if p.name is not None}
        guider = getattr(pipe, "guider", None)
        if guider is not None and "guidance_scale" in guider.config:  # run_pipeline sets it on the guider
            params["guidance_scale"] = guider.config["guidance_scale"]
        return params
    params = inspect.signature(pipe.__call__).parameters
    return {k: (None if p.default is inspect.Parameter.empty else p.default) for k, p in params.items()}


def pipeline_name(pipe: Any) -> str | None:
    """The pipeline's ``name_or_path`` (the folder or repository it came from, or a tiny model's name);
    a modular pipeline has no such attribute and keeps it in its config."""
    name = getattr(pipe, "name_or_path", None)
    if name is None:
        config = getattr(pipe, "config", None) or {}
        name = config.get("_name_or_path") if isinstance(config, Mapping) else None
    return str(name) if name else None
