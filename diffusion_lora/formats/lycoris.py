"""LyCORIS files (LoHa, LoKr, full diff), read as exact per-module weight deltas.

LyCORIS names modules the kohya way (``lora_unet_<flat path>``, see :mod:`.kohya`; its generic
wrapper writes ``lycoris_<flat path>``) and gives each algorithm its own tensor suffixes:

* LoHa: ``hada_w1_a`` [out, r], ``hada_w1_b`` [r, in·kh·kw], ``hada_w2_a``, ``hada_w2_b``;
  ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b) · alpha / r. With Tucker (``hada_t1``, ``hada_t2``
  [r, r, kh, kw]) the factors are ``w_a`` [r, out] and ``w_b`` [r, in] and each half is
  t ×₀ w_aᵀ ×₁ w_bᵀ.
* LoKr: ``lokr_w1`` [a, c] or ``lokr_w1_a`` [a, r] @ ``lokr_w1_b`` [r, c]; ``lokr_w2`` [b, d(, kh, kw)]
  or ``lokr_w2_a`` [b, r] @ ``lokr_w2_b`` [r, d·kh·kw], or Tucker ``lokr_t2`` [r, r, kh, kw] with
  ``lokr_w2_a`` [r, b], ``lokr_w2_b`` [r, d]; ΔW = kron(w1, w2) · alpha / r, r the rank of the
  decomposed side — and scale 1 whatever alpha says when neither side is decomposed (LyCORIS
  forces alpha = rank there).
* full: ``diff`` = ΔW and ``diff_b`` = Δbias, scale 1.

Shared: ``alpha`` (0-d; absent or 0 means alpha = r, i.e. scale 1, as LyCORIS and kohya treat it),
``dora_scale`` (DoRA magnitude, see :func:`.kohya.dora_scale_to_magnitude`) and ``scalar`` (LyCORIS'
learnable scalar, multiplied in; LyCORIS itself folds it into ``w1_a`` before saving). A file may
also hold plain kohya LoRA modules (``lora_down.weight`` / ``lora_up.weight`` / ``lora_mid.weight``).

LoHa and LoKr conv layers store flattened factors, so their ΔW comes out [out, in·kh·kw]; only the
model knows the kernel size, so the caller reshapes with :func:`fit_shape`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum

import torch

from ..errors import FormatError, KeyMappingError
from .adapter_data import ModuleLora, check_delta_size
from .kohya import dora_scale_to_magnitude, fold_tucker, module_alpha

_LOHA = frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"})
_LOKR = frozenset({"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t1", "lokr_t2"})
_FULL = frozenset({"diff", "diff_b"})
_LORA = frozenset({"lora_down.weight", "lora_up.weight", "lora_mid.weight"})
_SHARED = frozenset({"alpha", "dora_scale", "scalar"})
_NAME = re.compile(r"(?:lora|lycoris)_\w+")

Parts = Mapping[str, torch.Tensor]


class DeltaKind(StrEnum):
    """The algorithm a module's delta came from; compares equal to its string value."""

    LOHA = "loha"
    LOKR = "lokr"
    FULL = "full"
    LORA = "lora"  # a plain kohya LoRA module inside a LyCORIS file


_KINDS = {DeltaKind.LOHA: _LOHA, DeltaKind.LOKR: _LOKR, DeltaKind.FULL: _FULL, DeltaKind.LORA: _LORA}
_ALLOWED = {kind: suffixes | (_SHARED if kind != DeltaKind.FULL else frozenset()) for kind, suffixes in _KINDS.items()}


@dataclass
class ModuleDelta:
    """One module's exact update, in float32.

    ``weight``: ΔW, [out, in] or [out, in, kh, kw] (LoHa/LoKr conv without Tucker: [out, in·kh·kw]
    until :func:`fit_shape`), scale and ``scalar`` included; ``bias``: Δbias [out] (full diff only);
    ``magnitude``: DoRA magnitude in PEFT's convention, [out]; ``kind``: the :class:`DeltaKind`
    (a bare ΔW is a full diff).
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    magnitude: torch.Tensor | None = None
    kind: DeltaKind = DeltaKind.FULL


def _split(key: str) -> tuple[str, str] | None:
    name, _, suffix = key.partition(".")
    if not _NAME.fullmatch(name) or not any(suffix in s for s in _ALLOWED.values()):
        return None
    return name, suffix


def is_lycoris(keys: Iterable[str]) -> bool:
    """True when every key is ``<lora|lycoris>_<flat name>.<suffix>`` with a LyCORIS or kohya LoRA
    suffix and at least one key is a LoHa (``hada_*``), LoKr (``lokr_*``) or full (``diff``) tensor.

    All keys are looked at: one key of another format (OFT, IA³, diffusers names) makes it False.
    """
    split = [_split(k) for k in keys]
    if not split or any(s is None for s in split):
        return False
    return any(s[1] in _LOHA or s[1] in _LOKR or s[1] in _FULL for s in split if s is not None)


def lycoris_deltas(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> dict[str, ModuleDelta]:
    """Each module's exact ΔW, keyed by its name in the file (``lora_unet_…_proj_in``).

    ``metadata`` (the file header) is not needed: LyCORIS keeps everything the math uses in the
    tensors (alpha is stored already adjusted for rs_lora). Raises FormatError naming the module for
    a key of another format, a module mixing algorithms, a missing or unexpected part, factors whose
    shapes do not multiply, or a bad alpha / dora_scale / scalar.
    """
    del metadata  # accepted for the readers' common signature; see the docstring
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        split = _split(key)
        if split is None:
            raise FormatError(
                f"key {key!r} is not a LyCORIS key (<lora_…>.hada_* / .lokr_* / .diff / .lora_down.weight / "
                f".alpha / …); other LyCORIS algorithms (OFT, IA³, GLoRA) are not supported"
            )
        groups.setdefault(split[0], {})[split[1]] = tensor
    return {name: module_delta(name, parts) for name, parts in groups.items()}


def module_delta(name: str, parts: Parts) -> ModuleDelta:
    """ΔW of one module from its tensors by suffix (``{"hada_w1_a": …, "alpha": …}``); see
    :func:`lycoris_deltas` for the errors."""
    kind = _kind(name, parts)
    if kind == DeltaKind.FULL:
        return _full(name, parts)
    build = {DeltaKind.LOHA: _loha, DeltaKind.LOKR: _lokr, DeltaKind.LORA: _lora}[kind]
    weight, rank = build(name, parts)
    scale = 1.0 if rank is None else module_alpha(name, parts.get("alpha"), rank) / rank
    weight = weight * (scale * _scalar(name, parts.get("scalar")))
    magnitude = None
    if "dora_scale" in parts:
        magnitude = dora_scale_to_magnitude(parts["dora_scale"].float(), weight.shape[0], weight.shape[1], name)
    return ModuleDelta(weight=weight, magnitude=magnitude, kind=kind)


def _kind(name: str, parts: Parts) -> DeltaKind:
    kinds = [k for k, suffixes in _KINDS.items() if suffixes & parts.keys()]
    if not kinds:
        raise FormatError(f"{name} has only {', '.join(sorted(parts))}; its weights are missing from the file")
    if len(kinds) > 1:
        raise FormatError(f"{name} mixes {' and '.join(kinds)} tensors; a module has one algorithm")
    extra = sorted(parts.keys() - _ALLOWED[kinds[0]])
    if extra:
        raise FormatError(f"{name}: {', '.join(extra)} does not belong to a {kinds[0]} module")
    return kinds[0]


def _need(name: str, parts: Parts, suffix: str) -> torch.Tensor:
    if suffix not in parts:
        raise FormatError(f"{name} has no {suffix}; the file is incomplete")
    return parts[suffix].float()


def _dims(name: str, what: str, tensor: torch.Tensor, dims: int | Sequence[int]) -> None:
    allowed = (dims,) if isinstance(dims, int) else tuple(dims)
    if tensor.dim() not in allowed:
        raise FormatError(
            f"{name}: {what} has shape {list(tensor.shape)}; expected {' or '.join(f'{d}-d' for d in allowed)}"
        )


def _matmul(name: str, a: torch.Tensor, b: torch.Tensor, what: str) -> torch.Tensor:
    """a [m, r] @ b [r, …] (b flattened past its first axis), shaped [m, *b.shape[1:]]."""
    _dims(name, what.split(" @ ")[0], a, 2)
    if b.dim() < 2 or a.shape[1] != b.shape[0]:
        raise FormatError(f"{name}: {what} do not multiply ({list(a.shape)} @ {list(b.shape)})")
    check_delta_size(name, [a.shape[0], *b.shape[1:]], what)
    return (a @ b.flatten(1)).reshape(a.shape[0], *b.shape[1:])


def _tucker(name: str, t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor, what: str) -> torch.Tensor:
    """LyCORIS' Tucker rebuild: t [r, r', kh, kw], wa [r, out], wb [r', in] → [out, in, kh, kw]."""
    _dims(name, what, t, (3, 4, 5))
    if wa.dim() != 2 or wb.dim() != 2 or (t.shape[0], t.shape[1]) != (wa.shape[0], wb.shape[0]):
        raise FormatError(
            f"{name}: {what} Tucker factors do not fit: t {list(t.shape)}, a {list(wa.shape)}, b {list(wb.shape)} "
            f"(need t [r, r, kh, kw], a [r, out], b [r, in])"
        )
    check_delta_size(name, [wa.shape[1], wb.shape[1], *t.shape[2:]], f"{what} Tucker product")
    return torch.einsum("ij...,ip,jq->pq...", t, wa, wb)


def _loha(name: str, parts: Parts) -> tuple[torch.Tensor, int]:
    tucker = [s for s in ("hada_t1", "hada_t2") if s in parts]
    if len(tucker) == 1:
        missing = "hada_t2" if tucker == ["hada_t1"] else "hada_t1"
        raise FormatError(f"{name} has {tucker[0]} but no {missing}; Tucker LoHa needs both")
    halves = []
    for i in (1, 2):
        wa, wb = _need(name, parts, f"hada_w{i}_a"), _need(name, parts, f"hada_w{i}_b")
        if tucker:
            halves.append(_tucker(name, _need(name, parts, f"hada_t{i}"), wa, wb, f"hada_t{i}"))
        else:
            halves.append(_matmul(name, wa, wb, f"hada_w{i}_a @ hada_w{i}_b"))
    ranks = {int(parts["hada_w1_b"].shape[0]), int(parts["hada_w2_b"].shape[0])}
    if halves[0].shape != halves[1].shape or len(ranks) != 1:
        raise FormatError(
            f"{name}: the two LoHa halves differ (shapes {list(halves[0].shape)} and {list(halves[1].shape)}, "
            f"ranks {sorted(ranks)}); the file is corrupt"
        )
    return halves[0] * halves[1], ranks.pop()


def _lokr_half(name: str, parts: Parts, i: int) -> tuple[torch.Tensor, int | None]:
    """Kronecker factor ``i`` and the rank of its decomposition (None when stored whole)."""
    full, a, b = f"lokr_w{i}", f"lokr_w{i}_a", f"lokr_w{i}_b"
    if full in parts:
        if a in parts or b in parts:
            raise FormatError(f"{name} has both {full} and {a}/{b}; a LoKr factor is stored one way")
        w = parts[full].float()
        _dims(name, full, w, (2, 3, 4, 5) if i == 2 else 2)
        return w, None
    if a not in parts and b not in parts:
        raise FormatError(f"{name} has neither {full} nor {a}/{b}; the file is incomplete")
    wa, wb = _need(name, parts, a), _need(name, parts, b)
    if i == 2 and "lokr_t2" in parts:
        return _tucker(name, parts["lokr_t2"].float(), wa, wb, "lokr_t2"), int(wb.shape[0])
    return _matmul(name, wa, wb, f"{a} @ {b}"), int(wb.shape[0])


def _lokr(name: str, parts: Parts) -> tuple[torch.Tensor, int | None]:
    if "lokr_t1" in parts:
        raise FormatError(
            f"{name} has lokr_t1 (Tucker on w1), which LyCORIS does not define; the file is not supported"
        )
    if "lokr_t2" in parts and "lokr_w2" in parts:
        raise FormatError(f"{name} has lokr_t2 with a whole lokr_w2; Tucker needs lokr_w2_a/lokr_w2_b")
    w1, r1 = _lokr_half(name, parts, 1)
    w2, r2 = _lokr_half(name, parts, 2)
    if r1 is not None and r2 is not None and r1 != r2:
        raise FormatError(f"{name}: lokr_w1 has rank {r1} but lokr_w2 rank {r2}; LyCORIS uses one rank")
    check_delta_size(name, [a * b for a, b in zip(w1.shape, w2.shape)] + list(w2.shape[2:]), "Kronecker product")
    weight = torch.kron(w1.reshape(*w1.shape, *[1] * (w2.dim() - 2)), w2.contiguous())
    return weight, r1 if r1 is not None else r2


def _lora(name: str, parts: Parts) -> tuple[torch.Tensor, int]:
    down, up = _need(name, parts, "lora_down.weight"), _need(name, parts, "lora_up.weight")
    if "lora_mid.weight" in parts:
        down = fold_tucker(down, parts["lora_mid.weight"].float(), name)
    rank = int(down.shape[0])
    if up.dim() not in (2, 4) or up.shape[1] != rank or up[0].numel() != rank:
        raise FormatError(f"{name}: lora_up {list(up.shape)} does not fit lora_down {list(down.shape)} (rank {rank})")
    return _matmul(name, up.flatten(1), down, "lora_up @ lora_down"), rank


def _full(name: str, parts: Parts) -> ModuleDelta:
    weight = _need(name, parts, "diff")
    _dims(name, "diff", weight, (2, 3, 4, 5))
    bias = parts["diff_b"].float() if "diff_b" in parts else None
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise FormatError(
            f"{name}: diff_b has shape {list(bias.shape)}; diff {list(weight.shape)} needs [{weight.shape[0]}]"
        )
    return ModuleDelta(weight=weight, bias=bias, kind=DeltaKind.FULL)


def _number(name: str, what: str, tensor: torch.Tensor) -> float:
    if tensor.numel() != 1:
        raise FormatError(f"{name}.{what} has shape {list(tensor.shape)}; it must be a single number")
    value = float(tensor.float().reshape(()))
    if not math.isfinite(value):
        raise FormatError(f"{name}.{what} is {value}; it must be finite")
    return value


def _scalar(name: str, scalar: torch.Tensor | None) -> float:
    return 1.0 if scalar is None else _number(name, "scalar", scalar)


def fit_shape(delta: ModuleDelta, shape: Sequence[int], name: str = "") -> ModuleDelta:
    """``delta`` with its weight reshaped to the target layer's weight ``shape``.

    Needed for LoHa/LoKr conv deltas, which come out [out, in·kh·kw]. Raises KeyMappingError when
    the sizes differ: the file was made for another model.
    """
    shape = tuple(int(s) for s in shape)
    weight = delta.weight
    sizes_fit = weight.numel() == math.prod(shape) and weight.shape[0] == shape[0]
    if not sizes_fit or (delta.bias is not None and delta.bias.numel() != shape[0]):
        raise KeyMappingError(
            f"{name or 'module'}: the file's ΔW {list(weight.shape)} does not fit the layer's weight {list(shape)}; "
            f"the file is for another model"
        )
    return replace(delta, weight=weight.reshape(shape))


def delta_as_lora(delta: ModuleDelta, *, use_rslora: bool = False) -> ModuleLora:
    """An exact LoRA form of ``delta.weight`` (scale 1), for PEFT LoRA layers.

    The rank is min(out, in·kh·kw): one factor is ΔW itself and the other an identity, so
    up @ down reproduces ΔW bit for bit (linear) or to float rounding (conv, whose
    down = identity is an im2col one-hot kernel when in·kh·kw < out). ``down``: [rank, in] (conv
    [rank, in, kh, kw]); ``up``: [out, rank] (conv [out, rank, 1, 1]); alpha = rank (√rank with
    ``use_rslora``) so scale = 1. Conv deltas must have their layer's shape (:func:`fit_shape`).

    A bias delta (``diff_b``) becomes the LoRA's ``bias`` (PEFT's ``lora_B`` bias; scale 1).
    """
    w = delta.weight
    out, fan_in = int(w.shape[0]), int(w[0].numel())
    if fan_in <= out:
        down = torch.eye(fan_in, dtype=w.dtype, device=w.device).reshape(fan_in, *w.shape[1:])
        up = w.reshape(out, fan_in, *[1] * (w.dim() - 2))
    else:
        down = w
        up = torch.eye(out, dtype=w.dtype, device=w.device).reshape(out, out, *[1] * (w.dim() - 2))
    rank = int(down.shape[0])
    alpha = math.sqrt(rank) if use_rslora else float(rank)
    return ModuleLora(
        down=down.contiguous(), up=up.contiguous(), alpha=alpha, magnitude=delta.magnitude, bias=delta.bias
    )
