"""``merge``: combine several adapters, each at a weight, into one.

- ``concat`` is exact: each module's factors are stacked along the rank axis, ``down = cat(down_i)``,
  ``up = cat(w_i·s_i·up_i)`` with ``alpha`` = the total rank (scale 1), so ΔW = Σ w_i·s_i·up_i@down_i —
  loading the merged file at 1.0 equals loading the inputs stacked at their weights. The rank is the
  sum of the inputs' ranks.
- ``svd`` factors each module's summed delta ΔW = Σ w_i·s_i·up_i@down_i (float64; conv flattened to
  [out, in·kh·kw]) and keeps ``rank`` or a dynamic rule's rank (see ``tools.resize``), with scale 1;
  it reports the fraction of each module's ‖ΔW‖²_F kept.

Modules present in only some inputs are kept. DoRA adapters are refused by both methods: a magnitude
vector does not add, so no merge of them is exact.
"""

from __future__ import annotations

import enum
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import ConfigError, FamilyMismatchError, KeyMappingError
from ..formats.adapter_data import AdapterData, ModuleLora
from .base_keys import BASE_MODEL_KEY
from .resize import DynamicRule, ReshapeReport, check_rank_args, factor_delta, flat_delta, fraction, refuse_dora

if TYPE_CHECKING:
    from ..adapters.files import ReadAdapter
    from ..formats.model_keys import ModelKeys


class MergeMethod(str, enum.Enum):
    CONCAT = "concat"
    SVD = "svd"


Inputs = Sequence[tuple[AdapterData, float]]


def _check_inputs(inputs: Inputs, method: str) -> None:
    if not inputs:
        raise ConfigError(f"merge ({method}): give at least one adapter")
    from ..adapters.weights import check_weight_value

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
        first = group[0][0]
        up, down, kept, total = factor_delta(delta, tuple(first.down.shape), rank, rule, _dtype(group))
        biases = [ws * m.bias.double() for m, ws in group if m.bias is not None]
        bias = sum(biases).to(up.dtype) if biases else None
        modules[key] = ModuleLora(down=down, up=up, alpha=float(down.shape[0]), bias=bias)
        energies[key] = (kept, total)
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
    first file's); ``keys`` (e.g. ``model_keys_of(state_of(pipe))``) replaces the reference model."""
    from ..formats.hashes import file_sha256
    from .resize import _check_out

    try:
        chosen = MergeMethod(method)
    except ValueError:
        raise ConfigError(f"method {method!r}: choose one of {', '.join(m.value for m in MergeMethod)}") from None
    if chosen is MergeMethod.CONCAT and (rank is not None or dynamic is not None):
        raise ConfigError("concat merges keep every rank (the sum of the inputs'); rank/dynamic need method='svd'")
    rule = check_rank_args(rank, dynamic) if chosen is MergeMethod.SVD else None
    path = _check_out(out)
    if not specs:
        raise ConfigError("merge: give at least one (file, weight)")
    from ..adapters.weights import check_weight_value

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


def read_inputs(
    paths: Sequence[str | os.PathLike], family: str | None, keys: ModelKeys | None, *, allow_pickle: bool = False
) -> tuple[list[ReadAdapter], ModelKeys]:
    """Read every file for one model; KeyMappingError naming the file on another family, unresolved keys
    or shapes that do not fit; FormatError on NaN/Inf. Pickles only with ``allow_pickle``.

    Without ``keys`` the model is the base the files record when it resolves (see ``tools.base_keys``),
    else the family's reference model; a misfit then says which base the file records.
    """
    from ..adapters.files import read_adapter, resolve_adapter_path
    from ..adapters.validate import check_against_keys
    from .base_keys import keys_for_files, misfit_hint
    from .convert import file_family, header_of

    families: list[str | None] = []
    metadatas: list[dict[str, str]] = []
    for p in paths:
        weight_file, _ = resolve_adapter_path(p)
        metadata, names = header_of(weight_file, allow_pickle=allow_pickle)
        metadatas.append(metadata)
        try:
            families.append(file_family(weight_file, metadata, names))
        except ConfigError:
            if keys is None and family is None and not families:
                raise
            families.append(None)
    given = keys is not None
    base = None
    if keys is None:
        keys, base = keys_for_files(metadatas, family or families[0])
    target = keys.family.name
    for p, found in zip(paths, families):
        if found is not None and found != target:
            raise FamilyMismatchError(
                f"{p}: this adapter is for {found}, the merge is for {target}; nothing was written"
            )
    reads = []
    for p in paths:
        read = read_adapter(p, keys, allow_pickle=allow_pickle)
        hint = "" if given else misfit_hint(read.data.metadata, base)
        if read.unresolved:
            raise KeyMappingError(
                f"{read.path}: {len(read.unresolved)} key(s) match no module of the {keys.family.title} model "
                f"(e.g. {', '.join(read.unresolved[:5])}); nothing was written{hint}"
            )
        try:
            check_against_keys(read.data, keys, str(read.path))
        except KeyMappingError as exc:
            raise type(exc)(f"{exc}{hint}") from None
        reads.append(read)
    return reads, keys


def write_output(path: Path, keys: ModelKeys, data: AdapterData, to: str, extra: Mapping[str, str]) -> None:
    """Encode ``data`` as ``to`` with fresh ``ss_network_*`` entries and hashes, and write it atomically."""
    from ..formats.codec import encode
    from ..formats.kohya import kohya_metadata
    from ..formats.safetensors_io import write_adapter_file_with_hashes

    tensors, encoded = encode(keys, data, to)
    metadata = {**extra, **kohya_metadata(data), **encoded, "diffusion_lora.family": keys.family.name}
    write_adapter_file_with_hashes(path, tensors, metadata)
