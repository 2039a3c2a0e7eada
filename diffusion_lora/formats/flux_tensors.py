"""Flux.1 LoRA tensors: reading a file's state dict into AdapterData and writing sd-scripts' Flux files.

Names (which file module is which diffusers module, and which rows of a fused BFL layer each gets) come
from :mod:`.flux_names`; this module splits a fused layer's LoRA into one LoRA per diffusers module on
reading, and fuses them back into one on writing, so that every module keeps exactly its own ΔW.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..errors import FormatError, KeyMappingError
from .adapter_data import AdapterData, ModuleLora, bias_from_delta
from .flux_names import (
    ALL_ROWS,
    COMPONENT,
    KOHYA_PREFIX,
    NETWORK_MODULE,
    FluxDims,
    Target,
    bfl_table,
    flux_index,
    split_key,
)
from .kohya import (
    dora_scale_to_magnitude,
    flatten,
    kohya_metadata,
    magnitude_to_dora_scale,
    module_alpha,
    unresolved_error,
)


def parse_flux(
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    dims: FluxDims,
    *,
    module_paths: Sequence[str],
    strict: bool = False,
    source: str = "",
    table: Mapping[str, tuple[Target, ...]] | None = None,
) -> tuple[AdapterData, list[str]]:
    """Read a Flux LoRA state dict in kohya, OneTrainer or ComfyUI spelling into an AdapterData keyed
    ``transformer.<diffusers path>``, plus the sorted file keys that map to no module.

    A fused layer's LoRA becomes one LoRA per diffusers module: each gets a clone of the shared
    ``down`` [rank, in], its rows of ``up`` and the same alpha, so each has the fused layer's scale.
    Unresolved keys — text-encoder keys (``lora_te1_…``, ``text_encoders.…``), layers the model lacks,
    unknown suffixes — are returned for the caller to route, or raised with ``strict``. Raises
    FormatError for an incomplete module, bad shapes or alpha, or two names adapting one module.
    ``table``: the BFL layout, Flux.1's by default (see :func:`.flux_names.flux_index`).
    """
    index = flux_index(dims, module_paths, table)
    groups: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    unresolved: list[str] = []
    for key, tensor in tensors.items():
        split = split_key(key)
        if split is None or index.resolve(split[0]) is None:
            unresolved.append(key)
            continue
        name, role = split
        other = groups.setdefault(name, {}).setdefault(role, (key, tensor))[0]
        if other != key:
            raise FormatError(f"keys {other!r} and {key!r} are both the {role} of {name}; the file is ambiguous")
    modules: dict[str, ModuleLora] = {}
    seen: dict[str, str] = {}
    for name, parts in groups.items():
        if parts.keys() <= {"diff_b", "alpha"}:  # a bias delta without a LoRA: PEFT cannot hold it
            unresolved += [key for key, _ in parts.values()]
            continue
        roles = {role: t for role, (_, t) in parts.items()}
        for path, module in _split_module(name, roles, index.modules[name]).items():
            key = f"{COMPONENT}.{path}"
            if key in seen:
                raise FormatError(f"Flux LoRA names {seen[key]!r} and {name!r} both adapt {key}; the file is ambiguous")
            seen[key] = name
            modules[key] = module
    unresolved.sort()
    if strict and unresolved:
        raise unresolved_error(unresolved, source)
    return AdapterData(modules=modules, metadata=dict(metadata), format="kohya"), unresolved


def _split_module(name: str, parts: Mapping[str, torch.Tensor], targets: tuple[Target, ...]) -> dict[str, ModuleLora]:
    if "down" not in parts or "up" not in parts:
        raise FormatError(f"{name} has no {'down' if 'down' not in parts else 'up'} weight; the file is incomplete")
    down, up = parts["down"], parts["up"]
    rank = int(down.shape[0])
    if down.dim() != 2 or up.dim() != 2 or up.shape[1] != rank:
        raise FormatError(
            f"{name}: up {list(up.shape)} and down {list(down.shape)} are not a Linear LoRA pair of one rank"
        )
    alpha = module_alpha(name, parts.get("alpha"), rank)
    magnitude = None
    if "dora_scale" in parts:
        magnitude = dora_scale_to_magnitude(parts["dora_scale"], int(up.shape[0]), int(down.shape[1]), name)
    bias = None
    if "diff_b" in parts:
        bias = bias_from_delta(name, parts["diff_b"], int(up.shape[0]), alpha / rank)
    if len(targets) == 1 and targets[0][1] == ALL_ROWS:
        return {targets[0][0]: ModuleLora(down=down, up=up, alpha=alpha, magnitude=magnitude, bias=bias)}
    rows = max(s.stop for _, s in targets)
    if up.shape[0] != rows:
        raise FormatError(
            f"{name}: up has {up.shape[0]} rows but this model's fused layer has {rows} "
            f"({', '.join(f'{p}: {s.stop - s.start}' for p, s in targets)}); the file is for another Flux size"
        )
    out: dict[str, ModuleLora] = {}
    for path, slices in _by_path(targets).items():
        out[path] = ModuleLora(
            down=down.clone(),
            up=torch.cat([up[s] for s in slices]).contiguous(),
            alpha=alpha,
            magnitude=None if magnitude is None else torch.cat([magnitude[s] for s in slices]),
            bias=None if bias is None else torch.cat([bias[s] for s in slices]),
        )
    return out


def _by_path(targets: Sequence[Target]) -> dict[str, list[slice]]:
    by_path: dict[str, list[slice]] = {}
    for path, rows in targets:
        by_path.setdefault(path, []).append(rows)
    return by_path


def write_flux_kohya(
    data: AdapterData,
    dims: FluxDims,
    table: Mapping[str, tuple[Target, ...]] | None = None,
    network_module: str = NETWORK_MODULE,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors (``lora_unet_<flat BFL name>``) and ``ss_*`` metadata of an sd-scripts Flux file for ``data``.

    Every module must be ``transformer.<path>`` with a BFL name; KeyMappingError names the others
    (write text encoders with :func:`.kohya.write_kohya`). Diffusers modules that BFL fuses are written
    as one LoRA that gives each of them exactly its own ΔW = scale · up @ down:

    * when all parts share one ``down`` (as read from a fused file), that ``down`` is kept and the ups
      are stacked: rank unchanged, so parse ∘ write ∘ parse keeps the file's size;
    * otherwise the downs are concatenated along the rank and ``up`` is block-diagonal.

    The fused alpha is the first part's scale × fused rank; a part with another scale (other rank or
    alpha, or rsLoRA) has its up block multiplied by its scale / that scale. Parts left out of a fused
    layer (``proj_mlp`` without q/k/v…) get zero rows. rsLoRA is written as plain alpha with the same scale.
    ``table`` (Flux.1's BFL layout by default) and ``network_module`` say which BFL model it is for.
    """
    table = bfl_table(dims) if table is None else table
    inverse = {path: bfl for bfl, targets in table.items() for path, _ in targets}
    groups: dict[str, dict[str, ModuleLora]] = {}
    unknown: list[str] = []
    for key, m in data.modules.items():
        component, _, path = key.partition(".")
        bfl = inverse.get(path) if component == COMPONENT else None
        if bfl is None:
            unknown.append(key)
        else:
            groups.setdefault(bfl, {})[path] = m
    if unknown:
        shown = ", ".join(unknown[:5])
        raise KeyMappingError(
            f"{len(unknown)} modules have no name in Black Forest Labs' Flux layout ({shown}); a kohya Flux "
            f"file holds only transformer layers of a Flux model of {dims}"
        )
    named = {KOHYA_PREFIX + flatten(bfl): (table[bfl], parts) for bfl, parts in groups.items()}
    tensors, written = fused_tensors(named, data.use_rslora)
    metadata = kohya_metadata(AdapterData(modules=written))
    metadata["ss_network_module"] = network_module
    return tensors, metadata


def fused_tensors(
    groups: Mapping[str, tuple[tuple[Target, ...], Mapping[str, ModuleLora]]], use_rslora: bool
) -> tuple[dict[str, torch.Tensor], dict[str, ModuleLora]]:
    """kohya-style tensors (``lora_down``/``lora_up``/``alpha``, ``dora_scale``, ``diff_b``) of fused layers.

    ``groups`` maps each file name of a fused layer (``lora_unet_…`` or ``diffusion_model.…``) to its targets
    and the LoRA of each target module; returns the tensors and the fused LoRA written under each name.
    """
    tensors: dict[str, torch.Tensor] = {}
    written: dict[str, ModuleLora] = {}
    for name, (targets, parts) in groups.items():
        fused = _fuse(name, targets, parts, use_rslora)
        tensors[f"{name}.lora_down.weight"] = fused.down
        tensors[f"{name}.lora_up.weight"] = fused.up
        tensors[f"{name}.alpha"] = torch.tensor(fused.alpha, dtype=fused.down.dtype)
        if fused.magnitude is not None:
            tensors[f"{name}.dora_scale"] = magnitude_to_dora_scale(fused.magnitude, fused.down)
        if fused.bias is not None:  # only a ComfyUI file may carry it; the codec refuses kohya
            tensors[f"{name}.diff_b"] = fused.bias_delta()
        written[name] = fused
    return tensors, written


def _fuse(name: str, targets: tuple[Target, ...], parts: Mapping[str, ModuleLora], use_rslora: bool) -> ModuleLora:
    """One LoRA on BFL layer ``name`` whose rows reproduce each part's ΔW (see :func:`write_flux_kohya`)."""
    by_path = _by_path(targets)
    present = [path for path in by_path if path in parts]
    ms = [parts[p] for p in present]
    scales = [m.scale(use_rslora) for m in ms]
    if len(targets) == 1 and targets[0][1] == ALL_ROWS:
        m = ms[0]
        return ModuleLora(down=m.down, up=m.up, alpha=scales[0] * m.rank, magnitude=m.magnitude, bias=m.bias)
    if any(m.down.dim() != 2 or m.down.shape[1] != ms[0].down.shape[1] for m in ms):
        raise FormatError(f"{name}: the parts {', '.join(present)} are not Linear LoRAs on one input size")
    shared = all(torch.equal(m.down, ms[0].down) for m in ms[1:])
    down = ms[0].down if shared else torch.cat([m.down.to(ms[0].down.dtype) for m in ms])
    rows = max(s.stop for _, s in targets)
    up = torch.zeros(rows, down.shape[0], dtype=ms[0].up.dtype)
    dora = _fused_magnitude(name, by_path, parts, ms, rows)
    # bias rows at the fused scale (scales[0]); parts without a bias delta, or left out, get zeros
    bias = torch.zeros(rows, dtype=torch.float32) if any(m.bias is not None for m in ms) else None
    col = 0
    for path, m, scale in zip(present, ms, scales):
        block = m.up if scale == scales[0] else m.up * (scale / scales[0])
        cols = slice(0, m.rank) if shared else slice(col, col + m.rank)
        col += m.rank
        start = 0
        for rows_slice in by_path[path]:
            count = rows_slice.stop - rows_slice.start
            up[rows_slice, cols] = block[start : start + count]
            if dora is not None:
                dora[rows_slice] = m.magnitude[start : start + count]  # type: ignore[index]
            if bias is not None and m.bias is not None:
                bias[rows_slice] = m.bias[start : start + count].float() * (scale / scales[0])
            start += count
        if start != m.up.shape[0]:
            raise FormatError(f"{name}: {path} has {m.up.shape[0]} output rows but this Flux size gives it {start}")
    return ModuleLora(down=down, up=up, alpha=scales[0] * down.shape[0], magnitude=dora, bias=bias)


def _fused_magnitude(
    name: str, by_path: Mapping[str, list[slice]], parts: Mapping[str, ModuleLora], ms: Sequence[ModuleLora], rows: int
) -> torch.Tensor | None:
    """An empty [rows] DoRA magnitude to fill when the parts use DoRA (None without DoRA)."""
    if all(m.magnitude is None for m in ms):
        return None
    if len(ms) != len(by_path) or any(m.magnitude is None for m in ms):
        raise FormatError(
            f"{name}: DoRA on only some of {', '.join(by_path)} cannot be written as one fused layer "
            f"(the other rows' magnitude is the base weight's norm, which the file does not know)"
        )
    return torch.zeros(rows, dtype=ms[0].magnitude.dtype)  # type: ignore[union-attr]
