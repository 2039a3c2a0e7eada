"""Fusing active adapters into the base weights, and restoring those weights bit-exactly.

PEFT's ``unmerge`` subtracts the delta again, which in floating point does not give back the original
weights. We keep an exact copy of every base weight (and bias) that fusing overwrites, on the CPU, and
copy it back on unfuse.

On a quantized base (bitsandbytes nf4, torchao int8/fp8) fusing dequantizes, adds the deltas in float and
quantizes the sum once into a *new* weight object; re-quantizing again on unfuse would drift a little with
every cycle. We keep the original quantized weight object (no copy: it is not modified) and put it back on
unfuse, so unfuse is bit-exact there too. The fused output differs from the unfused one by the
re-quantization error of W + ΔW. GGUF layers have no merge in PEFT: fusing them is refused.
"""

from __future__ import annotations

import torch

from ..compat import peft as compat_peft
from ..compat.diffusers import refresh_group_offload
from ..errors import AdapterStateError
from .quantized import QuantKind, dequantized_weight, quant_kind, requantize
from .state import AdapterState, FusedWeights
from .weights import apply_weights


def _copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True)


def fuse_state(state: AdapterState) -> int:
    """Fuse every active adapter (at its current weights); returns the number of layers changed."""
    if state.fused is not None:
        return 0
    apply_weights(state)
    fused = FusedWeights()
    try:
        for site in state.sites():
            layer = site.layer
            active = [a for a in layer.active_adapters if a in layer.lora_A]
            if not active:
                continue
            base = layer.get_base_layer()
            kind = quant_kind(base)
            if kind is QuantKind.GGUF:
                raise AdapterStateError(
                    f"cannot fuse into {site.component}.{site.path}: it is GGUF-quantized and PEFT cannot merge "
                    "into GGUF weights; run unfused (same output, a little slower) or load an unquantized base"
                )
            bias = getattr(base, "bias", None)
            weight = _copy(base.weight) if kind is None else base.weight
            fused.originals.append((layer, weight, None if bias is None else _copy(bias)))
            if kind is None:
                layer.merge(adapter_names=active)
                finite = bool(torch.isfinite(base.weight).all())
            else:
                finite = _merge_quantized(layer, base, active)
            if not finite:
                raise AdapterStateError(
                    f"fusing adapters {active} into {site.component}.{site.path} gave non-finite weights; "
                    f"their weights are too large for this dtype — lower them or fuse in float32"
                )
    except BaseException:
        _restore(fused)
        _refresh_offload_hooks(state, fused)
        raise
    state.fused = fused
    _refresh_offload_hooks(state, fused)
    return len(fused.originals)


def _refresh_offload_hooks(state: AdapterState, fused: FusedWeights) -> None:
    """Fusing or unfusing a quantized layer swaps its weight object; diffusers' group offloading, where it is
    on, holds the tensors it saw when applied, so it is re-applied to see the current ones."""
    if any(quant_kind(layer.get_base_layer()) is not None for layer, _, _ in fused.originals):
        for model in state.components.values():
            refresh_group_offload(model)


def _merge_quantized(layer: torch.nn.Module, base: torch.nn.Module, active: list[str]) -> bool:
    """Fuse ``active`` into a quantized ``base``: W + ΣΔW in float from the dequantized weight, quantized once into
    a new weight object by the base's library. Returns False, leaving the weight alone, when the sum is not finite.

    Not PEFT's merge: its 4-bit and torchao merges re-quantize once per adapter (two stacked adapters, two
    rounding errors), PEFT 0.21's torchao merge fails on a second adapter (UnboundLocalError) and drops DoRA's
    magnitude, and its 4-bit merge adds a LoRA bias unscaled and flips the old weight's ``bnb_quantized`` flag.
    The deltas are PEFT's own (``get_delta_weight``, DoRA's ``merge_safe``), as in its float merge."""
    with torch.no_grad():
        bias = None if base.bias is None else base.bias.detach().clone()
        original = dequantized_weight(base)
        # summed in float32 (the deltas of several adapters add up before the one rounding), checked in the
        # dtype the library quantizes from, where a float16 sum could overflow
        weight, bias = compat_peft.merged_weights(layer, active, original.float(), bias)
        if not (torch.isfinite(weight.to(original.dtype)).all() and (bias is None or torch.isfinite(bias).all())):
            return False
        requantize(base, weight)
        if bias is not None:
            base.bias.data.copy_(bias)
    return True


def _restore(fused: FusedWeights) -> None:
    for layer, weight, bias in fused.originals:
        base = layer.get_base_layer()
        with torch.no_grad():
            if base.weight is weight:  # never merged (a failure before this layer's merge)
                pass
            elif quant_kind(base) is not None:
                del base.weight  # the merge built a new quantized weight: put the original object back
                base.weight = weight
            else:
                base.weight.data.copy_(weight)
            if bias is not None:
                base.bias.data.copy_(bias)
        compat_peft.forget_merges(layer)


def unfuse_state(state: AdapterState) -> int:
    """Restore the exact base weights saved by fuse; returns the number of layers restored."""
    if state.fused is None:
        return 0
    _restore(state.fused)
    _refresh_offload_hooks(state, state.fused)
    count = len(state.fused.originals)
    state.fused = None
    return count
