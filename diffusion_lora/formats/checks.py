"""Checks of an adapter's modules that need no pipeline: does a module fit a layer's shape, are its
numbers finite, does a whole file fit a model's layer list (the file tools' check)."""

from __future__ import annotations

import math

import torch

from ..errors import FormatError, KeyMappingError
from .adapter_data import AdapterData, ModuleLora
from .model_keys import ModelKeys


def fit_problem(
    where: str, in_f: int, out_f: int, kernel: tuple[int, ...], m: ModuleLora, has_bias: bool | None
) -> str | None:
    """Why ``m`` cannot be a LoRA of a layer ``in_f`` → ``out_f`` (conv: ``kernel`` (kh, kw)), or None.

    ``has_bias`` None means the layer's bias is unknown (a reference model's weight shapes only).
    """
    down, up, rank = m.down, m.up, m.rank
    # A rank above min(inputs, outputs) is redundant, not wrong: PEFT and diffusers accept it, and LoRA on
    # every conv (the `all` preset; LyCORIS' full one) puts the network's rank on a UNet's 4-channel
    # conv_out. Above both, it is a broken file.
    if rank < 1 or rank > max(in_f * math.prod(kernel), out_f):
        return f"{where}: rank {rank} is impossible for a layer of {in_f}→{out_f} features"
    if down.shape[1:2] != (in_f,) or (kernel and tuple(down.shape[2:]) not in (kernel,)):
        return f"{where}: down/lora_A has shape {list(down.shape)}, the layer needs [{rank}, {in_f}, …]"
    if up.shape[0] != out_f or up.shape[1] != rank or up[0].numel() != rank:
        return f"{where}: up/lora_B has shape {list(up.shape)}, the layer needs [{out_f}, {rank}]"
    if kernel and down.dim() != 4:
        return f"{where}: a conv layer needs 4-d LoRA weights, got {list(down.shape)}"
    if not kernel and (down.dim() != 2 or up.dim() != 2):
        return f"{where}: a linear layer needs 2-d LoRA weights, got {list(down.shape)} and {list(up.shape)}"
    if m.magnitude is not None and tuple(m.magnitude.shape) != (out_f,):
        return f"{where}: DoRA magnitude has shape {list(m.magnitude.shape)}, the layer needs [{out_f}]"
    if m.bias is not None and (tuple(m.bias.shape) != (out_f,) or has_bias is False):
        return f"{where}: a bias delta of shape {list(m.bias.shape)} needs a layer with a [{out_f}] bias"
    return None


def check_finite(key: str, m: ModuleLora, source: str) -> None:
    """FormatError naming ``source`` and ``key`` when a tensor of ``m`` holds NaN/Inf or its alpha is not
    a positive finite number."""
    for role, t in (("down", m.down), ("up", m.up), ("magnitude", m.magnitude), ("bias", m.bias)):
        if t is not None and not torch.isfinite(t).all():
            raise FormatError(
                f"{source}: the {role} weight of {key} contains NaN or Inf values; the file is broken "
                f"(re-download or re-export it) and was not used"
            )
    if not m.alpha > 0 or m.alpha != m.alpha or m.alpha == float("inf"):
        raise FormatError(f"{source}: alpha of {key} is {m.alpha}, it must be a positive finite number")


def check_against_keys(data: AdapterData, keys: ModelKeys, source: str) -> None:
    """The file-only check of the tools (convert, merge, resize): every module fits the model's layer
    shapes and holds finite numbers. Raises KeyMappingError / FormatError naming ``source``."""
    misfits = []
    for key, m in data.modules.items():
        component, _, path = key.partition(".")
        shape = keys.shape(component, path)
        if shape is None:  # a diffusers-format module path the model does not have
            misfits.append(f"{key}: the model has no Linear/Conv2d layer of that name")
            continue
        out_f, in_f, kernel = shape[0], shape[1], tuple(shape[2:])
        problem = fit_problem(key, in_f, out_f, kernel, m, None)
        if problem:
            misfits.append(problem)
            continue
        check_finite(key, m, source)
    if misfits:
        raise KeyMappingError(
            f"{source}: {len(misfits)} module(s) do not fit the {keys.family.title} model: "
            + "; ".join(misfits[:5]) + (" …" if len(misfits) > 5 else "") + "; nothing was written"
        )
