"""SD3 / SD3.5 LoRA key names: Stability AI's MMDiT module names and diffusers' SD3Transformer2DModel.

SD3 LoRA files in the wild name the transformer's layers four ways:

* kohya sd-scripts (``networks.lora_sd3``) and ComfyUI: ``lora_unet_<flat MMDiT name>`` with
  ``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` (``lora_unet_joint_blocks_0_x_block_attn_qkv``);
* ComfyUI: ``diffusion_model.<dotted MMDiT name>`` with ``.lora_A.weight`` / ``.lora_B.weight`` (or
  ``.lora_down`` / ``.lora_up``) and ``.alpha`` — :mod:`.comfyui` renames these to the kohya spelling first;
* OneTrainer: ``lora_transformer_<flat diffusers path>`` (ComfyUI reads it too);
* diffusion_lora's own earlier kohya files: ``lora_unet_<flat diffusers path>``, resolved by the plain kohya index.

MMDiT fuses layers diffusers keeps apart: ``x_block.attn.qkv`` is ``attn.to_q``/``to_k``/``to_v`` stacked
along the output rows, ``context_block.attn.qkv`` is ``add_q_proj``/``add_k_proj``/``add_v_proj`` and, in
SD3.5 Medium's dual-attention blocks, ``x_block.attn2.qkv`` is ``attn2.to_q``/``to_k``/``to_v``. The last
block's context stream is "pre-only": its ``adaLN_modulation.1`` (shift, scale) is diffusers'
``norm1_context.linear`` (scale, shift), and ``final_layer.adaLN_modulation.1`` is ``norm_out.linear`` with
the same swap. Row counts come from the model's own layers (tiny models work; nothing assumes 1536).
Mapping checked against diffusers 0.42's ``convert_sd3_transformer_checkpoint_to_diffusers`` and
ComfyUI's ``comfy.utils.mmdit_to_diffusers``.

Reading splits a fused LoRA into one kohya-named LoRA per diffusers module (:func:`mmdit_to_kohya`), which
the kohya reader then loads like any other; writing fuses them back (:func:`write_mmdit`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from ..errors import FormatError, KeyMappingError
from .adapter_data import AdapterData, ModuleLora
from .comfyui import comfyui_names, write_comfyui
from .flux_names import ALL_ROWS, Target
from .flux_tensors import fused_tensors
from .kohya import KohyaIndex, flatten, kohya_alpha, kohya_metadata, write_kohya

COMPONENT = "transformer"
KOHYA_PREFIX = "lora_unet_"
ONETRAINER_PREFIX = "lora_transformer_"
COMFYUI_PREFIX = "diffusion_model."
NETWORK_MODULE = "networks.lora_sd3"  # what sd-scripts' SD3 trainer writes in ss_network_module

Shape = tuple[int, ...]
_QKV = ("to_q", "to_k", "to_v")
_ADD_QKV = ("add_q_proj", "add_k_proj", "add_v_proj")
# (MMDiT name inside joint_blocks.N, diffusers paths inside transformer_blocks.N; several = fused along rows)
_BLOCK: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("x_block.attn.qkv", tuple(f"attn.{p}" for p in _QKV)),
    ("x_block.attn.proj", ("attn.to_out.0",)),
    ("x_block.attn2.qkv", tuple(f"attn2.{p}" for p in _QKV)),
    ("x_block.attn2.proj", ("attn2.to_out.0",)),
    ("x_block.mlp.fc1", ("ff.net.0.proj",)),
    ("x_block.mlp.fc2", ("ff.net.2",)),
    ("x_block.adaLN_modulation.1", ("norm1.linear",)),  # 6 or 9 (dual) chunks, same order in both
    ("context_block.attn.qkv", tuple(f"attn.{p}" for p in _ADD_QKV)),
    ("context_block.attn.proj", ("attn.to_add_out",)),
    ("context_block.mlp.fc1", ("ff_context.net.0.proj",)),
    ("context_block.mlp.fc2", ("ff_context.net.2",)),
)
_CONTEXT_ADALN = ("context_block.adaLN_modulation.1", "norm1_context.linear")
_TOP: tuple[tuple[str, str], ...] = (
    ("x_embedder.proj", "pos_embed.proj"),
    ("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
    ("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
    ("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
    ("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"),
    ("context_embedder", "context_embedder"),
    ("final_layer.linear", "proj_out"),
)
_FINAL_ADALN = ("final_layer.adaLN_modulation.1", "norm_out.linear")
_BLOCK_INDEX = re.compile(r"transformer_blocks\.(\d+)\.")
# tensor roles whose first axis is the layer's output rows (split by rows); the others are copied to each part
_ROW_ROLES = frozenset({"lora_up.weight", "dora_scale", "diff_b", "diff"})


def _swapped(path: str, rows: int) -> tuple[Target, ...]:
    """(shift, scale) in MMDiT = rows [half:] then [:half] of diffusers' (scale, shift) layer."""
    half = rows // 2
    return ((path, slice(half, rows)), (path, slice(0, half)))


def mmdit_table(shapes: Mapping[str, Shape]) -> dict[str, tuple[Target, ...]]:
    """Every MMDiT module name (dotted, ``joint_blocks.0.x_block.attn.qkv``) of the SD3 transformer whose
    Linear/Conv2d layers have ``shapes`` (diffusers path → weight shape) → its targets.

    A target is (diffusers module path, rows of the MMDiT layer's output it gets), as in
    :mod:`.flux_names`: q/k/v get consecutive row blocks of ``qkv`` sized by their own layers; a swapped
    layer's one diffusers module gets the second half of the rows, then the first. Names whose diffusers
    modules the model lacks (``attn2`` outside dual blocks, ``to_add_out`` in the last block) are left out.
    """
    table: dict[str, tuple[Target, ...]] = {}
    for mmdit, path in _TOP:
        if path in shapes:
            table[mmdit] = ((path, ALL_ROWS),)
    if _FINAL_ADALN[1] in shapes:
        table[_FINAL_ADALN[0]] = _swapped(_FINAL_ADALN[1], shapes[_FINAL_ADALN[1]][0])
    blocks = sorted({int(m.group(1)) for p in shapes if (m := _BLOCK_INDEX.match(p))})
    for i in blocks:
        src, dst = f"joint_blocks.{i}.", f"transformer_blocks.{i}."
        for mmdit, parts in _BLOCK:
            paths = [dst + p for p in parts]
            if not all(p in shapes for p in paths):
                continue
            if len(paths) == 1:
                table[src + mmdit] = ((paths[0], ALL_ROWS),)
                continue
            targets, start = [], 0
            for p in paths:
                targets.append((p, slice(start, start + shapes[p][0])))
                start += shapes[p][0]
            table[src + mmdit] = tuple(targets)
        adaln = dst + _CONTEXT_ADALN[1]
        if adaln in shapes:
            # diffusers' pre-only context block (no to_add_out) normalises with AdaLayerNormContinuous
            pre_only = dst + "attn.to_add_out" not in shapes
            targets = _swapped(adaln, shapes[adaln][0]) if pre_only else ((adaln, ALL_ROWS),)
            table[src + _CONTEXT_ADALN[0]] = targets
    return table


def mmdit_index(shapes: Mapping[str, Shape]) -> dict[str, tuple[Target, ...]]:
    """Every flat file name (prefix included) the transformer's layers answer to → their targets:
    ``lora_unet_<flat MMDiT name>`` and OneTrainer's ``lora_transformer_<flat diffusers path>``.

    Raises KeyMappingError if two names flatten alike (they cannot: MMDiT and diffusers names differ)."""
    index: dict[str, tuple[Target, ...]] = {}
    names = [(KOHYA_PREFIX + flatten(m), t) for m, t in mmdit_table(shapes).items()]
    names += [(ONETRAINER_PREFIX + flatten(p), ((p, ALL_ROWS),)) for p in shapes]
    for name, targets in names:
        if index.setdefault(name, targets) != targets:
            raise KeyMappingError(f"SD3 LoRA name {name!r} fits two layers; files cannot tell them apart")
    return index


def mmdit_to_kohya(
    tensors: Mapping[str, torch.Tensor], shapes: Mapping[str, Shape]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``tensors`` (kohya spelling: ``<flat name>.<role>``) with every MMDiT- or OneTrainer-named transformer
    layer renamed to its diffusers layers' kohya names (``lora_unet_transformer_blocks_0_attn_to_q``), and
    for each returned key the file key it came from.

    A fused layer becomes one LoRA per diffusers module: each gets the shared ``down`` (and ``alpha``,
    hence the fused layer's scale), its rows of ``up`` and of ``dora_scale``/``diff_b``/``diff``. Other keys
    pass through unchanged, for the kohya reader to resolve or report. Raises FormatError when a fused
    layer's rows do not add up to this model's, or when two file names give the same module.
    """
    index = mmdit_index(shapes)
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}

    def put(key: str, tensor: torch.Tensor, source: str) -> None:
        if key in out:
            raise FormatError(
                f"keys {origin[key]!r} and {source!r} both give {key}; the file names one layer twice "
                f"(MMDiT and diffusers spellings together)"
            )
        out[key], origin[key] = tensor, source

    for key, tensor in tensors.items():
        name, _, role = key.partition(".")
        targets = index.get(name)
        if targets is None:
            put(key, tensor, key)
            continue
        if len(targets) == 1 and targets[0][1] == ALL_ROWS:
            put(f"{KOHYA_PREFIX}{flatten(targets[0][0])}.{role}", tensor, key)
            continue
        rows = max(s.stop for _, s in targets)
        if role in _ROW_ROLES and (tensor.dim() == 0 or tensor.shape[0] != rows):
            raise FormatError(
                f"{key}: {list(tensor.shape)} does not have this model's {rows} output rows of "
                f"{name} ({', '.join(f'{p}: {s.stop - s.start}' for p, s in targets)}); the file is for another "
                f"SD3 size"
            )
        by_path: dict[str, list[slice]] = {}
        for path, s in targets:
            by_path.setdefault(path, []).append(s)
        for path, slices in by_path.items():
            part = torch.cat([tensor[s] for s in slices]).contiguous() if role in _ROW_ROLES else tensor.clone()
            put(f"{KOHYA_PREFIX}{flatten(path)}.{role}", part, key)
    return out, origin


def write_mmdit(
    data: AdapterData, shapes: Mapping[str, Shape], text_index: KohyaIndex, *, comfyui: bool, denoiser: str,
    text_encoders: Mapping[str, str],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and ``ss_*`` metadata of an sd-scripts (``comfyui=False``) or ComfyUI SD3 file for ``data``.

    Transformer modules are written under their MMDiT names (``lora_unet_joint_blocks_0_x_block_attn_qkv`` /
    ``diffusion_model.joint_blocks.0.x_block.attn.qkv``); the three LoRAs of a fused ``qkv`` become one that
    gives each of them exactly its own ΔW = scale · up @ down:

    * when all three share one ``down`` (as read from a fused file), that ``down`` is kept and the ups are
      stacked: rank unchanged, so reading ∘ writing ∘ reading keeps the file's size;
    * otherwise (trained separately) the downs are concatenated along the rank and ``up`` is block-diagonal
      (rank 3r), the layout sd-scripts itself writes for its ``split_qkv`` LoRA.

    Text-encoder modules keep their kohya / ComfyUI CLIP names. KeyMappingError names modules with no
    MMDiT name.
    """
    table = mmdit_table(shapes)
    inverse = {path: mmdit for mmdit, targets in table.items() for path, _ in targets}
    groups: dict[str, dict[str, ModuleLora]] = {}
    text: dict[str, ModuleLora] = {}
    unknown: list[str] = []
    for key, m in data.modules.items():
        component, _, path = key.partition(".")
        if component != COMPONENT:
            text[key] = m
        elif path in inverse:
            groups.setdefault(inverse[path], {})[path] = m
        else:
            unknown.append(key)
    if unknown:
        raise KeyMappingError(
            f"{len(unknown)} modules have no name in Stability AI's MMDiT layout ({', '.join(unknown[:5])}); "
            f"save them in the diffusers format"
        )
    named = {
        (COMFYUI_PREFIX + mmdit if comfyui else KOHYA_PREFIX + flatten(mmdit)): (table[mmdit], parts)
        for mmdit, parts in groups.items()
    }
    tensors, written = fused_tensors(named, data.use_rslora)
    if text:
        text_data = AdapterData(modules=text, use_rslora=data.use_rslora)
        if comfyui:
            tensors.update(write_comfyui(text_data, comfyui_names(text_data, denoiser, text_encoders, None)))
        else:
            tensors.update(write_kohya(text_data, text_index)[0])
    plain = {k: ModuleLora(m.down, m.up, kohya_alpha(m, data.use_rslora)) for k, m in text.items()}  # rsLoRA as alpha
    metadata = kohya_metadata(AdapterData(modules={**written, **plain}))
    metadata["ss_network_module"] = NETWORK_MODULE
    return tensors, metadata

