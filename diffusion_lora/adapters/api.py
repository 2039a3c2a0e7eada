"""The public adapter API: add, load, stack with weights, fuse, remove (hot-swap and save in transfer.py).

Every function takes the diffusers pipeline first. Adapters are PEFT LoRA layers, so diffusers' own
``pipe.get_list_adapters()`` and ``pipe.set_adapters()`` see them too. Any number of adapters can be
active at once, each at its own weight; loading one never deactivates the others.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from peft import LoraConfig

from ..compat.diffusers import refresh_group_offload
from ..errors import ConfigError, DiffusionLoraError, FormatError
from ..formats.adapter_files import default_adapter_name, read_adapter
from ..formats.metadata import trigger_words_of
from ..formats.printable import printable
from .fusing import fuse_state, unfuse_state
from .guards import check_name, refuse_meta_weights, refused, require, require_new
from .inject import assign_weights, config_for, inject, remove_from_model, target_paths
from .keys import model_keys_of
from .state import AdapterRecord, AdapterState, Weight, state_of
from .validate import LoadPlan, plan_load
from .weights import apply_weights, block_layout, validate_weight

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraInfo:
    """One loaded adapter as :func:`list_loras` reports it."""

    name: str
    rank: int | dict[str, int]
    alpha: float | dict[str, float]
    weight: Weight
    enabled: bool
    file: str | None
    modules: int


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_lora` with ``strict=False`` loaded and skipped."""

    name: str
    loaded: int
    skipped: tuple[str, ...]


def add_lora(
    pipe: Any,
    name: str,
    rank: int = 16,
    alpha: float | None = None,
    targets: str | Sequence[str] = "attn",
    text_encoder: bool = False,
    use_dora: bool = False,
    use_rslora: bool = False,
) -> str:
    """Add a new, trainable LoRA adapter (ΔW = 0 at start) to the pipeline's denoiser.

    ``targets`` is a preset of the family (``attn``, ``attn-ff``, ``all-linear``, ``all``: every Linear and
    Conv2d) or a list of module names/suffixes (Conv2d ones too: ``conv1``, ``conv2``); ``alpha`` defaults
    to ``rank`` (scale 1). With ``text_encoder=True`` the family's LoRA-able (CLIP) text encoders get LoRA
    on their attention projections too (a family with none, such as Flux.3, adapts its denoiser only;
    training refuses ``lora.text_encoder`` there). Afterwards only LoRA parameters require grad.
    """
    state = state_of(pipe)
    check_name(name)
    require_new(state, name)
    refuse_meta_weights(state)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"rank must be a positive integer, got {rank!r}")
    alpha = float(rank if alpha is None else alpha)
    if not alpha > 0:
        raise ConfigError(f"alpha must be positive, got {alpha!r}")
    family = state.family
    plan = {family.denoiser: target_paths(state.components[family.denoiser], family, targets, family.denoiser)}
    if text_encoder:
        for component in family.lora_text_encoders:
            if component in state.components:
                plan[component] = target_paths(
                    state.components[component], family, family.text_encoder_targets, component
                )
    with refused(state):
        try:
            for component, paths in plan.items():
                config = LoraConfig(
                    r=rank, lora_alpha=alpha, target_modules=paths, use_dora=use_dora, use_rslora=use_rslora
                )
                layers = dict.fromkeys(paths, (rank, alpha, False))
                inject(state.components[component], name, config, layers, empty=False)
        except BaseException:
            _remove_everywhere(state, name)
            raise
        finally:
            state.invalidate()
        _mark_trainable(pipe, state, name)
        state.records[name] = AdapterRecord(name)
        apply_weights(state)
    return name


def _mark_trainable(pipe: Any, state: AdapterState, name: str) -> None:
    for component in pipe.components.values():
        if hasattr(component, "requires_grad_"):
            component.requires_grad_(False)
    for site in state.sites():
        layer = site.layer
        for group in (layer.lora_A, layer.lora_B, layer.lora_magnitude_vector):
            if name in group:
                group[name].requires_grad_(True)


def _remove_everywhere(state: AdapterState, name: str) -> int:
    count = sum(remove_from_model(model, name) for model in state.components.values())
    state.invalidate()
    return count


def load_lora(
    pipe: Any,
    path: str | os.PathLike,
    name: str | None = None,
    weight: Weight = 1.0,
    *,
    strict: bool = True,
    allow_pickle: bool = False,
) -> str | LoadReport:
    """Load an adapter file or folder and activate it at ``weight`` beside the adapters already active.

    Returns the adapter's name (the file's stem unless ``name`` is given); with ``strict=False`` a
    :class:`LoadReport` of what was loaded and skipped. Everything is checked before the pipeline is
    touched: on any error the pipeline is exactly as before the call.
    """
    state = state_of(pipe)
    refuse_meta_weights(state)
    read = read_adapter(path, model_keys_of(state), allow_pickle=allow_pickle)
    weight_file, data = read.path, read.data
    name = check_name(name if name is not None else default_adapter_name(weight_file))
    require_new(state, name)
    weight = validate_weight(name, weight, block_layout(state))
    plan = plan_load(state, data, str(weight_file), strict=strict, unresolved=read.unresolved)
    trigger_words = trigger_words_of(data.metadata)  # metadata is parsed before anything changes
    with refused(state, undo=lambda: _unload(state, name)):
        _inject_plan(state, name, plan, data.use_rslora)
        state.records[name] = AdapterRecord(
            name, weight=weight, file=str(weight_file), trigger_words=trigger_words, metadata=data.metadata,
        )
        apply_weights(state)
    if plan.skipped:
        logger.warning("%s: skipped %d module(s) that match no layer: %s", printable(weight_file), len(plan.skipped),
                       printable(", ".join(plan.skipped[:5]) + (", …" if len(plan.skipped) > 5 else "")))
    return LoadReport(name, plan.count, tuple(plan.skipped)) if not strict else name


def _unload(state: AdapterState, name: str) -> None:
    """Take a just-loaded adapter out again (the undo of a load whose re-fuse failed)."""
    _remove_everywhere(state, name)
    state.records.pop(name, None)
    apply_weights(state)


def _inject_plan(state: AdapterState, name: str, plan: LoadPlan, use_rslora: bool) -> None:
    try:
        for component, modules in plan.modules.items():
            model = state.components[component]
            layers = {path: (m.rank, m.alpha, m.bias is not None) for path, m in modules.items()}
            placed = inject(model, name, config_for(modules, use_rslora), layers, empty=True)
            state.add_sites(component, placed)
            assign_weights(placed, name, modules)
            refresh_group_offload(model)  # its hooks must hold the new layers' tensors
    except BaseException as exc:
        _remove_everywhere(state, name)
        if isinstance(exc, DiffusionLoraError) or not isinstance(exc, Exception):
            raise
        raise FormatError(f"adapter {name!r} could not be placed in the pipeline: {exc}") from exc


def set_weights(pipe: Any, weights: Mapping[str, Weight]) -> None:
    """Activate exactly the named adapters, each at its weight (a number or a per-block dict).

    Adapters not named stay loaded but inactive (``enable`` brings them back at their last weight).
    """
    state = state_of(pipe)
    layout = block_layout(state)
    checked = {}
    for name, weight in weights.items():
        require(state, name)
        checked[name] = validate_weight(name, weight, layout)
    wanted = {n: (n in checked, checked.get(n, state.record(n).weight)) for n in state.peft_adapter_names()}
    unchanged = all((state.record(n).enabled, state.record(n).weight) == w for n, w in wanted.items())
    if unchanged and state.fused is not None:
        return  # re-fusing the same weights would only cost time
    with refused(state, undo=_restorer(state)):
        for name, (enabled, weight) in wanted.items():
            rec = state.record(name)
            rec.enabled, rec.weight = enabled, weight
        apply_weights(state)


def _restorer(state: AdapterState) -> Callable[[], None]:
    """A function that puts every adapter's enabled flag and weight back as they are now."""
    saved = {n: (r.enabled, r.weight) for n, r in state.records.items()}

    def restore() -> None:
        for name, (enabled, weight) in saved.items():
            rec = state.record(name)
            rec.enabled, rec.weight = enabled, weight
        apply_weights(state)

    return restore


def _set_enabled(pipe: Any, names: str | Sequence[str] | None, enabled: bool) -> None:
    state = state_of(pipe)
    chosen = state.peft_adapter_names() if names is None else [names] if isinstance(names, str) else list(names)
    for name in chosen:
        require(state, name)
    with refused(state, undo=_restorer(state)):
        for name in chosen:
            state.record(name).enabled = enabled
        apply_weights(state)


def enable(pipe: Any, names: str | Sequence[str] | None = None) -> None:
    """Activate the named adapters (all when None) at their current weights."""
    _set_enabled(pipe, names, True)


def disable(pipe: Any, names: str | Sequence[str] | None = None) -> None:
    """Deactivate the named adapters (all when None); they stay loaded and keep their weights."""
    _set_enabled(pipe, names, False)


def remove_lora(pipe: Any, name: str) -> None:
    """Unload an adapter; layers left without adapters become plain layers again."""
    state = state_of(pipe)
    require(state, name)
    refuse_meta_weights(state)
    if state.fused is not None and state.record(name).enabled:
        # A removal cannot be undone, so first re-fuse without it (undone if that overflows): the
        # re-fuse after the removal then repeats a fuse that succeeded.
        _set_enabled(pipe, [name], False)
    with refused(state):
        _remove_everywhere(state, name)
        state.records.pop(name, None)
        apply_weights(state)


def list_loras(pipe: Any) -> list[LoraInfo]:
    """Every loaded adapter with its rank, alpha, weight, state and source file."""
    state = state_of(pipe)
    infos = []
    for name in state.peft_adapter_names():
        ranks: dict[str, int] = {}
        alphas: dict[str, float] = {}
        for site in state.sites():
            if name in site.layer.lora_A:
                key = f"{site.component}.{site.path}"
                ranks[key] = site.layer.r[name]
                alphas[key] = float(site.layer.lora_alpha[name])
        rec = state.record(name)
        infos.append(
            LoraInfo(
                name=name,
                rank=_collapse(ranks),
                alpha=_collapse(alphas),
                weight=rec.weight,
                enabled=rec.enabled,
                file=rec.file,
                modules=len(ranks),
            )
        )
    return infos


def adapter_settings(pipe: Any) -> dict[str, tuple[bool, Weight]]:
    """Every loaded adapter's (enabled, weight), cheaply (no per-layer scan, unlike :func:`list_loras`)."""
    state = state_of(pipe)
    return {n: (state.record(n).enabled, state.record(n).weight) for n in state.peft_adapter_names()}


def is_fused(pipe: Any) -> bool:
    """True while :func:`fuse` has adapters merged into the base weights."""
    return state_of(pipe).fused is not None


def adapter_bytes(pipe: Any, name: str) -> int:
    """Bytes the tensors of adapter ``name`` take in the pipeline (down, up, bias, DoRA magnitude)."""
    state = state_of(pipe)
    require(state, name)
    total = 0
    for site in state.sites():
        layer = site.layer
        for holder in (layer.lora_A, layer.lora_B, layer.lora_magnitude_vector):
            if name in holder:
                total += sum(p.numel() * p.element_size() for p in holder[name].parameters())
    return total


def _collapse(values: dict[str, Any]) -> Any:
    distinct = set(values.values())
    return distinct.pop() if len(distinct) == 1 else values


def fuse(pipe: Any) -> int:
    """Fuse the active adapters at their weights into the base weights; returns layers changed.

    While fused, changing weights or adapters re-fuses automatically; a load, weight change or
    enable/disable whose re-fuse fails (AdapterStateError: the new weights overflow the dtype) is
    undone, leaving the previous adapters fused bit for bit as before. :func:`unfuse` restores the
    original base weights bit for bit.
    """
    state = state_of(pipe)
    refuse_meta_weights(state)
    return fuse_state(state)


def unfuse(pipe: Any) -> int:
    """Restore the exact base weights saved by :func:`fuse`; returns layers restored."""
    state = state_of(pipe)
    refuse_meta_weights(state)
    return unfuse_state(state)

