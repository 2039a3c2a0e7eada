"""Quantizing a pipeline's denoiser for QLoRA training and low-memory generation.

``nf4`` is bitsandbytes' 4-bit NormalFloat (QLoRA), ``int8`` and ``fp8`` torchao's weight-only int8 and
float8. Only the denoiser's linear layers are quantized (convolutions, norms and embeddings stay in the
compute dtype); the output projection stays in float as diffusers' quantizers keep it. The libraries are
the optional extra ``diffusion-lora[quant]``; a missing one is a ConfigError saying what to install.
"""

from __future__ import annotations

import enum
import importlib.util
from typing import Any

import torch

from ..compat import bitsandbytes as compat_bnb
from ..compat import torchao as compat_torchao
from ..errors import ConfigError

__all__ = ["Quantize", "keeps_float", "parse_quantize", "quantize_denoiser"]


class Quantize(enum.StrEnum):
    NF4 = "nf4"
    INT8 = "int8"
    FP8 = "fp8"


_LIBRARY = {Quantize.NF4: "bitsandbytes", Quantize.INT8: "torchao", Quantize.FP8: "torchao"}
# Kept in float: the denoiser's final projection (diffusers' quantizers keep the last layer too).
_KEEP = ("proj_out", "conv_out")


def parse_quantize(value: str | Quantize | None, setting: str = "quantize") -> Quantize | None:
    """``value`` as a :class:`Quantize` (None, "" and "none" mean no quantization); ConfigError naming
    ``setting`` otherwise."""
    if value is None or isinstance(value, Quantize):
        return value
    text = str(value).strip().lower()
    if text in ("", "none"):
        return None
    try:
        return Quantize(text)
    except ValueError:
        choices = ", ".join(q.value for q in Quantize)
        raise ConfigError(f"{setting}: {value!r} is not a quantization; expected one of {choices} (or none)") from None


def require_library(mode: Quantize, setting: str = "quantize") -> None:
    """ConfigError when the library ``mode`` needs is not installed."""
    name = _LIBRARY[mode]
    if importlib.util.find_spec(name) is None:
        raise ConfigError(
            f"{setting} = {mode.value} needs {name}, which is not installed: pip install 'diffusion-lora[quant]'"
        )


def keeps_float(path: str) -> bool:
    """Whether the denoiser's Linear at ``path`` stays in float when the denoiser is quantized."""
    return path.rsplit(".", 1)[-1] in _KEEP and "." not in path


def _denoiser(pipe: Any) -> torch.nn.Module:
    for attr in ("transformer", "unet"):
        module = getattr(pipe, attr, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise ConfigError(f"quantize: {type(pipe).__name__} has no transformer or unet to quantize")


def quantize_denoiser(pipe: Any, mode: str | Quantize, *, compute_dtype: torch.dtype | None = None) -> int:
    """Quantize the linear layers of ``pipe``'s denoiser in place to ``mode``; returns how many layers.

    ``compute_dtype`` (default: the denoiser's dtype) is what nf4 layers compute in; torchao layers
    compute in their weight's original dtype."""
    chosen = parse_quantize(mode)
    if chosen is None:
        return 0
    require_library(chosen)
    model = _denoiser(pipe)
    dtype = compute_dtype or model.dtype

    if chosen is Quantize.NF4:
        return compat_bnb.quantize_nf4(model, compute_dtype=dtype, skip=keeps_float)
    return compat_torchao.quantize(model, chosen.value, skip=keeps_float)
