"""Fusing active adapters into the base weights, and restoring those weights bit-exactly.

PEFT's ``unmerge`` subtracts the delta again, which in floating point does not give back the original
weights. We keep an exact copy of every base weight (and bias) that fusing overwrites, on the CPU, and
copy it back on unfuse.
"""

from __future__ import annotations

import torch

from ..compat import peft as compat_peft
from ..errors import AdapterStateError
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
            bias = getattr(base, "bias", None)
            fused.originals.append((layer, _copy(base.weight), None if bias is None else _copy(bias)))
            layer.merge(adapter_names=active)
            if not torch.isfinite(base.weight).all():
                raise AdapterStateError(
                    f"fusing adapters {active} into {site.component}.{site.path} gave non-finite weights; "
                    f"their weights are too large for this dtype — lower them or fuse in float32"
                )
    except BaseException:
        _restore(fused)
        raise
    state.fused = fused
    return len(fused.originals)


def _restore(fused: FusedWeights) -> None:
    for layer, weight, bias in fused.originals:
        base = layer.get_base_layer()
        with torch.no_grad():
            base.weight.data.copy_(weight)
            if bias is not None:
                base.bias.data.copy_(bias)
        compat_peft.forget_merges(layer)


def unfuse_state(state: AdapterState) -> int:
    """Restore the exact base weights saved by fuse; returns the number of layers restored."""
    if state.fused is None:
        return 0
    _restore(state.fused)
    count = len(state.fused.originals)
    state.fused = None
    return count
