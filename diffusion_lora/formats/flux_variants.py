"""Flux.1 LoRA files tied to one pipeline variant: fal's Kontext trainer and Black Forest Labs' Control LoRAs.

* fal.ai's FLUX.1 Kontext trainer writes PEFT's ``base_model.model.`` prefix over BFL module names with
  ``lora_A``/``lora_B`` and no alpha (``base_model.model.double_blocks.0.img_attn.qkv.lora_A.weight``).
  The names under the prefix are ComfyUI's, so :func:`fal_as_comfyui` renames them to
  ``diffusion_model.`` and the Flux reader does the rest (diffusers 0.42 reads the same files with
  ``_convert_fal_kontext_lora_to_diffusers``, which is hard-coded to the real model's 19/38 blocks).
* BFL's FLUX.1 Depth/Canny [dev] Control LoRAs (no prefix, BFL names, ``lora_B`` biases and whole
  RMSNorm scales ``…query_norm.scale``) widen the transformer's input layer and replace norm weights:
  they are not adapters a PEFT LoRA can hold, and :func:`refuse_control_lora` says what loads them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TypeVar

from ..errors import FormatError
from .flux_names import COMFYUI_PREFIX

FAL_PREFIX = "base_model.model."
# the first name of every BFL Flux.1 module: what follows fal's prefix
BFL_ROOTS = ("double_blocks.", "single_blocks.", "final_layer.", "img_in.", "txt_in.", "time_in.", "vector_in.",
              "guidance_in.")
_CONTROL_NORMS = (".query_norm.scale", ".key_norm.scale")

T = TypeVar("T")


def fal_as_comfyui(tensors: Mapping[str, T], roots: tuple[str, ...] = BFL_ROOTS) -> dict[str, T] | None:
    """``tensors`` with fal's ``base_model.model.`` prefix replaced by ComfyUI's ``diffusion_model.``, or None
    when not every key is a BFL module name (one starting with a name of ``roots``) under that prefix (a PEFT
    file of diffusers names is not fal's). fal's Kontext (Flux.1) and Klein (Flux.2) trainers write them."""
    if not tensors or not all(k.startswith(FAL_PREFIX) and k[len(FAL_PREFIX):].startswith(roots)
                              for k in tensors):
        return None
    return {COMFYUI_PREFIX + k[len(FAL_PREFIX):]: v for k, v in tensors.items()}


def fal_key(comfyui_key: str) -> str:
    """The fal key a key renamed by :func:`fal_as_comfyui` came from."""
    return FAL_PREFIX + comfyui_key.removeprefix(COMFYUI_PREFIX)


def is_control_lora(keys: Iterable[str]) -> bool:
    """True for a BFL Control LoRA: it carries whole RMSNorm scales (``…norm.query_norm.scale``)."""
    return any(k.endswith(_CONTROL_NORMS) for k in keys)


def refuse_control_lora(keys: Iterable[str], source: str) -> None:
    """FormatError for a BFL Control LoRA (see the module's docstring); nothing for any other file."""
    keys = list(keys)
    if not is_control_lora(keys):
        return
    norm = next(k for k in keys if k.endswith(_CONTROL_NORMS))
    raise FormatError(
        f"{source}: this is a Black Forest Labs Control LoRA (FLUX.1 Depth/Canny; e.g. {norm!r}): it widens the "
        "transformer's input layer (img_in) and replaces its RMSNorm weights, which a LoRA adapter cannot hold. "
        "Load it with diffusers: FluxControlPipeline.from_pretrained('black-forest-labs/FLUX.1-dev') then "
        "pipe.load_lora_weights(path)"
    )
