"""The module names and layer shapes of a pipeline's components, as ``formats`` needs them to map keys."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import UnsupportedModelError
from ..families import Family
from ..formats.model_keys import ModelKeys
from ..formats.sgm_blocks import UNetLayout
from .layers import layer_shapes
from .state import AdapterState, state_of


def keys_of_components(family: Family, components: Mapping[str, torch.nn.Module]) -> ModelKeys:
    """ModelKeys of ``components`` (component name → model, the denoiser among them) of ``family``."""
    config = dict(components[family.denoiser].config)
    layout = None
    if family.denoiser == "unet":
        try:
            layout = UNetLayout.from_config(config)
        except UnsupportedModelError:  # no SGM names for this UNet; diffusers names still work
            layout = None
    return ModelKeys(family, {c: layer_shapes(m) for c, m in components.items()}, layout, config)


def model_keys_of(state: AdapterState) -> ModelKeys:
    """The module names and shapes of the pipeline's components (collected once)."""
    if state.model_keys is None:
        state.model_keys = keys_of_components(state.family, state.components)
    return state.model_keys


def pipeline_keys(pipe: Any) -> ModelKeys:
    """The module names and layer shapes of ``pipe``'s denoiser and text encoders (collected once)."""
    return model_keys_of(state_of(pipe))
