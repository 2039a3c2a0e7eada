"""Checks and context shared by the adapter API functions."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from ..errors import AdapterNotFoundError, AdapterStateError, ConfigError
from .fusing import fuse_state, unfuse_state
from .state import AdapterState


@contextlib.contextmanager
def refused(state: AdapterState, undo: Callable[[], None] | None = None) -> Iterator[None]:
    """Run a change with adapters unfused, fusing again afterwards if they were fused.

    If that re-fuse fails (the new adapters or weights overflow the dtype), ``undo`` reverts the
    change and the previous adapters are fused again — bit for bit as before, since fusing the same
    adapters at the same weights into the same restored base weights repeats the same arithmetic —
    and the fuse error is raised saying so. Without ``undo`` the pipeline is left unfused.
    """
    was_fused = state.fused is not None
    if was_fused:  # the re-fuse reads and writes the base weights
        refuse_meta_weights(state)
    unfuse_state(state)
    try:
        yield
    except BaseException:
        if was_fused:
            fuse_state(state)
        raise
    if not was_fused:
        return
    try:
        fuse_state(state)
    except AdapterStateError as exc:
        if undo is None:
            raise
        undo()
        fuse_state(state)
        raise AdapterStateError(f"{exc}; the change was undone and the previous adapters are fused as before") from exc


def refuse_meta_weights(state: AdapterState) -> None:
    """AdapterStateError when a component's weights are on the meta device (diffusers' sequential CPU
    offload keeps them elsewhere), where no adapter change could read or restore them."""
    for component, model in state.components.items():
        if any(p.device.type == "meta" for p in model.parameters()):
            raise AdapterStateError(
                f"{component}: its weights are on the meta device (sequential CPU offload keeps them elsewhere), so "
                "adapters cannot be added, removed, fused or unfused now (unfused weights can still be set); load "
                "and fuse adapters before enabling offload = sequential, or use offload = model or group"
            )


def check_name(name: object) -> str:
    if not isinstance(name, str) or not name or "." in name or name != name.strip():
        raise ConfigError(f"adapter name {name!r} must be a non-empty string without dots or outer spaces")
    if hasattr(torch.nn.ModuleDict, name):  # PEFT keeps adapters as ModuleDict entries by name
        raise ConfigError(
            f"adapter name {name!r} is the name of a torch module method or attribute, which PEFT cannot use "
            f"for an adapter; pass another name (e.g. {name + '_lora'!r})"
        )
    return name


def require(state: AdapterState, name: str) -> None:
    if name not in state.peft_adapter_names():
        loaded = ", ".join(state.peft_adapter_names()) or "none"
        raise AdapterNotFoundError(f"no adapter named {name!r} is loaded (loaded: {loaded})")


def require_new(state: AdapterState, name: str) -> None:
    if name in state.peft_adapter_names():
        raise AdapterStateError(
            f"an adapter named {name!r} is already loaded; pass another name, remove_lora() it first, "
            f"or hotswap() new weights into it"
        )
