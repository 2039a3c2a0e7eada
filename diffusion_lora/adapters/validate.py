"""Checking an adapter against a pipeline before anything in the pipeline is touched."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..errors import FamilyMismatchError, FormatError, KeyMappingError, UnsupportedModelError
from ..formats.adapter_data import AdapterData, ModuleLora
from ..formats.checks import check_finite, fit_problem
from ..formats.family_guess import guess_families
from .layers import base_module, inside_lora_layer
from .quantized import bias_problem, compute_dtype, dequantized_rows, dora_problem
from .state import AdapterState


@dataclass
class LoadPlan:
    """Modules to load per component (paths inside the component), and the keys that matched nothing."""

    modules: dict[str, dict[str, ModuleLora]]
    skipped: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return sum(len(m) for m in self.modules.values())


def _layer_at(model: torch.nn.Module | None, path: str) -> torch.nn.Module | None:
    """The plain layer at ``path`` (seeing through a LoRA wrapper), or None when there is none."""
    if model is None or not path or inside_lora_layer(path):
        return None
    try:
        return base_module(model.get_submodule(path))
    except AttributeError:
        return None


def _fit_error(where: str, module: torch.nn.Module, m: ModuleLora, source: str) -> str | None:
    """Why ``m`` cannot be a LoRA of ``module``, or None when it fits."""
    if isinstance(module, torch.nn.Linear):
        in_f, out_f, kernel = module.in_features, module.out_features, ()
    elif isinstance(module, torch.nn.Conv2d):
        in_f, out_f, kernel = module.in_channels // module.groups, module.out_channels, tuple(module.kernel_size)
    else:
        return f"{where} is a {type(module).__name__}, which LoRA cannot adapt"
    return fit_problem(where, in_f, out_f, kernel, m, getattr(module, "bias", None) is not None)


def _widened(m: ModuleLora, module: torch.nn.Module) -> ModuleLora:
    """``m`` with zero input columns added up to ``module``'s width, when it is narrower (a Flux.1-dev LoRA of
    x_embedder on Fill/Control, whose extra inputs are image channels dev never saw): ΔW on the old inputs is
    unchanged, the new ones are not adapted (diffusers' ``_maybe_expand_lora_state_dict``)."""
    if not isinstance(module, torch.nn.Linear) or m.down.dim() != 2 or m.down.shape[1] >= module.in_features:
        return m
    down = torch.nn.functional.pad(m.down, (0, module.in_features - m.down.shape[1]))
    return dataclasses.replace(m, down=down)


# A delta this many times the layer's own weight (Frobenius norms, the weight's at least 1) is a
# corrupt file, not a style: real LoRAs change a layer by a few percent, overfit ones by well under 100%.
MAX_DELTA_RATIO = 1000.0
# The weight norm is estimated from this many rows: loading must not read every base weight.
_BASE_ROWS = 16
# Elements per reduction. torch runs a reduction this small on the calling thread; a larger one
# starts its thread pool, and on a busy machine every parallel region waits milliseconds for a core
# (256 tiny float64 products made a load 8x slower than diffusers' while another process ran).
_SERIAL = 32768
# The fast path accepts only with this much room, so float32 rounding in the norms cannot let
# through a module that the exact float64 checks would refuse.
_ROOM = 0.99


def _norm(t: torch.Tensor) -> float:
    """‖t‖ (all elements), in float32 (float64 for float64 input), in serial-sized pieces.

    Overflow gives inf and a NaN or Inf element gives NaN or inf, so a finite result also proves
    every element finite."""
    flat = t.detach().reshape(-1)
    if not flat.is_floating_point():
        flat = flat.float()
    dtype = None if flat.dtype == torch.float64 else torch.float32
    if flat.numel() <= _SERIAL:
        return float(torch.linalg.vector_norm(flat, dtype=dtype))
    parts = torch.stack([torch.linalg.vector_norm(c, dtype=dtype) for c in flat.split(_SERIAL)])
    return float(torch.linalg.vector_norm(parts))


def _layer_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype the adapter's tensors get in ``module`` (its compute dtype beside a quantized weight)."""
    return compute_dtype(module)


def _base_rows(module: torch.nn.Module) -> tuple[torch.Tensor, int]:
    """At most ``_BASE_ROWS`` rows of ``module``'s float weight, and how many rows it has (a quantized
    weight: only those rows are dequantized)."""
    rows, count = dequantized_rows(module, _BASE_ROWS)
    return rows[:_BASE_ROWS], count


def _check_values(key: str, module: torch.nn.Module, m: ModuleLora, use_rslora: bool, source: str) -> None:
    """Finite numbers, a sane size and values the layer's dtype can hold; raises FormatError.

    Settled by norms in the common case: ‖scale · up @ down‖ ≤ scale · ‖up‖ · ‖down‖, and no
    element is larger than its tensor's norm. A module these bounds do not clear goes through the
    exact float64 checks, so the decisions are exactly theirs."""
    rows, count = _base_rows(module)
    base = max(_norm(rows) * (count / rows.shape[0]) ** 0.5, 1.0)
    limit = torch.finfo(_layer_dtype(module)).max
    scale = m.scale(use_rslora)
    down, up = _norm(m.down), _norm(m.up)
    magnitude = _norm(m.magnitude) if m.magnitude is not None else 0.0
    bias = _norm(m.bias) if m.bias is not None else 0.0
    size = max(scale * up * down, magnitude, scale * bias)
    # The forward computes lora_B(lora_A(x)) before scaling, so the unscaled product must fit too.
    largest = max(down, up, magnitude, max(scale, 1.0) * max(up * down, bias))
    finite = all(math.isfinite(x) for x in (base, down, up, magnitude, bias))  # max() would drop a NaN
    if finite and 0 < m.alpha < math.inf and size <= _ROOM * MAX_DELTA_RATIO * base and largest <= _ROOM * limit:
        return
    check_finite(key, m, source)
    _check_magnitude(key, module, m, use_rslora, source)
    _check_dtype(key, m, use_rslora, _layer_dtype(module), source)


def _check_magnitude(key: str, module: torch.nn.Module, m: ModuleLora, use_rslora: bool, source: str) -> None:
    """Refuse finite but absurdly large updates (a flipped exponent bit): they overflow the forward pass."""
    # ‖W‖_F estimated from at most 16 rows (loading must not read every base weight), floored at 1
    # so that a zero-initialised layer does not make any update look absurd.
    rows, count = _base_rows(module)
    base = max(float(rows.double().norm()) * (count / rows.shape[0]) ** 0.5, 1.0)
    up, down = m.up.detach().flatten(1).double(), m.down.detach().flatten(1).double()
    # ‖up @ down‖_F² = Σ (upᵀup) ⊙ (down downᵀ), without building the [out, in] product
    delta = m.scale(use_rslora) * float(((up.T @ up) * (down @ down.T)).sum().clamp(min=0).sqrt())
    extra = []
    if m.magnitude is not None:
        extra.append(("DoRA magnitude", float(m.magnitude.detach().double().norm())))
    if m.bias is not None:
        extra.append(("bias delta", m.scale(use_rslora) * float(m.bias.detach().double().norm())))
    for what, norm in (("weight delta", delta), *extra):
        if not norm <= MAX_DELTA_RATIO * base:
            raise FormatError(
                f"{source}: the {what} of {key} is {norm / base:.3g} times the size of the layer's own weight "
                f"(norms {norm:.3g} vs {base:.3g}); no working adapter is that large, so the file is corrupt "
                f"(re-download or re-export it) and was not loaded"
            )


def _check_dtype(key: str, m: ModuleLora, use_rslora: bool, dtype: torch.dtype, source: str) -> None:
    """Refuse values the layer's dtype cannot hold: an fp32 file above 65504 is Inf in an fp16
    pipeline, and every image it makes is NaN."""
    limit = torch.finfo(dtype).max
    scale = m.scale(use_rslora)
    largest = [
        ("down weight", _max_abs(m.down)),
        ("up weight", _max_abs(m.up)),
        ("weight delta (up @ down, unscaled and scaled)", max(scale, 1.0) * _max_abs_product(m.up, m.down)),
    ]
    if m.magnitude is not None:
        largest.append(("DoRA magnitude", _max_abs(m.magnitude)))
    if m.bias is not None:
        largest.append(("bias delta", max(scale, 1.0) * _max_abs(m.bias)))
    for what, value in largest:
        if not value <= limit:
            raise FormatError(
                f"{source}: the {what} of {key} reaches {value:.3g}, more than {dtype} can hold (largest "
                f"{limit:.6g}), so in this {dtype} pipeline it would turn into Inf/NaN. Load the pipeline in "
                f"torch.float32 (or torch.bfloat16) to use this adapter; it was not loaded"
            )


def _max_abs(t: torch.Tensor) -> float:
    return float(t.detach().double().abs().max())


def _max_abs_product(up: torch.Tensor, down: torch.Tensor) -> float:
    """max |up @ down| in float64, a block of rows at a time (only modules the norms cannot clear get here)."""
    d = down.detach().flatten(1).double()
    return max(float((u.double() @ d).abs().max()) for u in up.detach().flatten(1).split(256))


def plan_load(
    state: AdapterState, data: AdapterData, source: str, *, strict: bool, unresolved: Sequence[str] = ()
) -> LoadPlan:
    """Match every module of ``data`` to a layer of the pipeline and check that it fits.

    Raises KeyMappingError (or FamilyMismatchError) when keys match nothing and ``strict``; a
    shape that does not fit or a non-finite tensor is always an error.
    """
    plan = LoadPlan(modules={}, skipped=list(unresolved))
    misfits: list[str] = []
    for key, m in data.modules.items():
        component, _, path = key.partition(".")
        module = _layer_at(state.components.get(component), path)
        if module is None:
            plan.skipped.append(key)
            continue
        if component == state.family.denoiser and path in state.variant.widened_inputs:
            m = _widened(m, module)
        problem = _fit_error(key, module, m, source)
        if problem:
            misfits.append(problem)
            continue
        _check_values(key, module, m, data.use_rslora, source)
        if m.magnitude is not None and (problem := dora_problem(module, key)):
            raise UnsupportedModelError(f"{source}: a DoRA module, but {problem}; the adapter was not loaded")
        if m.bias is not None and (problem := bias_problem(module, key)):
            raise UnsupportedModelError(f"{source}: a bias delta, but {problem}; the adapter was not loaded")
        plan.modules.setdefault(component, {})[path] = m
    total = len(data.modules) + len(unresolved)
    guess = guess_families(data.modules, extra_keys=unresolved)
    if (misfits or plan.skipped) and guess and state.family.name not in guess:
        raise FamilyMismatchError(
            f"{source}: the keys look like a {' or '.join(sorted(guess))} adapter, but the pipeline is "
            f"{state.family.name} ({state.family.title}): {len(plan.skipped)} of {total} "
            f"module(s) match no layer and {len(misfits)} have the wrong shape. Load it into a pipeline "
            f"of the family it was trained for."
        )
    if misfits:
        raise KeyMappingError(
            f"{source}: {len(misfits)} module(s) do not fit this {state.family.title} pipeline: "
            + "; ".join(misfits[:5])
            + (" …" if len(misfits) > 5 else "")
        )
    if plan.skipped and (strict or not plan.modules):
        examples = ", ".join(plan.skipped[:5])
        raise KeyMappingError(
            f"{source}: {len(plan.skipped)} of {total} module(s) match no layer of the "
            f"{state.family.title} pipeline (e.g. {examples}){_unheld_hint(plan.skipped)}. Pass strict=False "
            f"to load the modules that match and skip the rest."
        )
    return plan


def _unheld_hint(skipped: Sequence[str]) -> str:
    """Why ComfyUI ``diff``/``diff_b`` keys are among the skipped ones (ComfyUI applies them; PEFT cannot)."""
    deltas = [k for k in skipped if k.endswith((".diff", ".diff_b"))]
    if not deltas:
        return ""
    return (
        f"; {len(deltas)} of them are whole weight or bias deltas (diff/diff_b) of layers a LoRA cannot hold — "
        f"norms, or biases of layers without a LoRA — which ComfyUI applies but a PEFT adapter cannot"
    )
