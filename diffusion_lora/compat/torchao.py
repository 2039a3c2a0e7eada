"""torchao weight-only quantization (int8, float8) of linear layers, and reading the weights back.

torchao quantizes in place (``quantize_``): the module stays an ``nn.Linear`` and its weight becomes a
torchao tensor subclass (``Int8Tensor``, ``Float8Tensor``). diffusers' ``TorchAoConfig`` does the same at
load time; diffusers 0.42 accepts only config objects there (``TorchAoConfig("int8_weight_only")`` is a
TypeError). PEFT gives such layers its ``TorchaoLoraLinear``, whose merge re-quantizes with the config
returned by ``get_apply_tensor_subclass`` (:func:`config_factory`). torchao is imported only inside the
functions, so the package works without the ``[quant]`` extra.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["MODES", "config_factory", "dequantize", "dequantize_rows", "is_torchao", "quantize", "quantize_into"]

# Our names → torchao's weight-only configs (class names in torchao.quantization, 0.15-0.18).
MODES = {"int8": "Int8WeightOnlyConfig", "fp8": "Float8WeightOnlyConfig"}


def is_torchao(weight: object) -> bool:
    """Whether ``weight`` is a torchao quantized tensor (checked without importing torchao)."""
    return any(c.__module__.startswith("torchao") for c in type(weight).__mro__[:-1])


def config_factory(mode: str) -> Callable[[], object]:
    """A function returning a fresh torchao config for ``mode`` ("int8" or "fp8"), the callable PEFT's
    ``TorchaoLoraLinear`` takes as ``get_apply_tensor_subclass``."""
    import torchao.quantization as q

    cls = getattr(q, MODES[mode])
    return lambda: cls()


def quantize(model: torch.nn.Module, mode: str, *, skip: Callable[[str], bool]) -> int:
    """Quantize the weight of every plain ``nn.Linear`` of ``model`` whose path ``skip`` rejects, weight-only,
    in place; returns how many. The activations and the matmul stay in the weight's original dtype."""
    from torchao.quantization import quantize_

    chosen: list[str] = []

    def wanted(module: torch.nn.Module, path: str) -> bool:
        ok = type(module) is torch.nn.Linear and not skip(path) and not is_torchao(module.weight)
        if ok:
            chosen.append(path)
        return ok

    quantize_(model, config_factory(mode)(), filter_fn=wanted)
    return len(chosen)


def dequantize(weight: torch.Tensor) -> torch.Tensor:
    """The float weight a torchao quantized tensor stands for."""
    return weight.dequantize()


def quantize_into(module: torch.nn.Module, values: torch.Tensor, mode: str) -> None:
    """Give ``module`` a new weight: ``values`` (float ``[out, in]``) quantized to ``mode`` by torchao, as
    PEFT's torchao merge does; the old weight object is left as it was."""
    from torchao.quantization import quantize_

    del module.weight
    module.weight = torch.nn.Parameter(values.detach(), requires_grad=False)
    quantize_(module, config_factory(mode)())


def dequantize_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """The first ``rows`` rows of the float weight a torchao quantized tensor stands for; the int8/float8
    weight-only tensors keep one scale per row, so slicing rows before dequantizing gives the same values."""
    return weight[:rows].dequantize()


def mode_of(weight: torch.Tensor) -> str:
    """Our mode name ("int8", "fp8") for a torchao quantized weight, from its tensor class."""
    name = type(weight).__name__.lower()
    if "float8" in name:
        return "fp8"
    if "int8" in name:
        return "int8"
    raise ValueError(f"unsupported torchao weight type {type(weight).__name__}")
