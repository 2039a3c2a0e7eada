"""The public adapter API: add, load, stack with weights, fuse, hot-swap, save, remove.

Every function takes the diffusers pipeline first. Adapters are PEFT LoRA layers, so diffusers' own
``pipe.get_list_adapters()`` and ``pipe.set_adapters()`` see them too. Any number of adapters can be
active at once, each at its own weight; loading one never deactivates the others.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import AdapterNotFoundError, AdapterStateError, ConfigError, DiffusionLoraError, FormatError
from ..formats.adapter_data import AdapterData, ModuleLora
from ..formats.peft_format import write_peft
from ..formats.safetensors_io import write_adapter_file_with_hashes
from .files import default_adapter_name, read_adapter
from .fuse import fuse_state, unfuse_state
from .inject import config_for, inject, remove_from_model, target_paths
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


@contextlib.contextmanager
def _refused(state: AdapterState) -> Iterator[None]:
    """Run a change with adapters unfused, fusing again afterwards if they were fused."""
    was_fused = state.fused is not None
    unfuse_state(state)
    try:
        yield
    finally:
        if was_fused:
            fuse_state(state)


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not name or "." in name or name != name.strip():
        raise ConfigError(f"adapter name {name!r} must be a non-empty string without dots or outer spaces")
    return name


def _require(state: AdapterState, name: str) -> None:
    if name not in state.peft_adapter_names():
        loaded = ", ".join(state.peft_adapter_names()) or "none"
        raise AdapterNotFoundError(f"no adapter named {name!r} is loaded (loaded: {loaded})")


def _require_new(state: AdapterState, name: str) -> None:
    if name in state.peft_adapter_names():
        raise AdapterStateError(
            f"an adapter named {name!r} is already loaded; pass another name, remove_lora() it first, "
            f"or hotswap() new weights into it"
        )


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

    ``targets`` is a preset of the family (``attn``, ``attn-ff``, ``all-linear``) or a list of module
    names/suffixes; ``alpha`` defaults to ``rank`` (scale 1). With ``text_encoder=True`` the CLIP text
    encoders get LoRA on their attention projections too. Afterwards only LoRA parameters require grad.
    """
    from peft import LoraConfig

    state = state_of(pipe)
    _check_name(name)
    _require_new(state, name)
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
    with _refused(state):
        try:
            for component, paths in plan.items():
                config = LoraConfig(
                    r=rank, lora_alpha=alpha, target_modules=paths, use_dora=use_dora, use_rslora=use_rslora
                )
                inject(state.components[component], name, config, empty=False)
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
    weight_file, data = read_adapter(path, state.family, allow_pickle=allow_pickle)
    name = _check_name(name if name is not None else default_adapter_name(weight_file))
    _require_new(state, name)
    weight = validate_weight(name, weight, block_layout(state))
    plan = plan_load(state, data, str(weight_file), strict=strict)
    with _refused(state):
        _inject_plan(state, name, plan, data.use_rslora)
        state.records[name] = AdapterRecord(
            name, weight=weight, file=str(weight_file), trigger_words=_trigger_words(data), metadata=data.metadata
        )
        apply_weights(state)
    if plan.skipped:
        logger.warning("%s: skipped %d module(s) that match no layer", weight_file, len(plan.skipped))
    return LoadReport(name, plan.count, tuple(plan.skipped)) if not strict else name


def _inject_plan(state: AdapterState, name: str, plan: LoadPlan, use_rslora: bool) -> None:
    from .inject import assign_weights

    try:
        for component, modules in plan.modules.items():
            model = state.components[component]
            inject(model, name, config_for(modules, use_rslora), empty=True)
            assign_weights(model, name, modules)
    except BaseException as exc:
        _remove_everywhere(state, name)
        if isinstance(exc, DiffusionLoraError) or not isinstance(exc, Exception):
            raise
        raise FormatError(f"adapter {name!r} could not be placed in the pipeline: {exc}") from exc
    finally:
        state.invalidate()


def _trigger_words(data: AdapterData) -> tuple[str, ...]:
    raw = data.metadata.get("diffusion_lora.trigger_words") or data.metadata.get("modelspec.trigger_phrase")
    if not raw:
        return ()
    try:
        words = json.loads(raw)
    except json.JSONDecodeError:
        words = [w.strip() for w in raw.split(",")]
    return tuple(str(w) for w in words if str(w).strip()) if isinstance(words, list) else (str(words),)


def set_weights(pipe: Any, weights: Mapping[str, Weight]) -> None:
    """Activate exactly the named adapters, each at its weight (a number or a per-block dict).

    Adapters not named stay loaded but inactive (``enable`` brings them back at their last weight).
    """
    state = state_of(pipe)
    layout = block_layout(state)
    checked = {}
    for name, weight in weights.items():
        _require(state, name)
        checked[name] = validate_weight(name, weight, layout)
    wanted = {n: (n in checked, checked.get(n, state.record(n).weight)) for n in state.peft_adapter_names()}
    unchanged = all((state.record(n).enabled, state.record(n).weight) == w for n, w in wanted.items())
    if unchanged and state.fused is not None:
        return  # re-fusing the same weights would only cost time
    with _refused(state):
        for name, (enabled, weight) in wanted.items():
            rec = state.record(name)
            rec.enabled, rec.weight = enabled, weight
        apply_weights(state)


def _set_enabled(pipe: Any, names: str | Sequence[str] | None, enabled: bool) -> None:
    state = state_of(pipe)
    chosen = state.peft_adapter_names() if names is None else [names] if isinstance(names, str) else list(names)
    for name in chosen:
        _require(state, name)
    with _refused(state):
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
    _require(state, name)
    with _refused(state):
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


def _collapse(values: dict[str, Any]) -> Any:
    distinct = set(values.values())
    return distinct.pop() if len(distinct) == 1 else values


def fuse(pipe: Any) -> int:
    """Fuse the active adapters at their weights into the base weights; returns layers changed.

    While fused, changing weights or adapters re-fuses automatically; :func:`unfuse` restores the
    original base weights bit for bit.
    """
    return fuse_state(state_of(pipe))


def unfuse(pipe: Any) -> int:
    """Restore the exact base weights saved by :func:`fuse`; returns layers restored."""
    return unfuse_state(state_of(pipe))


def adapter_data(pipe: Any, name: str) -> AdapterData:
    """The tensors of a loaded adapter as AdapterData (CPU copies), for saving or tools."""
    state = state_of(pipe)
    _require(state, name)
    modules: dict[str, ModuleLora] = {}
    use_rslora = False
    for site in state.sites():
        layer = site.layer
        if name not in layer.lora_A:
            continue
        magnitude = layer.lora_magnitude_vector[name].weight if name in layer.lora_magnitude_vector else None
        modules[f"{site.component}.{site.path}"] = ModuleLora(
            down=_cpu(layer.lora_A[name].weight),
            up=_cpu(layer.lora_B[name].weight),
            alpha=float(layer.lora_alpha[name]),
            magnitude=None if magnitude is None else _cpu(magnitude),
        )
        use_rslora = use_rslora or bool(layer.use_rslora.get(name, False))
    return AdapterData(modules=modules, use_rslora=use_rslora, metadata=dict(state.record(name).metadata))


def _cpu(t: Any) -> Any:
    return t.detach().to("cpu").contiguous()


def hotswap(pipe: Any, name: str, path: str | os.PathLike, *, allow_pickle: bool = False) -> None:
    """Replace the weights of loaded adapter ``name`` with a file's, in place (no re-injection).

    The file must cover the same modules with the same ranks; alpha may differ. On any error the
    pipeline is unchanged.
    """
    state = state_of(pipe)
    _require(state, name)
    weight_file, data = read_adapter(path, state.family, allow_pickle=allow_pickle)
    plan = plan_load(state, data, str(weight_file), strict=True)
    current = adapter_data(pipe, name)
    new = {f"{c}.{p}": m for c, mods in plan.modules.items() for p, m in mods.items()}
    if set(new) != set(current.modules):
        differ = sorted(set(new) ^ set(current.modules))
        raise AdapterStateError(
            f"{weight_file}: cannot hot-swap into {name!r}: the files adapt different modules "
            f"({len(differ)} differ, e.g. {', '.join(differ[:3])}); use remove_lora + load_lora"
        )
    for key, m in new.items():
        old = current.modules[key]
        if (m.down.shape, m.up.shape) != (old.down.shape, old.up.shape) or (m.magnitude is None) != (
            old.magnitude is None
        ):
            raise AdapterStateError(
                f"{weight_file}: cannot hot-swap into {name!r}: {key} has rank {m.rank}, loaded rank {old.rank}"
                f" (or DoRA differs); use remove_lora + load_lora"
            )
    with _refused(state):
        _copy_into(state, name, new, data.use_rslora)
        rec = state.record(name)
        rec.file, rec.metadata, rec.trigger_words = str(weight_file), data.metadata, _trigger_words(data)
        apply_weights(state)


def _copy_into(state: AdapterState, name: str, modules: Mapping[str, ModuleLora], use_rslora: bool) -> None:
    import torch

    with torch.no_grad():
        for site in state.sites():
            m = modules.get(f"{site.component}.{site.path}")
            if m is None:
                continue
            layer = site.layer
            layer.lora_A[name].weight.copy_(m.down.reshape(layer.lora_A[name].weight.shape))
            layer.lora_B[name].weight.copy_(m.up.reshape(layer.lora_B[name].weight.shape))
            if m.magnitude is not None:
                layer.lora_magnitude_vector[name].weight.copy_(m.magnitude)
            layer.lora_alpha[name] = m.alpha
            layer.use_rslora[name] = use_rslora


def save_lora(
    pipe: Any,
    name: str,
    path: str | os.PathLike,
    *,
    trigger_words: Sequence[str] | None = None,
    extra_metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write adapter ``name`` as a diffusers/PEFT ``.safetensors`` file (atomically).

    The header carries diffusers' ``lora_adapter_metadata`` (so plain ``load_lora_weights`` gets the
    same alpha), diffusion_lora's own keys (family, base model, name, rank, alpha, targets, trigger
    words, library version) and kohya's ``sshs_model_hash`` (the "addnet" hash A1111 shows).
    """
    state = state_of(pipe)
    data = adapter_data(pipe, name)
    tensors, metadata = write_peft(data)
    rec = state.record(name)
    words = tuple(trigger_words) if trigger_words is not None else rec.trigger_words
    metadata.update(_our_metadata(pipe, state, name, data, words))
    metadata.update({str(k): str(v) for k, v in (extra_metadata or {}).items()})
    out = Path(path)
    if out.suffix != ".safetensors":
        raise ConfigError(f"{out}: adapter files must end in .safetensors")
    write_adapter_file_with_hashes(out, tensors, metadata)
    rec.trigger_words = words
    return out


def _module_suffix(key: str) -> str:
    """``to_q`` of ``unet.…attn1.to_q``; ``to_out.0`` of ``unet.…attn1.to_out.0``."""
    parts = key.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1]


def _our_metadata(pipe: Any, state: AdapterState, name: str, data: AdapterData, words: Sequence[str]) -> dict:
    ranks = sorted({m.rank for m in data.modules.values()})
    alphas = sorted({m.alpha for m in data.modules.values()})
    suffixes = sorted({_module_suffix(key) for key in data.modules})
    base = getattr(getattr(pipe, "config", None), "_name_or_path", None) or ""
    return {
        "diffusion_lora.version": __version__,
        "diffusion_lora.name": name,
        "diffusion_lora.family": state.family.name,
        "diffusion_lora.base_model": str(base),
        "diffusion_lora.rank": str(ranks[0]) if len(ranks) == 1 else json.dumps(ranks),
        "diffusion_lora.alpha": str(alphas[0]) if len(alphas) == 1 else json.dumps(alphas),
        "diffusion_lora.use_rslora": json.dumps(data.use_rslora),
        "diffusion_lora.use_dora": json.dumps(data.use_dora),
        "diffusion_lora.targets": json.dumps(suffixes),
        "diffusion_lora.components": json.dumps(sorted(data.components())),
        "diffusion_lora.trigger_words": json.dumps(list(words)),
    }
