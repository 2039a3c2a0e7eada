"""The in-memory form of an adapter, independent of any file format.

Every reader in ``formats/`` produces an :class:`AdapterData`; every writer consumes one. Module keys
are ``"<component>.<module path>"`` with the pipeline component first (``unet.down_blocks.0…to_q``,
``text_encoder.encoder.layers.0.self_attn.q_proj``), the way diffusers names them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class ModuleLora:
    """One module's low-rank update ΔW = scale · up @ down.

    ``down``: [rank, in_features] (conv: [rank, in_channels, kh, kw]);
    ``up``: [out_features, rank] (conv: [out_channels, rank, 1, 1]);
    ``alpha``: the producer's alpha, so scale = alpha / rank (alpha / √rank with rsLoRA);
    ``magnitude``: DoRA magnitude in PEFT's convention, [out_features], or None for plain LoRA;
    ``bias``: PEFT's ``lora_B`` bias, [out_features], so the layer's bias changes by scale · bias
    (LyCORIS ``diff_b``), or None.
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    magnitude: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def scale(self, use_rslora: bool = False) -> float:
        return self.alpha / (math.sqrt(self.rank) if use_rslora else self.rank)


@dataclass
class AdapterData:
    """A whole adapter: its modules plus the facts that apply to all of them."""

    modules: dict[str, ModuleLora]
    use_rslora: bool = False
    metadata: dict[str, str] = field(default_factory=dict)
    format: str = "diffusers"

    @property
    def use_dora(self) -> bool:
        return any(m.magnitude is not None for m in self.modules.values())

    def components(self) -> dict[str, dict[str, ModuleLora]]:
        """Modules grouped by pipeline component, keyed by their path inside that component."""
        grouped: dict[str, dict[str, ModuleLora]] = {}
        for key, module in self.modules.items():
            component, _, path = key.partition(".")
            grouped.setdefault(component, {})[path] = module
        return grouped

    def tensors(self) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        for m in self.modules.values():
            out += [t for t in (m.down, m.up, m.magnitude, m.bias) if t is not None]
        return out
