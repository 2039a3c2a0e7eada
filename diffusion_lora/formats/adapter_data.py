"""The in-memory form of an adapter, independent of any file format.

Every reader in ``formats/`` produces an :class:`AdapterData`; every writer consumes one. Module keys
are ``"<component>.<module path>"`` with the pipeline component first (``unet.down_blocks.0…to_q``,
``text_encoder.encoder.layers.0.self_attn.q_proj``), the way diffusers names them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..errors import FormatError


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

    def bias_delta(self, use_rslora: bool = False) -> torch.Tensor | None:
        """The change of the layer's bias, scale · bias ([out], ``up``'s dtype), as ComfyUI's ``diff_b``
        stores it; None without a bias."""
        if self.bias is None:
            return None
        return (self.bias.double() * self.scale(use_rslora)).to(self.up.dtype)


def bias_from_delta(name: str, diff_b: torch.Tensor, out_features: int, scale: float) -> torch.Tensor:
    """PEFT's ``lora_B`` bias for a layer whose bias changes by ``diff_b`` [out] under LoRA ``scale``.

    PEFT multiplies the bias by the scale, so the bias is diff_b / scale, kept in float32 (at least):
    scale · bias then equals diff_b to float32 rounding, also for a bfloat16 file. FormatError for a
    shape that is not [out_features].
    """
    if tuple(diff_b.shape) != (out_features,):
        raise FormatError(
            f"{name}.diff_b has shape {list(diff_b.shape)}; a layer with {out_features} outputs needs [{out_features}]"
        )
    return diff_b.to(torch.promote_types(diff_b.dtype, torch.float32)) / scale


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


# The largest weight delta a file may make us build, in elements (512 MiB in float32). The largest
# layer of any supported model (Flux's fused linear1, 3072 × 21504) has 66M; a small file whose
# factors multiply out past this is hostile or corrupt, and is refused before anything is allocated.
MAX_DELTA_ELEMENTS = 2**27


def check_delta_size(name: str, shape: Sequence[int], what: str = "weight delta") -> None:
    """Raise FormatError if a tensor of ``shape`` (about to be built from a file's factors) is absurd."""
    elements = math.prod(int(d) for d in shape)
    if elements > MAX_DELTA_ELEMENTS:
        raise FormatError(
            f"{name}: its {what} would be {list(shape)} ({elements:,} numbers), larger than any layer of a "
            f"supported model ({MAX_DELTA_ELEMENTS:,}); the file is corrupt or not an adapter"
        )
