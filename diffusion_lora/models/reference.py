"""Real-size reference models of each family, built on the meta device: module names without weights.

Converting a kohya file to diffusers names (or back) needs the model's real module list, because
kohya's ``.``→``_`` flattening cannot be reversed by string rules. Building the published configs
(``Family.reference``) on the meta device gives that list in a second or two, with no download and
no memory for weights.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import diffusers
import torch
import transformers

from ..adapters.keys import keys_of_components
from ..families import ComponentSpec, get_family
from ..formats.model_keys import ModelKeys


def build_component(spec: ComponentSpec) -> torch.nn.Module:
    """An untrained instance of ``spec`` (on the current default device: meta for reference keys)."""
    if hasattr(transformers, spec.cls):  # a text encoder: it takes its config class, not kwargs
        cls = getattr(transformers, spec.cls)
        return cls(cls.config_class(**_plain(spec.config)))
    return getattr(diffusers, spec.cls)(**spec.config)


def _plain(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` as nested dicts: transformers' configs take sub-configs (``text_config``) only as dicts."""
    return {k: _plain(v) if isinstance(v, Mapping) else v for k, v in config.items()}


@functools.lru_cache(maxsize=None)
def reference_keys(family_name: str, variant: str | None = None) -> ModelKeys:
    """Module names of the family's published base model (SD1.5, SD2, SDXL base, SD3 medium, Flux.1-dev),
    or of its published ``variant`` (``"sd35-large"``, ``"flux1-fill"``, ...)."""
    family = get_family(family_name)
    reference = family.variant(variant).reference if variant else family.reference
    with torch.device("meta"):  # module names and shapes only: no weights are allocated
        components = {spec.name: build_component(spec) for spec in reference}
    return keys_of_components(family, components)
