"""Real-size reference models of each family, built on the meta device: module names without weights.

Converting a kohya file to diffusers names (or back) needs the model's real module list, because
kohya's ``.``→``_`` flattening cannot be reversed by string rules. Building the published configs
(``Family.reference``) on the meta device gives that list in a second or two, with no download and
no memory for weights.
"""

from __future__ import annotations

import functools

import diffusers
import torch
import transformers

from ..adapters.layers import layer_shapes
from ..families import ComponentSpec, get_family
from ..formats.model_keys import ModelKeys
from ..formats.sgm_blocks import UNetLayout

# transformers text encoders take a config object; diffusers models take the config as kwargs.
_TEXT_CONFIG_CLASSES = {
    "CLIPTextModel": "CLIPTextConfig",
    "CLIPTextModelWithProjection": "CLIPTextConfig",
    "T5EncoderModel": "T5Config",
}


def build_component(spec: ComponentSpec) -> torch.nn.Module:
    """An untrained instance of ``spec`` (on the current default device: meta for reference keys)."""
    if spec.cls in _TEXT_CONFIG_CLASSES:
        config = getattr(transformers, _TEXT_CONFIG_CLASSES[spec.cls])(**spec.config)
        return getattr(transformers, spec.cls)(config)
    return getattr(diffusers, spec.cls)(**spec.config)


@functools.lru_cache(maxsize=None)
def reference_keys(family_name: str) -> ModelKeys:
    """Module names of the family's published base model (SD1.5, SD2, SDXL base, SD3 medium, Flux.1-dev)."""
    family = get_family(family_name)
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    layout = None
    config: dict = {}
    with torch.device("meta"):
        for spec in family.reference:
            model = build_component(spec)
            shapes[spec.name] = layer_shapes(model)
            if spec.name == family.denoiser:
                config = dict(model.config)
                layout = UNetLayout.from_config(config) if spec.name == "unet" else None
            del model
    return ModelKeys(family, shapes, layout, config)
