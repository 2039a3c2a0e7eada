"""Per-pipeline adapter state: which adapters are loaded, their weights, and where their layers are.

PEFT keeps the LoRA tensors and per-layer scaling inside the model; this object keeps what PEFT has no
place for (the user's weight per adapter, per-block weights, the source file, the fused flag and the
exact base weights to restore on unfuse). It lives on the pipeline as one attribute, so two pipelines
never share state.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from peft.tuners.lora import LoraLayer

from ..compat.diffusers import refresh_group_offload
from ..families import Family, Variant, detect_family, detect_variant

STATE_ATTR = "_diffusion_lora_state"

Weight = float | dict[str, float]


@dataclass
class AdapterRecord:
    """What the user set for one adapter. ``weight`` is the blend factor (ComfyUI's strength)."""

    name: str
    weight: Weight = 1.0
    enabled: bool = True
    file: str | None = None
    trigger_words: tuple[str, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class LoraSite:
    """One PEFT LoRA layer in the pipeline, with the block it belongs to for per-block weights."""

    component: str
    path: str
    layer: LoraLayer
    block: tuple[str, int | None] | None


@dataclass
class FusedWeights:
    """Exact copies of base weights overwritten by fuse(), restored bit-exactly by unfuse(). A quantized
    base weight is kept as the original object itself (fusing builds a new one)."""

    originals: list[tuple[LoraLayer, torch.Tensor, torch.Tensor | None]] = field(default_factory=list)


class AdapterState:
    """The adapter bookkeeping of one pipeline; get it with :func:`state_of`."""

    def __init__(self, pipe: Any, family: Family, variant: Variant | None = None) -> None:
        self.family = family
        self.variant = variant or family.main_variant
        self.records: dict[str, AdapterRecord] = {}
        self.fused: FusedWeights | None = None
        self._pipe_components = self._components(pipe, family)
        self._sites: dict[tuple[str, str], LoraSite] | None = None
        self.layout: dict[str, int | None] | None = None  # block group -> count, see weights.block_layout
        self.model_keys: Any = None  # formats.model_keys.ModelKeys, see adapters.keys.model_keys_of

    @staticmethod
    def _components(pipe: Any, family: Family) -> dict[str, torch.nn.Module]:
        names = (family.denoiser,) + family.text_encoders
        return {n: getattr(pipe, n) for n in names if getattr(pipe, n, None) is not None}

    @property
    def components(self) -> dict[str, torch.nn.Module]:
        return self._pipe_components

    def invalidate(self) -> None:
        """Forget the cached layer list; call after layers were removed or replaced. diffusers' group
        offloading, where it is on, is re-applied so that its hooks hold the new layers' tensors."""
        self._sites = None
        for model in self._pipe_components.values():
            refresh_group_offload(model)

    def sites(self) -> list[LoraSite]:
        """Every LoRA layer in the pipeline's denoiser and text encoders (cached)."""
        if self._sites is None:
            self._sites = {(s.component, s.path): s for s in self._scan()}
        return list(self._sites.values())

    def add_sites(self, component: str, layers: Mapping[str, LoraLayer]) -> None:
        """Record LoRA layers just placed (path → layer), without rescanning the whole model."""
        if self._sites is None:
            return
        for path, layer in layers.items():
            if (component, path) not in self._sites:
                self._sites[(component, path)] = self._site(component, path, layer)

    def _site(self, component: str, path: str, layer: LoraLayer) -> LoraSite:
        block = self.family.block_of(path + ".") if component == self.family.denoiser else (component, None)
        return LoraSite(component, path, layer, block)

    def _scan(self) -> Iterator[LoraSite]:
        for component, model in self._pipe_components.items():
            for path, module in model.named_modules():
                if isinstance(module, LoraLayer):
                    yield self._site(component, path, module)

    def peft_adapter_names(self) -> list[str]:
        """Adapter names PEFT knows in any component, in load order."""
        names: dict[str, None] = {}
        for model in self._pipe_components.values():
            names.update(dict.fromkeys(getattr(model, "peft_config", {}) or {}))
        return list(names)

    def record(self, name: str) -> AdapterRecord:
        """The record of ``name``, adopting adapters that were loaded through diffusers' own API."""
        rec = self.records.get(name)
        if rec is None:
            rec = self.records[name] = AdapterRecord(name)
        return rec


def state_of(pipe: Any) -> AdapterState:
    """The AdapterState of ``pipe``, created on first use (detecting the family)."""
    state = pipe.__dict__.get(STATE_ATTR)
    if state is None:
        state = AdapterState(pipe, detect_family(pipe), detect_variant(pipe))
        object.__setattr__(pipe, STATE_ATTR, state)
    return state
