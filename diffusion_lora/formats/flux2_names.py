"""Flux.2 LoRA key names: Black Forest Labs' original module names and diffusers' Flux2Transformer2DModel.

Flux.2 (dev and Klein) LoRA files in the wild name the transformer's layers by BFL's module names, the same
block names as Flux.1 with another layout inside:

* kohya / musubi-tuner (``networks.lora_flux_2``): ``lora_unet_<flat BFL name>.lora_down.weight`` /
  ``.lora_up.weight`` / ``.alpha`` (``lora_unet_double_blocks_0_img_attn_qkv``, ``lora_unet_single_blocks_0_linear1``);
* ComfyUI and ai-toolkit: ``diffusion_model.<dotted BFL name>.lora_A.weight`` / ``.lora_B.weight`` (or
  ``.lora_down`` / ``.lora_up``), ``.alpha`` optional;
* fal's Klein trainer (PEFT on the BFL model): ``base_model.model.<dotted BFL name>.lora_A.weight``, no alpha;
  read as ComfyUI names, as diffusers' ``Flux2LoraLoaderMixin.lora_state_dict`` does.

What BFL fuses and diffusers keeps apart: only ``{img,txt}_attn.qkv`` (diffusers' ``to_q``/``to_k``/``to_v``,
``add_{q,k,v}_proj``: consecutive thirds of the rows, ``attn.inner_dim`` each) and ``final_layer.adaLN_modulation.1``
(``norm_out.linear`` with its two output halves swapped, as ``convert_flux2_transformer_checkpoint_to_diffusers``
swaps them). The single blocks' ``linear1`` / ``linear2`` are diffusers' fused ``attn.to_qkv_mlp_proj`` /
``attn.to_out`` one to one, and the modulation layers are shared by all blocks (``double_stream_modulation_img``
…), so a Flux.2 file is read and written back exactly. Mapping checked against diffusers 0.42's
``convert_flux2_transformer_checkpoint_to_diffusers`` and ``_convert_kohya_flux2_lora_to_diffusers``;
the tables produce the same :data:`~.flux_names.Target` rows as Flux.1's, so :mod:`.flux_tensors` splits and
fuses them with the same code.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from types import MappingProxyType

from .flux_names import ALL_ROWS, FluxDims, Target

NETWORK_MODULE = "networks.lora_flux_2"  # musubi-tuner's Flux.2 LoRA module, written in ss_network_module

_QKV = (("img_attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
        ("txt_attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")))
_DOUBLE = (
    ("img_attn.proj", "attn.to_out.0"),
    ("img_mlp.0", "ff.linear_in"),  # SwiGLU: rows (gate | up), the same order in both
    ("img_mlp.2", "ff.linear_out"),
    ("txt_attn.proj", "attn.to_add_out"),
    ("txt_mlp.0", "ff_context.linear_in"),
    ("txt_mlp.2", "ff_context.linear_out"),
)
_SINGLE = (("linear1", "attn.to_qkv_mlp_proj"), ("linear2", "attn.to_out"))
_TOP = (
    ("img_in", "x_embedder"),
    ("txt_in", "context_embedder"),
    ("time_in.in_layer", "time_guidance_embed.timestep_embedder.linear_1"),
    ("time_in.out_layer", "time_guidance_embed.timestep_embedder.linear_2"),
    ("guidance_in.in_layer", "time_guidance_embed.guidance_embedder.linear_1"),
    ("guidance_in.out_layer", "time_guidance_embed.guidance_embedder.linear_2"),
    ("double_stream_modulation_img.lin", "double_stream_modulation_img.linear"),
    ("double_stream_modulation_txt.lin", "double_stream_modulation_txt.linear"),
    ("single_stream_modulation.lin", "single_stream_modulation.linear"),
    ("final_layer.linear", "proj_out"),
)
_ADALN = "final_layer.adaLN_modulation.1"
# the first name of every BFL Flux.2 module (what follows fal's Klein trainer's PEFT prefix)
BFL2_ROOTS = ("double_blocks.", "single_blocks.", *(b for b, _ in _TOP), _ADALN)


@lru_cache(maxsize=16)
def bfl2_table(dims: FluxDims) -> Mapping[str, tuple[Target, ...]]:
    """Every BFL module name of a Flux.2 transformer (dotted, ``double_blocks.0.img_attn.qkv``) → its targets,
    (diffusers module path, rows of the BFL layer's output it gets), in :func:`.flux_names.bfl_table`'s form.

    ``dims.inner_dim`` is the size of each third of a ``qkv`` (the model's ``attn.inner_dim``); the MLP size
    plays no part, since no Flux.2 layer fuses attention with MLP rows differently from diffusers.
    """
    inner = dims.inner_dim
    table: dict[str, tuple[Target, ...]] = {bfl: ((path, ALL_ROWS),) for bfl, path in _TOP}
    table[_ADALN] = (("norm_out.linear", slice(inner, 2 * inner)), ("norm_out.linear", slice(0, inner)))
    for i in range(dims.num_double_blocks):
        prefix = f"transformer_blocks.{i}."
        for bfl, paths in _QKV:
            table[f"double_blocks.{i}.{bfl}"] = tuple(
                (prefix + path, slice(n * inner, (n + 1) * inner)) for n, path in enumerate(paths)
            )
        for bfl, path in _DOUBLE:
            table[f"double_blocks.{i}.{bfl}"] = ((prefix + path, ALL_ROWS),)
    for i in range(dims.num_single_blocks):
        for bfl, path in _SINGLE:
            table[f"single_blocks.{i}.{bfl}"] = ((f"single_transformer_blocks.{i}.{path}", ALL_ROWS),)
    return MappingProxyType(table)


