"""The PEFT internals diffusion_lora relies on, in one place, each chosen by feature detection.

PEFT has no public API to place one LoRA layer at one module path, to activate adapters on one layer
without touching ``requires_grad``, or to forget a merge whose weights were restored by hand; these
functions do it through PEFT's internals and say which PEFT versions spell them how. Everything here
is checked against the installed PEFT by ``tests/test_compat.py``.

pyproject requires PEFT >= 0.19 (transformers' own PEFT integration needs it), the floor CI tests; an
older PEFT (whose layers take each config field as its own keyword) gets a clear error instead of code
no CI run exercises.
"""

from __future__ import annotations

import functools
import inspect

import peft
import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.model import LoraModel

from ..errors import DiffusionLoraError

__all__ = [
    "add_to_layer",
    "forget_merges",
    "layers_take_config",
    "merged_weights",
    "mark_peft_loaded",
    "new_layer",
    "set_active_adapters",
]


@functools.cache
def layers_take_config() -> bool:
    """Whether PEFT's LoRA layers take the whole ``LoraConfig`` (``config=``; PEFT >= 0.19) rather than
    its fields one by one (``lora_dropout=``, ``use_dora=``, …; PEFT 0.17 and 0.18).

    Read once from the signature of ``LoraLayer.update_layer``.
    """
    return "config" in inspect.signature(LoraLayer.update_layer).parameters


def _require_config_layers() -> None:
    if not layers_take_config():
        raise DiffusionLoraError(
            f"PEFT {peft.__version__} is older than the 0.19 diffusion-lora needs (its LoRA layers take each "
            "config field as its own keyword); upgrade it: pip install -U 'peft>=0.19'"
        )


def new_layer(config: LoraConfig, name: str, target: torch.nn.Module, *, rank: int, alpha: float,
              path: str, quantized: dict[str, object] | None = None) -> LoraLayer:
    """A PEFT LoRA layer wrapping ``target`` (a plain Linear/Conv2d at module path ``path``) with adapter
    ``name`` of ``rank`` and ``alpha``; the caller puts it in the model.

    Uses ``LoraModel._create_new_module`` (a staticmethod in PEFT 0.17-0.21), which picks PEFT's layer
    class for the module type, quantized layers included. PEFT >= 0.19 takes ``config`` and reads the
    fields itself; 0.17/0.18 needed each field as a keyword (and raised ``KeyError: 'fan_in_fan_out'``
    when given the config): refused with a clear error. ``quantized`` holds the keywords PEFT's dispatchers
    read to pick a quantized layer class (``loaded_in_4bit`` for bitsandbytes 4-bit,
    ``get_apply_tensor_subclass`` for torchao; PEFT 0.17-0.21 take them as keywords of the same call).
    """
    _require_config_layers()
    return LoraModel._create_new_module(config, name, target, r=rank, lora_alpha=alpha, target_name=path,
                                        **(quantized or {}))


def add_to_layer(layer: LoraLayer, config: LoraConfig, name: str, *, rank: int, alpha: float, path: str) -> None:
    """Add adapter ``name`` (``rank``, ``alpha``) to an existing PEFT LoRA ``layer`` at ``path``.

    ``update_layer`` is public but its signature changed: ``(name, r, lora_alpha, config, **kwargs)`` in
    PEFT >= 0.19, ``(name, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora, use_dora, …)`` in
    0.17/0.18 (refused, as in :func:`new_layer`).
    """
    _require_config_layers()
    layer.update_layer(name, rank, lora_alpha=alpha, config=config, target_name=path)


def set_active_adapters(layer: LoraLayer, names: list[str]) -> None:
    """Make exactly ``names`` the active adapters of one LoRA ``layer``, leaving ``requires_grad`` alone.

    Assigns ``BaseTunerLayer._active_adapter`` (the attribute behind ``active_adapters`` in PEFT
    0.17-0.21): PEFT's ``set_adapter`` would also flip ``requires_grad`` on every adapter parameter.
    """
    layer._active_adapter = names


def mark_peft_loaded(model: torch.nn.Module, loaded: bool) -> None:
    """Record on a diffusers or transformers model whether it carries PEFT adapters.

    Sets ``_hf_peft_config_loaded``, the flag diffusers' and transformers' ``PeftAdapterMixin`` read
    (diffusers 0.35-0.42, transformers 5.x) before ``disable_adapters``/``set_adapters``/
    ``active_adapters``; a plain ``nn.Module`` just gains the attribute.
    """
    model._hf_peft_config_loaded = loaded


def forget_merges(layer: LoraLayer) -> None:
    """Tell a LoRA ``layer`` that no adapter is merged into its base weights any more (after the caller
    restored them exactly): empties ``merged_adapters`` (PEFT 0.17-0.21), which ``merged`` reads."""
    layer.merged_adapters.clear()


def merged_weights(layer: LoraLayer, names: list[str], weight: torch.Tensor,
                   bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``weight`` (the base layer's float weight) and ``bias`` with adapters ``names`` of ``layer`` merged in, in
    order, as PEFT's float merge computes them; records them as merged in ``layer``. Nothing is written into
    the base layer: the caller stores the result (re-quantized, for a quantized base).

    Uses ``get_delta_weight`` (vanilla LoRA), the adapter's ``lora_variant[name].merge_safe`` (DoRA and the
    other variants), ``lora_bias``/``scaling`` and ``merged_adapters`` (PEFT 0.19-0.21).
    """
    for name in names:
        if name in layer.lora_variant:
            weight = layer.lora_variant[name].merge_safe(layer, name, weight)
        else:
            weight = weight + layer.get_delta_weight(name).to(weight.dtype)
        if layer.lora_bias[name] and bias is not None:
            bias = bias + layer.lora_B[name].bias * layer.scaling[name]
    layer.merged_adapters.extend(names)
    return weight, bias
