"""Offloading a pipeline's weights to CPU memory while it generates on an accelerator, through diffusers.

``model`` (``enable_model_cpu_offload``) moves one whole component to the accelerator when it runs;
``sequential`` (``enable_sequential_cpu_offload``) moves each layer when it runs (least memory,
slowest); ``group`` (``enable_group_offload``, block level, one block per group, with CUDA streams)
moves one block at a time and overlaps the copies with computing. All three need an accelerator: on
the CPU everything is in memory already, so asking for them there is a ConfigError. diffusers' disk
offload is not offered: with LoRA layers it gives wrong outputs and gradients (measured on CPU, see
the issue 15 notes), since it writes each block's tensors once and reads those back.

Adapters: ``model`` and ``group`` offload keep every weight in CPU memory, so adapters can be loaded,
weighted, fused and removed after offloading is on (after a change of layers the group hooks are
re-applied, :func:`diffusion_lora.compat.diffusers.refresh_group_offload`). ``sequential`` offload
moves the weights to the meta device, so load (and fuse) adapters *before* enabling it: while it is on
the adapter functions refuse to add, remove, fuse or unfuse (setting the weights of unfused adapters,
enabling and disabling them still work).
"""

from __future__ import annotations

import enum
from typing import Any

import torch

from ..errors import ConfigError

__all__ = ["Offload", "apply_offload", "check_offload", "enable_offload", "parse_offload"]


class Offload(enum.Enum):
    MODEL = "model"
    SEQUENTIAL = "sequential"
    GROUP = "group"


def parse_offload(value: str | Offload | None, setting: str = "offload") -> Offload | None:
    """``value`` as an :class:`Offload` (None, "" and "none" mean no offloading); ConfigError naming
    ``setting`` otherwise (``disk`` with the reason it is not offered)."""
    if value is None or isinstance(value, Offload):
        return value
    text = str(value).strip().lower()
    if text in ("", "none"):
        return None
    if text == "disk":
        raise ConfigError(f"{setting}: disk offload is not offered: with LoRA adapters diffusers' disk offload "
                          "computes with stale weights; use model, sequential or group")
    try:
        return Offload(text)
    except ValueError:
        choices = ", ".join(o.value for o in Offload)
        raise ConfigError(f"{setting}: {value!r} is not an offload mode; expected one of {choices} (or none)") from None


def _accelerator() -> torch.device | None:
    """The machine's accelerator (CUDA, XPU, MPS, …), or None on a CPU-only machine."""
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    if accelerator is not None:
        return accelerator.current_accelerator() if accelerator.is_available() else None
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    return torch.device("mps") if mps is not None and mps.is_available() else None


def check_offload(value: str | Offload | None, device: str | torch.device | None = None,
                  setting: str = "offload") -> tuple[Offload, torch.device] | None:
    """The offload mode and the device the weights are computed on (``device``, default the machine's
    accelerator), or None for no offloading; ConfigError naming ``setting`` when there is no accelerator
    (or ``device`` is the CPU). Loads nothing, so a command can refuse before loading a model."""
    mode = parse_offload(value, setting)
    if mode is None:
        return None
    try:
        onload = torch.device(device) if device is not None else _accelerator()
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device: {device!r} is not a torch device (e.g. 'cuda', 'cuda:1', 'mps')") from exc
    if onload is None or onload.type == "cpu":
        raise ConfigError(f"{setting} = {mode.value} needs a GPU (or another accelerator); on the CPU everything "
                          "is in memory already, so drop the offload setting")
    return mode, onload


def enable_offload(pipe: Any, value: str | Offload | None, *, device: str | torch.device | None = None,
                   setting: str = "offload") -> None:
    """Turn on ``value``'s offloading (see the module docstring) for ``pipe``, computing on ``device``
    (default: the machine's accelerator). None does nothing; no accelerator is a ConfigError."""
    plan = check_offload(value, device, setting)
    if plan is not None:
        apply_offload(pipe, *plan, setting=setting)


def apply_offload(pipe: Any, mode: Offload, onload: torch.device, *, setting: str = "offload") -> None:
    """diffusers' offloading for ``mode`` onto ``onload``, without the accelerator check of
    :func:`enable_offload` (group offload from the CPU to the CPU runs, which tests use)."""
    method = {Offload.MODEL: "enable_model_cpu_offload", Offload.SEQUENTIAL: "enable_sequential_cpu_offload",
              Offload.GROUP: "enable_group_offload"}[mode]
    if not callable(getattr(pipe, method, None)):
        raise ConfigError(f"{setting} = {mode.value}: {type(pipe).__name__} has no {method} in this diffusers "
                          "version; use another offload mode or none")
    if mode is Offload.MODEL:
        pipe.enable_model_cpu_offload(device=onload)
    elif mode is Offload.SEQUENTIAL:
        pipe.enable_sequential_cpu_offload(device=onload)
    else:
        # Streams overlap the next block's copy with this block's compute; only CUDA and XPU have them.
        pipe.enable_group_offload(onload_device=onload, offload_type="block_level", num_blocks_per_group=1,
                                  use_stream=onload.type in ("cuda", "xpu"))
