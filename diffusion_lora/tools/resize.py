"""``resize``: lower (or keep) the rank of every module of an adapter by a truncated SVD of its delta.

Each module's scaled delta ΔW = scale · up @ down (conv: flattened to [out, in·kh·kw]) is factored
in float64, ΔW ≈ U_r S_r Vh_r, and stored as ``up = U_r·√S_r``, ``down = √S_r·Vh_r`` with
``alpha = r``: the old scale is folded into the factors and the new scale is 1 (rsLoRA is dropped,
since scale 1 means the same under both rules). At r = rank(ΔW) the result is exact.

The rank is fixed (``rank``) or chosen per module by a dynamic rule (kohya's ``resize_lora``):

- ``sv_ratio:X`` — keep every σ ≥ σ_max / X (X ≥ 1);
- ``sv_fro:X`` — the smallest r whose kept Frobenius norm is ≥ X of the whole, i.e. whose kept
  energy Σσ²_kept / Σσ² is ≥ X² (X in (0, 1]; kohya compares norms, not squared norms);
- ``sv_cumulative:X`` — the smallest r with Σσ_kept / Σσ ≥ X (X in (0, 1]).

With a dynamic rule, ``rank`` (if given) caps the rank. Energy retained is Σσ²_kept / Σσ².
"""

from __future__ import annotations

import enum
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..formats.adapter_data import AdapterData, ModuleLora
    from ..formats.model_keys import ModelKeys


# Relative slack so a target met exactly (sv_ratio:4 with σ = 8, 2; sv_fro:1) is met despite the
# float32 rounding of stored factors.
_SLACK = 1e-6


class DynamicMethod(str, enum.Enum):
    SV_RATIO = "sv_ratio"
    SV_FRO = "sv_fro"
    SV_CUMULATIVE = "sv_cumulative"


@dataclass(frozen=True)
class DynamicRule:
    """A parsed ``"name:value"`` rule for choosing a module's rank from its singular values."""

    method: DynamicMethod
    value: float

    @classmethod
    def parse(cls, text: str) -> DynamicRule:
        name, sep, raw = str(text).partition(":")
        choices = ", ".join(f"{m.value}:X" for m in DynamicMethod)
        try:
            method = DynamicMethod(name.strip())
            value = float(raw) if sep else math.nan
        except ValueError:
            raise ConfigError(f"dynamic {text!r}: expected one of {choices} with a number X") from None
        if method is DynamicMethod.SV_RATIO and not value >= 1:
            raise ConfigError(f"dynamic {text!r}: sv_ratio needs X ≥ 1 (keep σ ≥ σ_max / X)")
        if method is not DynamicMethod.SV_RATIO and not 0 < value <= 1:
            raise ConfigError(f"dynamic {text!r}: {method.value} needs X in (0, 1]")
        return cls(method, value)

    def rank_for(self, s: torch.Tensor) -> int:
        """The rank this rule keeps for singular values ``s`` (descending); at least 1."""
        s = s.double()
        if self.method is DynamicMethod.SV_RATIO:
            r = int((s >= s[0] / self.value * (1 - _SLACK)).sum())
        else:
            if self.method is DynamicMethod.SV_FRO:
                kept, target = (s**2).cumsum(0), self.value**2
            else:
                kept, target = s.cumsum(0), self.value
            total = float(kept[-1])
            if total <= 0:
                return 1
            r = int((kept / total < target - _SLACK).sum()) + 1
        return max(1, min(r, s.numel()))


def parse_dynamic(text: str | None) -> DynamicRule | None:
    return None if text is None else DynamicRule.parse(text)


def check_rank_args(rank: int | None, dynamic: str | None) -> DynamicRule | None:
    """Validate ``rank``/``dynamic`` (at least one is needed); the parsed rule."""
    if rank is None and dynamic is None:
        raise ConfigError("give a rank or a dynamic rule (sv_ratio:X, sv_fro:X, sv_cumulative:X)")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ConfigError(f"rank {rank!r}: must be a positive integer")
    return parse_dynamic(dynamic)


def factor_delta(
    delta: torch.Tensor, down_shape: tuple[int, ...], rank: int | None, rule: DynamicRule | None, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """SVD factors of a 2-D ``delta`` [out, in·k·k]: (up, down, kept energy, total energy).

    ``down_shape`` is the original down shape ([r, in] or [r, in, kh, kw]), used to reshape a conv's
    factors back; the rank is ``rank`` clamped to min(out, in·k·k), or the rule's (capped by ``rank``).
    """
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    r = rule.rank_for(s) if rule is not None else s.numel()
    if rank is not None:
        r = min(r, rank)
    r = max(1, min(r, s.numel()))
    root = s[:r].sqrt()
    up = u[:, :r] * root
    down = root[:, None] * vh[:r]
    if len(down_shape) == 4:
        down = down.reshape(r, *down_shape[1:])
        up = up.reshape(up.shape[0], r, 1, 1)
    energy = s**2
    return up.to(dtype).contiguous(), down.to(dtype).contiguous(), float(energy[:r].sum()), float(energy.sum())


def flat_delta(m: ModuleLora, scale: float, name: str) -> torch.Tensor:
    """``scale · up @ down`` in float64 as a matrix [out, in·kh·kw]."""
    if m.up.dim() == 4 and m.up.shape[2:] != (1, 1):
        raise ConfigError(f"{name}: up has a {tuple(m.up.shape[2:])} kernel; only 1×1 up factors can be resized")
    up = m.up.double().reshape(m.up.shape[0], m.rank)
    return scale * (up @ m.down.double().reshape(m.rank, -1))


def refuse_dora(data: AdapterData, what: str) -> None:
    dora = [k for k, m in data.modules.items() if m.magnitude is not None]
    if dora:
        raise ConfigError(
            f"{what}: {len(dora)} DoRA module(s) (e.g. {dora[0]}); a DoRA magnitude is not a low-rank delta, "
            f"so it cannot be {what}d exactly — use plain LoRA adapters"
        )


def fraction(kept: float, total: float) -> float:
    return kept / total if total > 0 else 1.0


def resize_modules(
    data: AdapterData, rank: int | None, rule: DynamicRule | None
) -> tuple[AdapterData, dict[str, tuple[float, float]]]:
    from ..formats.adapter_data import AdapterData, ModuleLora

    modules: dict[str, ModuleLora] = {}
    energies: dict[str, tuple[float, float]] = {}
    for key, m in data.modules.items():
        scale = m.scale(data.use_rslora)
        up, down, kept, total = factor_delta(flat_delta(m, scale, key), tuple(m.down.shape), rank, rule, m.down.dtype)
        bias = None if m.bias is None else (scale * m.bias.double()).to(m.bias.dtype)
        modules[key] = ModuleLora(down=down, up=up, alpha=float(down.shape[0]), bias=bias)
        energies[key] = (kept, total)
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


@dataclass
class ReshapeReport:
    """What a merge or resize wrote: per module the new rank and the fraction of ‖ΔW‖²_F kept, and
    the fraction of the whole adapter's energy kept (1.0 for an exact concat merge)."""

    out: Path
    modules: int
    ranks: dict[str, int] = field(default_factory=dict)
    energy: dict[str, float] = field(default_factory=dict)
    total_energy: float = 1.0

    @classmethod
    def of(cls, out: Path, data: AdapterData, energies: Mapping[str, tuple[float, float]]) -> ReshapeReport:
        """The report for ``data`` written to ``out``; ``energies``: module → (kept, total) energy."""
        kept, total = sum(e[0] for e in energies.values()), sum(e[1] for e in energies.values())
        return cls(
            out=out,
            modules=len(data.modules),
            ranks={k: m.rank for k, m in data.modules.items()},
            energy={k: fraction(*e) for k, e in energies.items()},
            total_energy=fraction(kept, total),
        )


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
    on failure. ``keys`` (e.g. ``model_keys_of(state_of(pipe))``) replaces the family's reference model."""
    from ..formats.hashes import file_sha256
    from .merge import read_inputs, write_output

    rule = check_rank_args(rank, dynamic)
    path = _check_out(out)
    (read,), keys = read_inputs([src], family, keys, allow_pickle=allow_pickle)
    refuse_dora(read.data, "resize")
    data, energies = resize_modules(read.data, rank, rule)
    kept = {k: v for k, v in read.data.metadata.items() if k not in _STALE_KEYS and not k.startswith("sshs_")}
    provenance = {"method": "svd", "rank": rank, "dynamic": dynamic,
                  "input": {"file": read.path.name, "sha256": file_sha256(read.path)}}  # fmt: skip
    kept["diffusion_lora.resize"] = json.dumps(provenance)
    if to is None:
        from ..formats.detect import FileFormat

        to = read.format if read.format in {f.value for f in FileFormat} else FileFormat.DIFFUSERS.value
    write_output(path, keys, data, to, kept)
    return ReshapeReport.of(path, data, energies)


def _check_out(out: str | os.PathLike) -> Path:
    path = Path(out)
    if path.suffix != ".safetensors":
        raise ConfigError(f"{path}: adapter files must end in .safetensors")
    return path
