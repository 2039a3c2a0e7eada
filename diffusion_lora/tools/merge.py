"""``merge``: combine several adapters, each at a weight, into one.

- ``concat`` is exact: each module's factors are stacked along the rank axis, ``down = cat(down_i)``,
  ``up = cat(w_i·s_i·up_i)`` with ``alpha`` = the total rank (scale 1), so ΔW = Σ w_i·s_i·up_i@down_i —
  loading the merged file at 1.0 equals loading the inputs stacked at their weights. The rank is the
  sum of the inputs' ranks.
- ``svd`` factors each module's summed delta ΔW = Σ w_i·s_i·up_i@down_i (float64; conv flattened to
  [out, in·kh·kw]) and keeps ``rank`` or a dynamic rule's rank (see ``tools.svd``), with scale 1;
  it reports the fraction of each module's ‖ΔW‖²_F kept.

Modules present in only some inputs are kept. DoRA adapters are refused by both methods: a magnitude
vector does not add, so no merge of them is exact.
"""

from __future__ import annotations

import enum
import json
import os
from collections.abc import Sequence

import torch

from ..adapters import check_weight_value
from ..errors import ConfigError
from ..formats.adapter_data import AdapterData, ModuleLora
from ..formats.adapter_files import safetensors_path
from ..formats.hashes import file_sha256
from ..formats.model_keys import ModelKeys
from .base_keys import BASE_MODEL_KEY
from .files import read_inputs, write_output
from .svd import DynamicRule, ReshapeReport, check_rank_args, factor, flat_delta, fraction, refuse_dora


class MergeMethod(str, enum.Enum):
    CONCAT = "concat"
    SVD = "svd"


Inputs = Sequence[tuple[AdapterData, float]]


def _check_inputs(inputs: Inputs, method: str) -> None:
    if not inputs:
        raise ConfigError(f"merge ({method}): give at least one adapter")
    for i, (data, weight) in enumerate(inputs):
        check_weight_value(f"merge input {i}: weight", weight)
        refuse_dora(data, "merge")


def _grouped(inputs: Inputs) -> dict[str, list[tuple[ModuleLora, float]]]:
    """module key → [(module, w_i·s_i)] over the inputs that have it, shapes checked."""
    groups: dict[str, list[tuple[ModuleLora, float]]] = {}
    for data, weight in inputs:
        for key, m in data.modules.items():
            groups.setdefault(key, []).append((m, float(weight) * m.scale(data.use_rslora)))
    for key, group in groups.items():
        first = group[0][0]
        for m, _ in group[1:]:
            if m.down.shape[1:] != first.down.shape[1:] or m.up.shape[:1] + m.up.shape[2:] != (
                first.up.shape[:1] + first.up.shape[2:]
            ):
                raise ConfigError(
                    f"{key}: inputs disagree on the layer's shape (down {tuple(first.down.shape)} vs "
                    f"{tuple(m.down.shape)}); merge adapters made for the same model"
                )
    return groups


def _dtype(group: Sequence[tuple[ModuleLora, float]]) -> torch.dtype:
    dtype = group[0][0].down.dtype
    for m, _ in group:
        dtype = torch.promote_types(dtype, torch.promote_types(m.down.dtype, m.up.dtype))
    return dtype


def merge_concat(inputs: Inputs) -> AdapterData:
    """The exact merge of ``(adapter, weight)`` pairs by stacking factors (see the module docstring).

    ConfigError for DoRA inputs, non-finite weights, or disagreeing layer shapes. Bias deltas
    (ComfyUI's ``diff_b``) add up: the merged bias is Σ wᵢ·sᵢ·biasᵢ at scale 1, exact too.
    """
    _check_inputs(inputs, "concat")
    modules: dict[str, ModuleLora] = {}
    for key, group in _grouped(inputs).items():
        dtype = _dtype(group)
        down = torch.cat([m.down.to(dtype) for m, _ in group], dim=0)
        up = torch.cat([(ws * m.up.double()).to(dtype) for m, ws in group], dim=1)
        biases = [ws * m.bias.double() for m, ws in group if m.bias is not None]
        bias = sum(biases).to(torch.promote_types(dtype, torch.float32)) if biases else None
        modules[key] = ModuleLora(down=down.contiguous(), up=up.contiguous(), alpha=float(down.shape[0]), bias=bias)
    return AdapterData(modules=modules)


def _merge_svd(
    inputs: Inputs, rank: int | None, rule: DynamicRule | None
) -> tuple[AdapterData, dict[str, tuple[float, float]]]:
    modules: dict[str, ModuleLora] = {}
    energies: dict[str, tuple[float, float]] = {}
    for key, group in _grouped(inputs).items():
        delta = sum(flat_delta(m, ws, key) for m, ws in group)
        factors = factor(delta, tuple(group[0][0].down.shape[1:]), rank, rule)
        up, down = factors.cast(_dtype(group))
        biases = [ws * m.bias.double() for m, ws in group if m.bias is not None]
        bias = sum(biases).to(up.dtype) if biases else None
        modules[key] = ModuleLora(down=down, up=up, alpha=float(down.shape[0]), bias=bias)
        energies[key] = (factors.kept, factors.total)
    return AdapterData(modules=modules), energies


def merge_svd(
    inputs: Inputs, *, rank: int | None = None, dynamic: str | None = None
) -> tuple[AdapterData, dict[str, float]]:
    """The SVD merge of ``(adapter, weight)`` pairs at ``rank`` (clamped to the layer's size) or by a
    ``dynamic`` rule, with the fraction of each module's ‖ΔW‖²_F kept (1.0 at full rank)."""
    rule = check_rank_args(rank, dynamic)
    _check_inputs(inputs, "svd")
    data, energies = _merge_svd(inputs, rank, rule)
    return data, {k: fraction(*e) for k, e in energies.items()}


def merge_files(
    specs: Sequence[tuple[str | os.PathLike, float]],
    out: str | os.PathLike,
    *,
    method: str = "concat",
    rank: int | None = None,
    dynamic: str | None = None,
    to: str = "diffusers",
    family: str | None = None,
    keys: ModelKeys | None = None,
    allow_pickle: bool = False,
) -> ReshapeReport:
    """Merge adapter files ``(path, weight)`` into ``out`` (format ``to``), atomically; nothing is
    written on failure. Inputs may be in any format but must be of one family (``family``, else the
    first file's); ``keys`` (e.g. ``pipeline_keys(pipe)``) replaces the reference model."""
    try:
        chosen = MergeMethod(method)
    except ValueError:
        raise ConfigError(f"method {method!r}: choose one of {', '.join(m.value for m in MergeMethod)}") from None
    if chosen is MergeMethod.CONCAT and (rank is not None or dynamic is not None):
        raise ConfigError("concat merges keep every rank (the sum of the inputs'); rank/dynamic need method='svd'")
    rule = check_rank_args(rank, dynamic) if chosen is MergeMethod.SVD else None
    path = safetensors_path(out)
    if not specs:
        raise ConfigError("merge: give at least one (file, weight)")
    for p, w in specs:
        check_weight_value(f"merge weight of {os.fspath(p)}", w)
    reads, keys = read_inputs([p for p, _ in specs], family, keys, allow_pickle=allow_pickle)
    inputs = [(r.data, w) for r, (_, w) in zip(reads, specs)]
    if chosen is MergeMethod.CONCAT:
        data, energies = merge_concat(inputs), {}
    else:
        _check_inputs(inputs, "svd")
        data, energies = _merge_svd(inputs, rank, rule)
    provenance = {"method": chosen.value, "rank": rank, "dynamic": dynamic,
                  "inputs": [{"file": r.path.name, "sha256": file_sha256(r.path), "weight": float(w)}
                             for r, (_, w) in zip(reads, specs)]}  # fmt: skip
    extra = {"diffusion_lora.merge": json.dumps(provenance)}
    bases = {r.data.metadata.get(BASE_MODEL_KEY) for r in reads}
    if len(bases) == 1 and None not in bases:  # inputs made on one base: so is the merge
        extra[BASE_MODEL_KEY] = bases.pop()
    write_output(path, keys, data, to, extra)
    return ReshapeReport.of(path, data, energies)
