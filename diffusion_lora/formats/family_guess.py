"""Which model family an adapter's module keys most likely belong to, from all of its keys.

The evidence is each family's ``key_evidence`` and ``context_width`` in the registry."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from ..families import FAMILIES
from .adapter_data import ModuleLora


def _evidence() -> tuple[tuple[frozenset[str], re.Pattern[str]], ...]:
    """(families it points to, pattern) for every pattern of every family's ``key_evidence``."""
    families: dict[str, set[str]] = {}
    for family in FAMILIES.values():
        for pattern in family.key_evidence:
            families.setdefault(pattern, set()).add(family.name)
    return tuple((frozenset(names), re.compile(pattern)) for pattern, names in families.items())


_EVIDENCE = _evidence()
# Cross-attention context width of the real models: attn2.to_k's input features.
_CONTEXT_WIDTH = {
    width: frozenset(f.name for f in FAMILIES.values() if f.context_width == width)
    for width in {f.context_width for f in FAMILIES.values() if f.context_width}
}


def _votes(modules: Mapping[str, ModuleLora] | Sequence[str], extra_keys: Sequence[str]) -> dict[frozenset[str], int]:
    votes: dict[frozenset[str], int] = {}
    for key in [*modules, *extra_keys]:
        for families, pattern in _EVIDENCE:
            if pattern.search(key):
                votes[families] = votes.get(families, 0) + 1
        if isinstance(modules, Mapping) and key in modules and key.startswith("unet.") and key.endswith("attn2.to_k"):
            families = _CONTEXT_WIDTH.get(int(modules[key].down.shape[1]))
            if families:
                votes[families] = votes.get(families, 0) + 1
    return votes


def guess_families(
    modules: Mapping[str, ModuleLora] | Sequence[str], extra_keys: Sequence[str] = ()
) -> frozenset[str]:
    """The families the keys most specifically point to; empty when they say nothing.

    Every key (and, given ModuleLora values, the cross-attention width) votes for the families its
    rules name. The families every piece of evidence agrees on win (an SD3 file's joint attention says
    sd3 or flux1, its CLIP-G encoder sdxl or sd3: sd3); when the evidence contradicts itself, the
    evidence naming the fewest families wins (ties: the most votes). sd1 and sd2 cannot be told apart
    by key names alone, so without the cross-attention width they come as a pair.
    """
    votes = _votes(modules, extra_keys)
    if not votes:
        return frozenset()
    agreed = frozenset.intersection(*votes)
    if agreed:
        return agreed
    return min(votes, key=lambda fams: (len(fams), -votes[fams]))
