"""Which model family an adapter's module keys most likely belong to, from all of its keys."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from .adapter_data import ModuleLora

# Each rule: (families it points to, pattern over "<component>.<module path>" keys).
_EVIDENCE: tuple[tuple[frozenset[str], re.Pattern[str]], ...] = (
    (frozenset({"flux1"}), re.compile(r"^transformer\.single_transformer_blocks\.")),
    (frozenset({"sd3"}), re.compile(r"^transformer\.transformer_blocks\.\d+\.attn2\.")),
    (frozenset({"sd3", "flux1"}), re.compile(r"^transformer\.transformer_blocks\.\d+\.attn\.add_[qkv]_proj")),
    (frozenset({"sdxl"}), re.compile(r"^text_encoder_2\.")),
    # SDXL stacks 2 or 10 transformer blocks per attention; SD1/SD2 have one.
    (frozenset({"sdxl"}), re.compile(r"^unet\.(down|up)_blocks\.\d+\.attentions\.\d+\.transformer_blocks\.[1-9]")),
    (frozenset({"sdxl"}), re.compile(r"^unet\.add_embedding\.")),
    (frozenset({"sd1", "sd2"}), re.compile(r"^unet\.down_blocks\.0\.attentions\.")),
    (frozenset({"sd1", "sd2"}), re.compile(r"^unet\.up_blocks\.3\.attentions\.")),
    # kohya / ComfyUI names, seen when they resolve to no module of the pipeline
    (frozenset({"flux1"}), re.compile(r"^(lora_unet_|diffusion_model\.)(double|single)_blocks[._]")),
    (frozenset({"sd3"}), re.compile(r"^(lora_unet_|diffusion_model\.)joint_blocks[._]")),
    (frozenset({"sdxl"}), re.compile(r"^lora_te2_|^text_encoders\.clip_g\.")),
    (
        frozenset({"sdxl"}),
        re.compile(r"^(lora_unet_|diffusion_model\.)(input|output)_blocks[._]\d+[._]1[._]transformer_blocks[._][1-9]"),
    ),
    (frozenset({"sdxl"}), re.compile(r"^lora_unet_(down|up)_blocks_\d+_attentions_\d+_transformer_blocks_[1-9]")),
)


# Cross-attention context width of the real models: attn2.to_k's input features.
_CONTEXT_WIDTH = {768: frozenset({"sd1"}), 1024: frozenset({"sd2"}), 2048: frozenset({"sdxl"})}


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
    rules name; the evidence naming the fewest families wins
    (ties: the most votes). sd1 and sd2 cannot be told apart by key names, so they come as a pair.
    """
    votes = _votes(modules, extra_keys)
    if not votes:
        return frozenset()
    return min(votes, key=lambda fams: (len(fams), -votes[fams]))
