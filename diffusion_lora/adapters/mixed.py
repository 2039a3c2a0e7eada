"""Per-sample adapter stacks: one forward pass where every sample gets exactly its own adapters and weights.

diffusers never passes PEFT's ``adapter_names`` through its pipelines, and PEFT's mixed batch takes one
adapter per sample. Here every LoRA layer gets a forward hook (PyTorch's own extension point, not a
patched ``forward``) that adds, for each adapter of the batch, ``weight_i · scale · up(down(x_i))`` to
the rows ``i`` of the samples that use it, while PEFT's own adapter path is switched off. Only the rows
of an adapter are computed through it, so a batch of 8 samples with 8 different rank-r adapters costs the
multiply-adds of one shared adapter: per adapter with ``index_select`` / ``index_add`` (LoRAX's segmented
batching), or, for linear layers where a torch op's fixed cost dominates, with each sample's adapters
gathered into batched matmuls (Punica's gather); a cost estimate picks per layer and input shape.

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


# The cost model that picks a layer's path (see _SampleHook), in multiply-adds: a torch op's fixed cost
# (dispatch, allocation: some microseconds of one core) and one element copied by index_select/index_add.
# Rough CPU figures; only the ratio of the two paths' estimates matters, and both paths give the same sums.
_OP_COST = 70_000
_COPY_COST = 4


@dataclass
class _Route:
    """One adapter's share of one layer: the samples that use it and their weights (unit scale folded in)."""

    down: torch.nn.Module
    up: torch.nn.Module
    samples: list[int]  # indices into the batch's samples, ascending
    factors: list[float]  # weight · alpha/r per listed sample
    everyone: bool  # every sample uses it at the same factor: no row selection needed
    covers: bool  # every sample uses it (factors may differ): no row selection, a factor per row
    _rows: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return self.down.weight.shape[0]

    def rows(self, reps: int, n: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(row indices, per-row factors [rows]) for a batch of ``reps`` × ``n`` rows, made once per batch."""
        key = (reps, device, dtype)
        if key not in self._rows:
            base = torch.tensor(self.samples, dtype=torch.long)
            index = torch.cat([base + k * n for k in range(reps)])
            factors = torch.tensor(self.factors * reps, dtype=torch.float32).to(device=device, dtype=dtype)
            self._rows[key] = (index.to(device), factors)
        return self._rows[key]


def _linear_only(routes: list[_Route]) -> bool:
    """Plain linear adapters of one dtype and device (conv adapters and biases take the per-adapter path)."""
    mods = [m for r in routes for m in (r.down, r.up)]
    return (all(type(m) is torch.nn.Linear and m.bias is None for m in mods)
            and len({(m.weight.dtype, m.weight.device) for m in mods}) == 1)


class _Gathered:
    """Each sample's adapters gathered into per-sample matrices (Punica's batched gather): slot ``k`` holds
    the ``k``-th adapter of every sample's stack, ``down`` [samples, rank, in] and ``up`` [samples, out, rank]
    with the sample's factor folded in (zeros for a sample with fewer adapters, ranks zero-padded). One
    batched matmul pair per slot, whatever the number of adapters, at the multiply-adds of the per-adapter
    path (plus padding)."""

    def __init__(self, routes: list[_Route], samples: int) -> None:
        own: list[list[tuple[_Route, float]]] = [[] for _ in range(samples)]
        for r in routes:
            for i, f in zip(r.samples, r.factors):
                own[i].append((r, f))
        rank = max(r.rank for r in routes)
        w = routes[0].down.weight
        self.slots = []
        for k in range(max(len(o) for o in own)):
            down = torch.zeros(samples, rank, w.shape[1], dtype=w.dtype, device=w.device)
            up = torch.zeros(samples, routes[0].up.weight.shape[0], rank, dtype=w.dtype, device=w.device)
            for i, o in enumerate(own):
                if k < len(o):
                    r, f = o[k]
                    down[i, : r.rank] = r.down.weight
                    up[i, :, : r.rank] = r.up.weight * f
            # contiguous [n, in, rank] and [n, rank, out]: a transposed view costs a copy in every matmul
            self.slots.append((down.transpose(1, 2).contiguous(), up.transpose(1, 2).contiguous()))

    @staticmethod
    def slots_needed(routes: list[_Route], samples: int) -> int:
        used = [0] * samples
        for r in routes:
            for i in r.samples:
                used[i] += 1
        return max(used)


class _SampleHook:
    """The forward hook of one LoRA layer while per-sample stacks are in effect.

    Two ways to add the adapters, chosen per input shape by a cost estimate (both give the same sums, in a
    different order): per adapter on the rows that use it (``index_select`` / ``index_add``, skipped when it
    covers every row), or gathered per sample (:class:`_Gathered`: a few batched matmuls whatever the number
    of adapters, for linear layers). The choice and the index and gathered tensors are made on the first call
    with a shape and reused for every step of the batch. (Concatenating all adapters into one matmul pair
    with a per-row mask, S-LoRA style, was measured too: it costs Σ rank / rank times the multiply-adds and
    lost to the gathered path at every layer size of SD1.5 and the embedded model.)
    """

    def __init__(self, where: str, samples: int, routes: list[_Route]) -> None:
        self.where, self.samples, self.routes = where, samples, routes
        # adapters every sample uses at one factor are added as they are, outside the gathered path
        self._shared = [r for r in routes if r.everyone]
        self._mixed = [r for r in routes if not r.everyone]
        self._linear = len(self._mixed) > 1 and _linear_only(self._mixed)
        self._gathered: _Gathered | None = None
        self._choice: dict[tuple, str] = {}  # (shape, device) -> path

    def __call__(self, module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        rows = x.shape[0]
        if rows % self.samples:
            raise AdapterStateError(
                f"{self.where}: called with {rows} rows for {self.samples} samples; per-sample adapters need "
                "every batch to hold the samples in order (a multiple of their count)"
            )
        reps = rows // self.samples
        key = (tuple(x.shape), x.device)
        path = self._choice.get(key)
        if path is None:
            path = self._choice[key] = self._cheapest(x, output, reps)
        # in place after the first addition (a tensor of our own) unless autograd records the ops
        inplace = not torch.is_grad_enabled()
        if path == "gathered":
            return self.add_gathered(x, output, reps, inplace)
        return self.add_per_adapter(x, output, reps, inplace)

    def _cheapest(self, x: torch.Tensor, output: torch.Tensor, reps: int) -> str:
        if not self._linear:
            return "per-adapter"
        rows = x.shape[0]
        tokens = x[0].numel() // x.shape[-1]
        width = x.shape[-1] + output.shape[-1]
        cost = {"per-adapter": 0}
        for r in self._mixed:
            used = rows if r.covers else len(r.samples) * reps
            cost["per-adapter"] += used * tokens * r.rank * width + (3 if r.covers else 5) * _OP_COST
            if not r.covers:
                cost["per-adapter"] += used * tokens * width * _COPY_COST
        slots = _Gathered.slots_needed(self._mixed, self.samples)
        rank = max(r.rank for r in self._mixed)
        cost["gathered"] = slots * (rows * tokens * rank * width + 3 * _OP_COST)
        return min(cost, key=cost.get)

    def _add(self, output: torch.Tensor, delta: torch.Tensor, own: bool) -> torch.Tensor:
        if own:
            return output.add_(delta.to(output.dtype))
        return output + delta.to(output.dtype)

    def add_per_adapter(self, x: torch.Tensor, output: torch.Tensor, reps: int, inplace: bool,
                        routes: list[_Route] | None = None) -> torch.Tensor:
        """Each adapter on the rows of the samples that use it."""
        own = False
        for route in self.routes if routes is None else routes:
            dtype = route.down.weight.dtype
            if route.everyone:
                delta = route.up(route.down(x.to(dtype))) * route.factors[0]
            elif route.covers:
                _, factors = route.rows(reps, self.samples, x.device, dtype)
                delta = route.up(route.down(x.to(dtype)))
                delta = delta * factors.view(-1, *([1] * (delta.dim() - 1)))
            else:
                index, factors = route.rows(reps, self.samples, x.device, dtype)
                delta = route.up(route.down(x.index_select(0, index).to(dtype)))
                delta = delta * factors.view(-1, *([1] * (delta.dim() - 1)))
                if own:
                    output.index_add_(0, index, delta.to(output.dtype))
                else:
                    output, own = output.index_add(0, index, delta.to(output.dtype)), inplace
                continue
            output, own = self._add(output, delta, own), inplace
        return output

    def add_gathered(self, x: torch.Tensor, output: torch.Tensor, reps: int, inplace: bool) -> torch.Tensor:
        """Each row through its own sample's adapters, one batched matmul pair per stack slot."""
        output = self.add_per_adapter(x, output, reps, inplace, self._shared)
        own = inplace and bool(self._shared)
        if self._gathered is None:
            self._gathered = _Gathered(self._mixed, self.samples)
        g = self._gathered
        down0 = g.slots[0][0]
        xs = x.to(down0.dtype).reshape(reps, self.samples, -1, x.shape[-1])  # [reps, n, tokens, in]
        for down, up in g.slots:
            delta = torch.matmul(torch.matmul(xs, down), up)  # [reps, n, tokens, out]
            output, own = self._add(output, delta.reshape(output.shape), own), inplace
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
            covers = len(samples) == len(stacks)
            everyone = covers and len(set(factors)) == 1
            routes.append(_Route(layer.lora_A[name], layer.lora_B[name], samples, factors, everyone, covers))
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
