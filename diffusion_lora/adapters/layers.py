"""PEFT's LoRA layers seen from outside: the plain layer under a wrapper, every adaptable layer of a
model, and the names PEFT gives the parts it puts inside a wrapped layer.

The one place that knows how a PEFT-wrapped model looks; ``models`` and ``tools`` use it through
here rather than repeating PEFT's sub-module names.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from peft.tuners.lora import LoraLayer

from .quantized import logical_shape

# The sub-modules PEFT puts inside a wrapped layer: the wrapped layer itself and the adapter's parts.
PEFT_PARTS = frozenset(
    {"base_layer", "lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector", "lora_dropout"}
)
# The parts that hold an adapter's state (everything but the wrapped layer).
ADAPTER_PARTS = PEFT_PARTS - {"base_layer"}
ADAPTABLE = (torch.nn.Linear, torch.nn.Conv2d)


def base_module(module: torch.nn.Module) -> torch.nn.Module:
    """The plain layer under a PEFT wrapper (or the module itself)."""
    return module.get_base_layer() if isinstance(module, LoraLayer) else module


def inside_lora_layer(path: str) -> bool:
    """Whether module path ``path`` names a part PEFT put inside a wrapped layer."""
    return any(p in PEFT_PARTS for p in path.split("."))


def plain_modules(model: torch.nn.Module) -> Iterable[tuple[str, torch.nn.Module]]:
    """(path, module) of every adaptable layer, seeing through existing LoRA wrappers."""
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield path, module.get_base_layer()
        elif isinstance(module, ADAPTABLE) and not inside_lora_layer(path):
            yield path, module


def layer_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Weight shape of every Linear/Conv2d layer (seeing through PEFT wrappers), by module path; for a
    quantized layer, the shape of the float weight it stands for."""
    return {p: logical_shape(m) for p, m in plain_modules(model)}


def plain_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict with PEFT wrappers seen through: ``….base_layer.weight`` → ``….weight``,
    adapter tensors (``lora_A``, ``lora_B``, …) dropped. Tensors are the model's own (not copies)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        parts = key.split(".")
        if any(p in ADAPTER_PARTS for p in parts):
            continue
        out[".".join(p for p in parts if p != "base_layer")] = value
    return out
