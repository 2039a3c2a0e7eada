"""Per-sample adapter stacks: one forward pass where every sample gets exactly its own adapters and weights.

diffusers never passes PEFT's ``adapter_names`` through its pipelines, and PEFT's mixed batch takes one
adapter per sample. Here every LoRA layer gets a forward hook (PyTorch's own extension point, not a
patched ``forward``) that adds, for each adapter of the batch, ``weight_i · scale · up(down(x_i))`` to
the rows ``i`` of the samples that use it, while PEFT's own adapter path is switched off. Only the rows
of an adapter are computed through it (LoRAX/Punica's segmented batching, done with ``index_select`` /
``index_add``), so a batch of 8 samples with 8 different rank-r adapters costs about what one shared
adapter costs.

Rows map to samples by position modulo the number of samples: classifier-free guidance concatenates
``[negative; positive]`` (2N rows for N samples) and text encoders see N rows. A layer called with a
row count that is not a multiple of N raises, rather than guessing.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from ..compat import peft as compat_peft
from ..errors import AdapterStateError
from .guards import require
from .state import AdapterState, LoraSite, Weight, state_of
from .weights import apply_weights, block_layout, resolve_block_weight, validate_weight

__all__ = ["per_sample_adapters", "uses_dora"]


def uses_dora(pipe: Any, name: str) -> bool:
    """True when adapter ``name`` is a DoRA adapter (its magnitude rescales whole weights, so it cannot be
    added per sample: serve it in batches that share one stack)."""
    state = state_of(pipe)
    require(state, name)
    return any(name in site.layer.lora_magnitude_vector for site in state.sites())


@dataclass
class _Route:
    """One adapter's share of one layer: the samples that use it and their weights (unit scale folded in)."""

    down: torch.nn.Module
    up: torch.nn.Module
    samples: list[int]  # indices into the batch's samples
    factors: list[float]  # weight · alpha/r per listed sample
    everyone: bool  # every sample uses it at the same factor: no row selection needed
    _rows: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def rows(self, reps: int, n: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(row indices, per-row factors [rows]) for a batch of ``reps`` × ``n`` rows."""
        key = (reps, device)
        if key not in self._rows:
            base = torch.tensor(self.samples, dtype=torch.long)
            index = torch.cat([base + k * n for k in range(reps)])
            self._rows[key] = (index.to(device), torch.tensor(self.factors * reps, dtype=torch.float32).to(device))
        index, factors = self._rows[key]
        return index, factors.to(dtype)


class _SampleHook:
    """The forward hook of one LoRA layer while per-sample stacks are in effect."""

    def __init__(self, where: str, samples: int, routes: list[_Route]) -> None:
        self.where, self.samples, self.routes = where, samples, routes

    def __call__(self, module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        rows = x.shape[0]
        if rows % self.samples:
            raise AdapterStateError(
                f"{self.where}: called with {rows} rows for {self.samples} samples; per-sample adapters need "
                "every batch to hold the samples in order (a multiple of their count)"
            )
        reps = rows // self.samples
        for route in self.routes:
            dtype = route.down.weight.dtype
            if route.everyone:
                delta = route.up(route.down(x.to(dtype))) * route.factors[0]
                output = output + delta.to(output.dtype)
                continue
            index, factors = route.rows(reps, self.samples, x.device, dtype)
            delta = route.up(route.down(x.index_select(0, index).to(dtype)))
            delta = delta * factors.view(-1, *([1] * (delta.dim() - 1)))
            output = output.index_add(0, index, delta.to(output.dtype))
        return output


def _unit_scale(layer: Any, name: str) -> float:
    """alpha/r (alpha/√r with rsLoRA): the layer's scale at weight 1, as PEFT computes it. (This sets the
    layer's scaling; :func:`apply_weights` sets every scaling back from the records on exit.)"""
    layer.set_scale(name, 1.0)
    return float(layer.scaling[name])


def _routes(site: LoraSite, stacks: Sequence[Mapping[str, Weight]], cache: dict) -> list[_Route]:
    layer = site.layer
    names = sorted({n for stack in stacks for n in stack if n in layer.lora_A})
    routes = []
    for name in names:
        samples, factors = [], []
        unit = _unit_scale(layer, name)
        for i, stack in enumerate(stacks):
            if name not in stack:
                continue
            key = (i, name, site.block)
            if key not in cache:
                cache[key] = resolve_block_weight(stack[name], site.block)
            if cache[key] != 0.0:
                samples.append(i)
                factors.append(cache[key] * unit)
        if samples:
            everyone = len(samples) == len(stacks) and len(set(factors)) == 1
            routes.append(_Route(layer.lora_A[name], layer.lora_B[name], samples, factors, everyone))
    return routes


def _checked(state: AdapterState, stacks: Sequence[Mapping[str, Weight]]) -> list[dict[str, Weight]]:
    if not stacks:
        raise AdapterStateError("per-sample adapters: give at least one sample's stack (an empty one for none)")
    if state.fused is not None:
        raise AdapterStateError("per-sample adapters cannot run on fused weights; unfuse the pipeline first")
    layout = block_layout(state)
    checked = []
    for stack in stacks:
        one = {}
        for name, weight in stack.items():
            require(state, name)
            one[name] = validate_weight(name, weight, layout)
        checked.append(one)
    used = {n for stack in checked for n in stack}
    for site in state.sites():
        dora = used & set(site.layer.lora_magnitude_vector)
        if dora:
            raise AdapterStateError(
                f"adapter {sorted(dora)[0]!r} is a DoRA adapter: its magnitude rescales whole weights and cannot "
                "be applied per sample; run it in batches whose samples share one stack"
            )
    return checked


@contextmanager
def per_sample_adapters(pipe: Any, stacks: Sequence[Mapping[str, Weight]]) -> Iterator[None]:
    """Within the block, sample ``i`` of every pipeline call gets exactly ``stacks[i]`` (name → weight, a
    number or a per-block dict as for :func:`set_weights`); loaded adapters not in its stack are off for it.

    The pipeline must be called with ``len(stacks)`` prompts (one image each). Nothing is fused and no
    adapter's weights change; on exit every layer's active adapters are as the adapter records say.
    Refused for fused pipelines and DoRA adapters (:class:`AdapterStateError`).
    """
    state = state_of(pipe)
    checked = _checked(state, stacks)
    handles = []
    cache: dict = {}
    try:
        for site in state.sites():
            compat_peft.set_active_adapters(site.layer, [])
            routes = _routes(site, checked, cache)
            if routes:
                hook = _SampleHook(f"{site.component}.{site.path}", len(checked), routes)
                handles.append(site.layer.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()
        apply_weights(state)
