"""Flux.3 LoRA key names: Black Forest Labs' original module names and diffusers' Flux3Transformer2DModel.

Flux.3 LoRA files name the transformer's layers as diffusers does (``transformer.mode_blocks.image.0.attn.to_q``)
or by the original BFL checkpoint names, which ComfyUI uses under ``diffusion_model.``
(``diffusion_model.content_mode_blocks.image.0.q_proj.lora_A.weight``, ``lora_A``/``lora_B`` or
``lora_down``/``lora_up`` with an optional ``.alpha``). Every BFL name is a pure rename of one diffusers
module — Flux.3 fuses no layers — except ``final_layer.image.adaLN_modulation.1``, which is
``norm_out.linear`` with its two output halves swapped (BFL computes (shift, scale), diffusers'
Flux3AdaLayerNorm (scale, shift)). The renames are those of diffusers 0.42's
``convert_flux3_transformer_checkpoint_to_diffusers`` (checkpoints) and
``_convert_non_diffusers_flux3_lora_to_diffusers`` (LoRA files, which covers the blocks only).

kohya's flattened spelling of the BFL names (``lora_unet_content_mode_blocks_image_0_q_proj``) has no
known producer yet (no Flux.3 network module in kohya's or musubi-tuner's trainers); it is written and
read here so that a kohya-format file of ours names layers the way every other Flux family does.

Reading renames a file's BFL keys to diffusers spelling (:func:`to_diffusers_names`) so the generic
kohya/ComfyUI/LyCORIS readers resolve them against the model; writing renames back
(:func:`to_bfl_names`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from types import MappingProxyType

import torch

from ..errors import FormatError, KeyMappingError
from .kohya import flatten

KOHYA_PREFIX = "lora_unet_"
COMFYUI_PREFIX = "diffusion_model."
ADALN = "final_layer.image.adaLN_modulation.1"  # = norm_out.linear with the output halves swapped
ADALN_PATH = "norm_out.linear"

# (diffusers block prefix, BFL block prefix); the block's own layers are renamed by _PARTS
_BLOCKS = (
    ("mode_blocks.", "content_mode_blocks."),  # mode_blocks.image.N. / mode_blocks.image_cond.N.
    ("txt_mode_blocks.", "txt_mode_blocks."),
    ("single_transformer_blocks.", "single_blocks."),
)
_PARTS = (
    ("attn.to_q", "q_proj"),
    ("attn.to_k", "k_proj"),
    ("attn.to_v", "v_proj"),
    ("attn.to_out.0", "attn_out"),
    ("ff.linear_in", "mlp_in"),
    ("ff.linear_out", "mlp_out"),
)
_TOP = MappingProxyType({
    "x_embedders.image": "emb_in.image",
    "x_embedders.image_cond": "emb_in.image_cond",
    "context_embedder": "txt_in",
    "timestep_embedder.linear_1": "time_in.in_layer",
    "timestep_embedder.linear_2": "time_in.out_layer",
    "target_timestep_embedder.linear_1": "ref_time_in.in_layer",  # flow-map (step-distilled) models only
    "target_timestep_embedder.linear_2": "ref_time_in.out_layer",
    "proj_out": "final_layer.image.linear",
    ADALN_PATH: ADALN,
})
_MODULATION = re.compile(r"((?:early|single)_stream_modulations\.[a-z_]+)\.linear")
# the roles of a key whose tensor's rows are the layer's output rows (swapped for the adaLN layer)
_ROW_ROLES = ("lora_up.weight", "lora_B.weight", "diff", "diff_b", "dora_scale")
_ROLES = ("lora_down.weight", "lora_A.weight", "alpha", *_ROW_ROLES)


def bfl_name(path: str) -> str | None:
    """The BFL name (dotted) of diffusers module ``path`` of a Flux3Transformer2DModel; None when BFL's
    checkpoint has no such module."""
    if path in _TOP:
        return _TOP[path]
    m = _MODULATION.fullmatch(path)
    if m:
        return m.group(1) + ".lin"
    for prefix, bfl_prefix in _BLOCKS:
        if path.startswith(prefix):
            rest = path[len(prefix) :]
            for part, bfl_part in _PARTS:
                if rest.endswith("." + part):
                    return bfl_prefix + rest[: -len(part)] + bfl_part
    return None


def bfl_table(module_paths: Iterable[str]) -> Mapping[str, str]:
    """Diffusers module path → BFL name (dotted) of every module of ``module_paths`` that has one.

    Raises KeyMappingError if two modules get one name (a model that is not a Flux.3 transformer)."""
    table: dict[str, str] = {}
    seen: dict[str, str] = {}
    for path in module_paths:
        name = bfl_name(path)
        if name is None:
            continue
        if seen.setdefault(name, path) != path:
            raise KeyMappingError(f"Flux.3 BFL name {name!r} fits both {seen[name]} and {path}")
        table[path] = name
    return MappingProxyType(table)


def _spellings(table: Mapping[str, str]) -> dict[str, str]:
    """Every BFL spelling of a module (kohya-flat and ComfyUI-dotted) → the same spelling of its path."""
    names: dict[str, str] = {}
    for path, bfl in table.items():
        names[KOHYA_PREFIX + flatten(bfl)] = KOHYA_PREFIX + flatten(path)
        names[COMFYUI_PREFIX + bfl] = COMFYUI_PREFIX + path
    return names


def _split(key: str) -> tuple[str, str] | None:
    for role in _ROLES:
        if key.endswith("." + role):
            return key[: -len(role) - 1], role
    return None


def _swap_halves(key: str, tensor: torch.Tensor) -> torch.Tensor:
    rows = tensor.shape[0] if tensor.dim() else 0
    if rows % 2:
        raise FormatError(f"{key}: {rows} rows cannot be the (shift, scale) halves of the final adaLN layer")
    half = rows // 2
    return torch.cat([tensor[half:], tensor[:half]]).contiguous()


def _module_of(key: str, names: Mapping[str, str]) -> tuple[str, str] | None:
    """(module name, role) of a key whose module ``names`` knows: any LoRA role, or any suffix of a
    kohya-flat name (LyCORIS factors); None otherwise."""
    split = _split(key)
    if split is not None and split[0] in names:
        return split
    name, _, role = key.partition(".")
    return (name, role) if name in names and role else None


def _renamed(tensors: Mapping[str, torch.Tensor], names: Mapping[str, str], swap: Iterable[str]) -> tuple[
    dict[str, torch.Tensor], dict[str, str]
]:
    swap = set(swap)
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for key, tensor in tensors.items():
        found = _module_of(key, names)
        new = key
        if found is not None:
            module, role = found
            new = f"{names[module]}.{role}"
            if module in swap and role in _ROW_ROLES:
                tensor = _swap_halves(key, tensor)
            elif module in swap and role not in _ROLES:
                raise FormatError(
                    f"{key}: the final adaLN layer's output halves are swapped between BFL and diffusers, which "
                    f"this kind of adapter (not LoRA, DoRA or a whole delta) cannot follow; leave the layer out"
                )
        if new in out:
            raise FormatError(f"{key!r} and {origin[new]!r} adapt the same module (BFL and diffusers spellings)")
        out[new] = tensor
        origin[new] = key
    return out, origin


def to_diffusers_names(
    tensors: Mapping[str, torch.Tensor], module_paths: Iterable[str]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The file's tensors with every BFL module name (``lora_unet_<flat BFL>``, ``diffusion_model.<BFL>``)
    spelled as the diffusers module path under the same prefix, plus renamed key → file key.

    The final adaLN layer's output rows (``lora_up``/``lora_B``, ``diff``, ``diff_b``, ``dora_scale``)
    are swapped to diffusers' (scale, shift) order. Other keys are kept as they are. Raises FormatError
    when a file spells one module both ways, or has a LyCORIS factorisation on the adaLN layer.
    """
    table = bfl_table(module_paths)
    names = _spellings(table)
    adaln = {n for n in names if n.endswith((flatten(ADALN), ADALN))}
    return _renamed(tensors, names, adaln)


def to_bfl_names(tensors: Mapping[str, torch.Tensor], module_paths: Iterable[str]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`to_diffusers_names`: ``lora_unet_<flat path>`` / ``diffusion_model.<path>``
    keys of a file we write, spelled with BFL names (adaLN halves swapped back). KeyMappingError names
    a module BFL's checkpoint does not have."""
    table = bfl_table(module_paths)
    names = {diffusers: bfl for bfl, diffusers in _spellings(table).items()}
    unknown = sorted({(_split(k) or (k.partition(".")[0],))[0] for k in tensors if _module_of(k, names) is None})
    if unknown:
        raise KeyMappingError(
            f"{len(unknown)} module(s) have no name in Black Forest Labs' Flux.3 layout (e.g. {unknown[0]}); "
            f"save this adapter in the diffusers format instead"
        )
    adaln = {n for n in names if n.endswith((flatten(ADALN_PATH), ADALN_PATH))}
    return _renamed(tensors, names, adaln)[0]
