"""Low-rank factoring of weight deltas by truncated SVD: the math of ``resize``, ``merge`` (svd) and ``extract``.

A delta ΔW [out, in·kh·kw] (a conv flattened) is factored ΔW ≈ U_r S_r Vh_r and stored as
``up = U_r·√S_r``, ``down = √S_r·Vh_r``, so ``up @ down`` is the best rank-r approximation of ΔW
(scale 1: ``alpha = r``). The rank is fixed or chosen per module by a dynamic rule (kohya's
``resize_lora``):

- ``sv_ratio:X`` — keep every σ ≥ σ_max / X (X ≥ 1);
- ``sv_fro:X`` — the smallest r whose kept Frobenius norm is ≥ X of the whole, i.e. whose kept
  energy Σσ²_kept / Σσ² is ≥ X² (X in (0, 1]; kohya compares norms, not squared norms);
- ``sv_cumulative:X`` — the smallest r with Σσ_kept / Σσ ≥ X (X in (0, 1]).

With a dynamic rule, a given rank caps the rank. Energy retained is Σσ²_kept / Σσ².
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ConfigError
from ..formats.adapter_data import AdapterData, ModuleLora

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


@dataclass(frozen=True)
class Factors:
    """``up @ down`` ≈ a delta: ``up`` [out, r] (conv [out, r, 1, 1]), ``down`` [r, in] (conv [r, in, kh, kw]),
    and the energy (Σσ²) kept and in total."""

    up: torch.Tensor
    down: torch.Tensor
    kept: float
    total: float

    @property
    def fraction(self) -> float:
        """The fraction of ‖ΔW‖²_F kept (1.0 for a zero delta)."""
        return fraction(self.kept, self.total)

    def cast(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(up, down) as contiguous tensors of ``dtype``."""
        return self.up.to(dtype).contiguous(), self.down.to(dtype).contiguous()


def factor(
    delta: torch.Tensor, in_shape: tuple[int, ...], rank: int | None, rule: DynamicRule | None = None
) -> Factors:
    """The truncated SVD factors of a 2-D ``delta`` [out, in·kh·kw], computed in ``delta``'s dtype.

    ``in_shape`` is the layer's input shape, ``(in,)`` or ``(in, kh, kw)`` for a conv, whose factors are
    reshaped to 4-d. The rank is ``rank`` clamped to min(out, in·kh·kw), or the rule's (capped by ``rank``).
    """
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    r = rule.rank_for(s) if rule is not None else s.numel()
    if rank is not None:
        r = min(r, rank)
    r = max(1, min(r, s.numel()))
    root = s[:r].sqrt()
    up = u[:, :r] * root
    down = root[:, None] * vh[:r]
    if len(in_shape) == 3:
        down = down.reshape(r, *in_shape)
        up = up.reshape(up.shape[0], r, 1, 1)
    energy = s**2
    return Factors(up, down, float(energy[:r].sum()), float(energy.sum()))


def flat_delta(m: ModuleLora, scale: float, name: str) -> torch.Tensor:
    """``scale · up @ down`` in float64 as a matrix [out, in·kh·kw]."""
    if m.up.dim() == 4 and m.up.shape[2:] != (1, 1):
        raise ConfigError(f"{name}: up has a {tuple(m.up.shape[2:])} kernel; only 1×1 up factors can be resized")
    up = m.up.double().reshape(m.up.shape[0], m.rank)
    return scale * (up @ m.down.double().reshape(m.rank, -1))


def refuse_dora(data: AdapterData, what: str) -> None:
    """ConfigError for DoRA modules: a magnitude vector is not a low-rank delta."""
    dora = [k for k, m in data.modules.items() if m.magnitude is not None]
    if dora:
        raise ConfigError(
            f"{what}: {len(dora)} DoRA module(s) (e.g. {dora[0]}); a DoRA magnitude is not a low-rank delta, "
            f"so it cannot be {what}d exactly — use plain LoRA adapters"
        )


def fraction(kept: float, total: float) -> float:
    return kept / total if total > 0 else 1.0


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
