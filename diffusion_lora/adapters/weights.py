"""Adapter weights, including per-block weights, and pushing them into PEFT's layers.

A weight is either a number (the whole adapter) or a per-block dict. Per-block keys:

* ``default`` — every layer no other key names (1.0 when absent);
* a block group of the family: UNet ``down``/``mid``/``up``, transformer ``blocks``/``single``;
* one block or an inclusive range of a group: ``down.1``, ``up.0``, ``blocks.0-3``, ``single.10-37``;
* a text-encoder component: ``text_encoder``, ``text_encoder_2``.

The most specific key wins: a single index over a range over a group over ``default``. Keys that
name no group or an index the model does not have are errors.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from ..compat import peft as compat_peft
from ..errors import ConfigError
from .state import AdapterState, LoraSite, Weight

# The bound on |weight|: ComfyUI's LoraLoader offers strengths in [-100, 100]; nothing in practice
# goes further (A1111 users rarely pass ±2, block weights ±10), and beyond it a weight only turns images
# into noise or NaN. A typo such as 1e30 is an error rather than a black image.
MAX_WEIGHT = 100.0
_KEY = re.compile(r"^(?P<group>[a-z_0-9]+?)(?:\.(?P<lo>\d+)(?:-(?P<hi>\d+))?)?$")
Block = tuple[str, int | None] | None


def block_layout(state: AdapterState) -> dict[str, int | None]:
    """Each block group of the pipeline with its number of blocks (None for a single-block group).

    Computed once per pipeline: adapters never change the block structure.
    """
    if state.layout is not None:
        return state.layout
    family = state.family
    counts: dict[str, int | None] = {}
    denoiser = state.components[family.denoiser]
    for path, _ in denoiser.named_modules():
        block = family.block_of(path + ".")
        if block is None:
            continue
        group, index = block
        if index is None:
            counts[group] = None
        else:
            counts[group] = max(counts.get(group) or 0, index + 1)
    for component in family.text_encoders:
        if component in state.components:
            counts[component] = None
    state.layout = counts
    return counts


def _describe(layout: Mapping[str, int | None]) -> str:
    return ", ".join(g if n is None else f"{g}.0-{n - 1}" for g, n in layout.items())


def check_weight_value(what: str, value: object) -> float:
    """``value`` as a float if it is a finite number with |value| ≤ :data:`MAX_WEIGHT`; else ConfigError
    naming ``what`` (e.g. "weight of adapter 'a' at 'up.1'")."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{what} must be a number, got {_shown(value)}")
    try:
        number = float(value)
    except OverflowError:  # an int with hundreds of digits
        number = math.inf if value > 0 else -math.inf
    if not math.isfinite(number):
        raise ConfigError(f"{what} must be a finite number, got {_shown(value)}")
    if abs(number) > MAX_WEIGHT:
        raise ConfigError(
            f"{what} is {number!r}; weights must lie in [-{MAX_WEIGHT:g}, {MAX_WEIGHT:g}] "
            f"(ComfyUI's range; usual values are 0 to 2)"
        )
    return number


def _shown(value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**40:
        # from the bit length: str() of an integer over 4300 digits raises ValueError
        return f"an integer of about {int(abs(value).bit_length() * math.log10(2)) + 1} digits"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_value(name: str, key: str, value: object) -> float:
    return check_weight_value(f"weight of adapter {name!r} at {key!r}", value)


def validate_weight(name: str, weight: Weight, layout: Mapping[str, int | None]) -> Weight:
    """Check a weight against the pipeline's block layout; returns it normalised to floats."""
    if not isinstance(weight, Mapping):
        return _check_value(name, "weight", weight)
    checked: dict[str, float] = {}
    for key, value in weight.items():
        checked[str(key)] = _check_value(name, str(key), value)
        if key == "default":
            continue
        m = _KEY.match(str(key))
        group = m.group("group") if m else None
        if m is None or group not in layout:
            raise ConfigError(
                f"per-block weight of adapter {name!r}: unknown block key {key!r}; valid keys are "
                f"default, {_describe(layout)} (a group, an index or a range like blocks.0-3)"
            )
        count = layout[group]
        if m.group("lo") is None:
            continue
        lo, hi = int(m.group("lo")), int(m.group("hi") or m.group("lo"))
        if count is None or hi < lo or hi >= count:
            limit = "has no indices" if count is None else f"has blocks 0-{count - 1}"
            raise ConfigError(f"per-block weight of adapter {name!r}: {key!r} is out of range ({group} {limit})")
    return checked


def resolve_block_weight(weight: Weight, block: Block) -> float:
    """The weight that applies to a layer in ``block``."""
    if not isinstance(weight, Mapping):
        return float(weight)
    best, best_rank = weight.get("default", 1.0), -1
    for key, value in weight.items():
        m = _KEY.match(key)
        if m is None or block is None or m.group("group") != block[0]:
            continue
        if m.group("lo") is None:
            rank = 0
        else:
            lo, hi = int(m.group("lo")), int(m.group("hi") or m.group("lo"))
            if block[1] is None or not lo <= block[1] <= hi:
                continue
            rank = 2 if lo == hi else 1
        if rank > best_rank:
            best, best_rank = value, rank
    return float(best)


def apply_weights(state: AdapterState) -> None:
    """Set every LoRA layer's active adapters and scaling from the adapter records.

    A layer's active list holds the enabled adapters whose weight there is non-zero, so weight 0
    (or a disabled adapter) is skipped entirely and gives exactly the base output.
    """
    for name in state.peft_adapter_names():
        state.record(name)
    # Sorted by name so the same adapters at the same weights give the same bits whatever the load order.
    enabled = sorted((n, r.weight) for n, r in state.records.items() if r.enabled)
    cache: dict[tuple[str, Block], float] = {}
    for site in state.sites():
        _apply_site(site, enabled, cache)


def _apply_site(site: LoraSite, enabled: list[tuple[str, Weight]], cache: dict) -> None:
    layer = site.layer
    available = layer.lora_A
    active: list[str] = []
    for name, weight in enabled:
        if name not in available:
            continue
        if isinstance(weight, float):
            w = weight
        else:
            key = (name, site.block)
            w = cache.get(key)
            if w is None:
                w = cache[key] = resolve_block_weight(weight, site.block)
        if w == 0.0:
            continue
        layer.set_scale(name, w)
        active.append(name)
    if layer.disable_adapters:
        layer.enable_adapters(True)
    # Assigned directly: PEFT's set_adapter would also flip requires_grad on every adapter parameter.
    compat_peft.set_active_adapters(layer, active)
