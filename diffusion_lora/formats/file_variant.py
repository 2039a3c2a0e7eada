"""Which published variant of its family an adapter file is for (SD3.5 Large or Medium rather than SD3),
from its header alone, so that the file tools resolve its names against the right real-size layout.

The variant's names are what decide: SD3.5 Medium's ``attn2`` layers and SD3.5 Large's blocks 24-37 exist
in no other layout of the family (each variant's ``key_evidence``). Failing that, the metadata kohya or
diffusion_lora wrote (``ss_base_model_version``, ``modelspec.architecture``) names it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

from ..families import Family, Variant

_KOHYA_VERSION_KEY = "ss_base_model_version"
_ARCHITECTURE_KEY = "modelspec.architecture"


def variant_of_names(family: Family, names: Iterable[str]) -> Variant | None:
    """The one extra variant of ``family`` whose ``key_evidence`` some of ``names`` match; None when no
    variant's evidence matches or when several do (the names contradict each other)."""
    names = list(names)
    found = [
        v for v in family.all_variants[1:]
        if v.key_evidence and any(re.search(p, n) for p in v.key_evidence for n in names)
    ]
    return found[0] if len(found) == 1 else None


def variant_of_metadata(family: Family, metadata: Mapping[str, str]) -> Variant | None:
    """The extra variant of ``family`` the file's ``ss_base_model_version`` or ``modelspec.architecture``
    names, or None."""
    for v in family.all_variants[1:]:
        if metadata.get(_KOHYA_VERSION_KEY) == v.kohya_base_model_version:
            return v
        if metadata.get(_ARCHITECTURE_KEY) == v.modelspec_architecture:
            return v
    return None


def variant_of_files(family: Family, files: Sequence[tuple[Mapping[str, str], Iterable[str]]]) -> Variant:
    """The variant of ``family`` files given as (metadata, tensor names) are for: the first file whose names
    or metadata point to one, else the family's main variant."""
    for metadata, names in files:
        found = variant_of_names(family, names) or variant_of_metadata(family, metadata)
        if found is not None:
            return found
    return family.main_variant
