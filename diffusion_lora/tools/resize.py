"""``resize``: lower (or keep) the rank of every module of an adapter by a truncated SVD of its delta.

Each module's scaled delta ΔW = scale · up @ down (conv: flattened to [out, in·kh·kw]) is factored
in float64 (see ``tools.svd``) and stored with ``alpha = r``: the old scale is folded into the factors
and the new scale is 1 (rsLoRA is dropped, since scale 1 means the same under both rules). At
r = rank(ΔW) the result is exact. The rank is fixed (``rank``) or chosen per module by a dynamic rule
(``sv_ratio:X``, ``sv_fro:X``, ``sv_cumulative:X``); with a dynamic rule, ``rank`` (if given) caps the rank.
"""

from __future__ import annotations

import json
import os

from ..formats.adapter_data import AdapterData, ModuleLora
from ..formats.adapter_files import safetensors_path
from ..formats.detect import FileFormat
from ..formats.hashes import file_sha256
from ..formats.model_keys import ModelKeys
from .files import read_inputs, write_output
from .svd import DynamicRule, ReshapeReport, check_rank_args, factor, flat_delta, fraction, refuse_dora


def resize_modules(
    data: AdapterData, rank: int | None, rule: DynamicRule | None
) -> tuple[AdapterData, dict[str, tuple[float, float]]]:
    modules: dict[str, ModuleLora] = {}
    energies: dict[str, tuple[float, float]] = {}
    for key, m in data.modules.items():
        scale = m.scale(data.use_rslora)
        factors = factor(flat_delta(m, scale, key), tuple(m.down.shape[1:]), rank, rule)
        up, down = factors.cast(m.down.dtype)
        bias = None if m.bias is None else (scale * m.bias.double()).to(m.bias.dtype)
        modules[key] = ModuleLora(down=down, up=up, alpha=float(down.shape[0]), bias=bias)
        energies[key] = (factors.kept, factors.total)
    return AdapterData(modules=modules, metadata=dict(data.metadata), format=data.format), energies


def resize(
    data: AdapterData, *, rank: int | None = None, dynamic: str | None = None
) -> tuple[AdapterData, dict[str, float]]:
    """``data`` with every module re-factored at ``rank`` or by the ``dynamic`` rule (new scale 1),
    plus the fraction of each module's ‖ΔW‖²_F kept. ConfigError for DoRA or bad arguments."""
    rule = check_rank_args(rank, dynamic)
    refuse_dora(data, "resize")
    out, energies = resize_modules(data, rank, rule)
    return out, {k: fraction(*e) for k, e in energies.items()}


# Header entries that describe the old factors; recomputed or dropped.
_STALE_KEYS = ("lora_adapter_metadata", "ss_network_dim", "ss_network_alpha", "ss_network_module", "format",
               "diffusion_lora.rank", "diffusion_lora.alpha", "diffusion_lora.use_rslora")  # fmt: skip


def resize_file(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    rank: int | None = None,
    dynamic: str | None = None,
    to: str | None = None,
    family: str | None = None,
    keys: ModelKeys | None = None,
    allow_pickle: bool = False,
) -> ReshapeReport:
    """Resize adapter file ``src`` into ``out`` (format ``to``, default the input's); nothing is written
    on failure. ``keys`` (e.g. ``pipeline_keys(pipe)``) replaces the family's reference model."""
    rule = check_rank_args(rank, dynamic)
    path = safetensors_path(out)
    (read,), keys = read_inputs([src], family, keys, allow_pickle=allow_pickle)
    refuse_dora(read.data, "resize")
    data, energies = resize_modules(read.data, rank, rule)
    kept = {k: v for k, v in read.data.metadata.items() if k not in _STALE_KEYS and not k.startswith("sshs_")}
    provenance = {"method": "svd", "rank": rank, "dynamic": dynamic,
                  "input": {"file": read.path.name, "sha256": file_sha256(read.path)}}  # fmt: skip
    kept["diffusion_lora.resize"] = json.dumps(provenance)
    if to is None:
        to = read.format if read.format in {f.value for f in FileFormat} else FileFormat.DIFFUSERS.value
    write_output(path, keys, data, to, kept)
    return ReshapeReport.of(path, data, energies)
