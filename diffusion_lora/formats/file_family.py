"""Which model family an adapter file is for, from its header alone: metadata first, else its module names.

The one rule ``inspect`` shows and ``convert``/``merge``/``resize`` act on, so they cannot disagree.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ..families import FAMILIES, family_of_kohya_version
from .family_guess import guess_families
from .peft_format import PEFT_MODEL_PREFIX, split_peft_key

FAMILY_KEY = "diffusion_lora.family"
KOHYA_VERSION_KEY = "ss_base_model_version"
ARCHITECTURE_KEY = "modelspec.architecture"
# kohya/ComfyUI/LyCORIS tensor suffixes → (role, algorithm)
TENSOR_SUFFIXES = {
    "lora_down.weight": ("down", "lora"), "lora_A.weight": ("down", "lora"), "lora_up.weight": ("up", "lora"),
    "lora_B.weight": ("up", "lora"), "lora_mid.weight": ("mid", "lora"), "alpha": ("alpha", None),
    "dora_scale": ("magnitude", "dora"), "hada_w1_a": ("up", "loha"), "hada_w1_b": ("down", "loha"),
    "hada_w2_a": ("up2", "loha"), "hada_w2_b": ("down2", "loha"), "hada_t1": ("t1", "loha"),
    "hada_t2": ("t2", "loha"), "lokr_w1": ("w1", "lokr"), "lokr_w1_a": ("w1a", "lokr"),
    "lokr_w1_b": ("down", "lokr"), "lokr_w2": ("w2", "lokr"), "lokr_w2_a": ("w2a", "lokr"),
    "lokr_w2_b": ("down2", "lokr"), "lokr_t2": ("t2", "lokr"), "diff": ("diff", "full"), "diff_b": ("diff_b", None),
}  # fmt: skip


@dataclass(frozen=True)
class FileFamily:
    """The families a file may be for (one when known, several when its names cannot tell them apart,
    none when nothing says) and where that came from."""

    names: tuple[str, ...]
    source: str

    @property
    def one(self) -> str | None:
        """The family when exactly one is named, else None."""
        return self.names[0] if len(self.names) == 1 else None


def module_of(key: str) -> str:
    """The module a tensor name belongs to: the name without its diffusers/PEFT or kohya/LyCORIS suffix."""
    split = split_peft_key(key.removeprefix(PEFT_MODEL_PREFIX))
    if split is not None:
        return split[0]
    for suffix in TENSOR_SUFFIXES:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1]
    return key


def family_of(metadata: Mapping[str, str], keys: Iterable[str]) -> FileFamily:
    """The family of a file with ``metadata`` and tensor names ``keys``: ``diffusion_lora.family``, else
    kohya's ``ss_base_model_version``, else the ModelSpec architecture when one family writes it, else what
    its module names point to (see ``guess_families``)."""
    if metadata.get(FAMILY_KEY) in FAMILIES:
        return FileFamily((metadata[FAMILY_KEY],), f"metadata ({FAMILY_KEY})")
    kohya_family = family_of_kohya_version(metadata.get(KOHYA_VERSION_KEY, ""))
    if kohya_family is not None:
        return FileFamily((kohya_family.name,), f"metadata ({KOHYA_VERSION_KEY})")
    # musubi-tuner's Flux.2 files record only the ModelSpec architecture; their BFL names are Flux.1's too
    named = sorted({f.name for f in FAMILIES.values() for v in f.all_variants
                    if v.modelspec_architecture == metadata.get(ARCHITECTURE_KEY)})
    if len(named) == 1:
        return FileFamily((named[0],), f"metadata ({ARCHITECTURE_KEY})")
    modules = list(dict.fromkeys(module_of(k) for k in keys))
    # Dotted (diffusers/ComfyUI) names are passed twice, as modules and among all names: the rule inspect has
    # always shown, kept so its output does not change (they weigh double between equally specific families).
    guess = guess_families([m for m in modules if "." in m and not m.startswith("lora_")], extra_keys=modules)
    if guess:
        return FileFamily(tuple(sorted(guess)), "module names")
    return FileFamily((), "unknown")
