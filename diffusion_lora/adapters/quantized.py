"""What the adapter engine needs to know about a quantized base layer, whatever library quantized it.

A quantized Linear keeps its weight in a library's own tensor type: bitsandbytes ``Params4bit`` (packed
bytes, shape ``[out·in/2, 1]``), torchao ``Int8Tensor``/``Float8Tensor``, diffusers' ``GGUFParameter``
(GGUF block bytes). Code that reads ``module.weight`` (shapes for key matching, norms for load checks,
copies for fuse) asks here instead. Everything is detected from the weight itself, so a layer quantized by
diffusers' quantization configs and one quantized by :mod:`diffusion_lora.models.quantize` look the same.
"""

from __future__ import annotations

import enum

import torch

from ..compat import bitsandbytes as compat_bnb
from ..compat import diffusers as compat_diffusers
from ..compat import torchao as compat_torchao

__all__ = [
    "QuantKind",
    "compute_dtype",
    "dequantized_rows",
    "bias_problem",
    "dequantized_weight",
    "dora_problem",
    "logical_shape",
    "peft_layer_kwargs",
    "quant_kind",
    "requantize",
]


class QuantKind(enum.Enum):
    NF4 = "nf4"  # bitsandbytes 4-bit NormalFloat
    TORCHAO = "torchao"  # torchao weight-only int8 / float8
    GGUF = "gguf"  # diffusers' GGUF parameters (Q8_0, Q4_K, …)


def quant_kind(module: torch.nn.Module) -> QuantKind | None:
    """How ``module``'s weight is quantized, or None for a plain floating-point weight."""
    weight = getattr(module, "weight", None)
    if weight is None:
        return None
    if compat_bnb.is_4bit(weight):
        return QuantKind.NF4
    if compat_torchao.is_torchao(weight):
        return QuantKind.TORCHAO
    if compat_diffusers.is_gguf(weight):
        return QuantKind.GGUF
    return None


def logical_shape(module: torch.nn.Module) -> tuple[int, ...]:
    """The shape of the float weight ``module`` computes with (``[out, in]`` for a Linear)."""
    kind = quant_kind(module)
    if kind is QuantKind.NF4:
        return compat_bnb.logical_shape(module.weight)
    if kind is QuantKind.GGUF:
        return compat_diffusers.gguf_shape(module.weight)
    return tuple(module.weight.shape)  # torchao tensors report their logical shape


def dequantized_weight(module: torch.nn.Module) -> torch.Tensor:
    """``module``'s weight as a plain float tensor (a new tensor for a quantized layer; the weight itself
    otherwise)."""
    kind = quant_kind(module)
    weight = module.weight
    if kind is QuantKind.NF4:
        return compat_bnb.dequantize(weight)
    if kind is QuantKind.TORCHAO:
        return compat_torchao.dequantize(weight)
    if kind is QuantKind.GGUF:
        return compat_diffusers.gguf_dequantize(weight)
    return weight.detach()


def dequantized_rows(module: torch.nn.Module, rows: int) -> tuple[torch.Tensor, int]:
    """At most ``rows`` leading rows of ``module``'s float weight, and how many rows it has; for a quantized
    layer only the blocks holding those rows are dequantized (a whole 3072×3072 torchao int8 weight takes
    ~0.2 s on a CPU, and load checks look at every adapted layer)."""
    kind = quant_kind(module)
    weight = module.weight
    if kind is None:
        weight = weight.detach()
        return weight[:rows], weight.shape[0]
    count = logical_shape(module)[0]
    if kind is QuantKind.NF4:
        return compat_bnb.dequantize_rows(weight, rows), count
    if kind is QuantKind.TORCHAO:
        return compat_torchao.dequantize_rows(weight, rows), count
    return compat_diffusers.gguf_dequantize_rows(weight, rows), count


def requantize(module: torch.nn.Module, values: torch.Tensor) -> None:
    """Replace the quantized weight of ``module`` by ``values`` (float, its logical shape) quantized the same way,
    by the library that quantized it; the old weight object is not modified (fuse keeps it for unfuse)."""
    kind = quant_kind(module)
    if kind is QuantKind.NF4:
        module.weight = compat_bnb.quantize_like(module.weight, values)
    elif kind is QuantKind.TORCHAO:
        weight = module.weight  # a torchao tensor reports the dtype it dequantizes to
        compat_torchao.quantize_into(module, values.to(weight.dtype), compat_torchao.mode_of(weight))
    else:
        raise TypeError(f"cannot re-quantize a {kind} weight")


def dora_problem(module: torch.nn.Module, where: str) -> str | None:
    """Why a DoRA adapter cannot go on ``module`` (at ``where``), or None when it can. DoRA needs the base
    weight's row norms: PEFT dequantizes bitsandbytes and torchao weights for them, but reads a GGUF weight's
    block bytes as if they were the weight (a shape error, or wrong norms)."""
    if quant_kind(module) is QuantKind.GGUF:
        return (f"{where} is GGUF-quantized and PEFT's DoRA cannot compute the norms of GGUF weights; use a plain "
                f"LoRA there, or load the base unquantized or with quantize=nf4/int8/fp8")
    return None


def bias_problem(module: torch.nn.Module, where: str) -> str | None:
    """Why a LoRA that changes the bias (PEFT's ``lora_bias``: LyCORIS ``diff_b``, ComfyUI bias deltas) cannot go
    on ``module``, or None when it can: PEFT's torchao LoRA layer has no LoRA bias (0.21)."""
    if quant_kind(module) is QuantKind.TORCHAO:
        return (f"{where} is torchao-quantized ({compat_torchao.mode_of(module.weight)}) and PEFT's torchao LoRA "
                f"layer cannot hold a bias change; load the base unquantized or with quantize=nf4, or use a file "
                f"without bias deltas")
    return None


def compute_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype ``module``'s forward computes in: its weight's dtype, a bitsandbytes layer's
    ``compute_dtype``, a GGUF layer's ``compute_dtype``; float32 when none of these is floating."""
    dtype = getattr(module, "compute_dtype", None) if quant_kind(module) is not None else None
    if not isinstance(dtype, torch.dtype):
        dtype = module.weight.dtype
    return dtype if dtype.is_floating_point else torch.float32


def peft_layer_kwargs(module: torch.nn.Module) -> dict[str, object]:
    """The keywords PEFT's layer dispatch needs to give ``module`` its quantized LoRA layer: PEFT reads
    ``loaded_in_4bit`` from the model (diffusers sets ``is_loaded_in_4bit``) and the torchao re-quantizer
    from ``hf_quantizer``; we pass them per layer from the weight itself."""
    kind = quant_kind(module)
    if kind is QuantKind.NF4:
        return {"loaded_in_4bit": True}
    if kind is QuantKind.TORCHAO:
        return {"get_apply_tensor_subclass": compat_torchao.config_factory(compat_torchao.mode_of(module.weight))}
    return {}
