"""The diffusers internals diffusion_lora relies on, in one place.

Imports no diffusers module: the functions take the pipeline and look its helpers up on it.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "flux3_prompt_embeds",
    "flux_latent_ids",
    "gguf_dequantize",
    "gguf_dequantize_rows",
    "gguf_shape",
    "group_offload_enabled",
    "is_gguf",
    "modular_setting",
    "pack_flux_latents",
    "refresh_group_offload",
]


def pack_flux_latents(pipe: Any, latents: torch.Tensor) -> torch.Tensor:
    """Flux's 2×2 patch packing: ``latents`` [B, C, H, W] → [B, (H/2)(W/2), 4C], as the pipeline packs
    them for its transformer.

    Uses the pipeline's own staticmethod ``_pack_latents(latents, batch_size, num_channels_latents,
    height, width)`` (FluxPipeline and its img2img/inpaint/control siblings, diffusers 0.35-0.42), so
    training feeds the transformer what inference does; the same layout in torch where a pipeline has
    none.
    """
    b, c, h, w = latents.shape
    pack = getattr(pipe, "_pack_latents", None)
    if pack is not None:
        return pack(latents, b, c, h, w)
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def flux_latent_ids(pipe: Any, batch: int, height: int, width: int, device: torch.device,
                    dtype: torch.dtype) -> torch.Tensor:
    """Flux's position ids of packed latents: [height·width, 3] rows ``(0, row, column)`` for a grid of
    ``height`` × ``width`` patches (half the latent size).

    Uses the pipeline's staticmethod ``_prepare_latent_image_ids(batch_size, height, width, device,
    dtype)``, which returns 2-D ids without a batch axis in diffusers 0.35-0.42; the same grid in torch
    where a pipeline has none.
    """
    prepare = getattr(pipe, "_prepare_latent_image_ids", None)
    if prepare is not None:
        return prepare(batch, height, width, device, dtype)
    rows = torch.arange(height).repeat_interleave(width)
    cols = torch.arange(width).repeat(height)
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=1)
    return ids.to(device=device, dtype=dtype)


def _modular_steps(blocks: Any) -> list[Any]:
    """Every block of a modular pipeline's block tree, depth first (none for ``None``)."""
    if blocks is None:
        return []
    found = [blocks]
    for sub in (getattr(blocks, "sub_blocks", None) or {}).values():
        found += _modular_steps(sub)
    return found


def modular_setting(pipe: Any, name: str, default: Any) -> Any:
    """The value of setting ``name`` of the first of a modular pipeline's blocks that has one (Flux.3 in
    diffusers 0.42: ``image_rope_scale`` and ``default_height`` of Flux3PrepareLatentsStep), so that
    training uses the pipeline's own recipe; ``default`` when none has it (or ``pipe`` is not modular)."""
    for step in _modular_steps(getattr(pipe, "blocks", None)):
        if name in getattr(step, "__dict__", {}):
            return step.__dict__[name]
    return default


def flux3_prompt_embeds(pipe: Any, prompt: str, device: torch.device) -> torch.Tensor:
    """One prompt's Qwen3-VL context as Flux.3's text step makes it: [1, L, 8·hidden], L its chat-templated
    token count right-padded to a multiple of the step's ``pad_multiple`` (80).

    Uses the text step's staticmethod ``_get_qwen3_vl_prompt_embeds(text_encoder, tokenizer, prompt,
    device, max_sequence_length, pad_multiple, hidden_states_layers)`` (Flux3TextEncoderStep, diffusers
    0.42), found on the pipeline's own blocks; its defaults for length and layers are the pipeline's.
    """
    for step in _modular_steps(getattr(pipe, "blocks", None)):
        encode = getattr(step, "_get_qwen3_vl_prompt_embeds", None)
        if encode is not None:
            return encode(pipe.text_encoder, pipe.tokenizer, prompt, device=device,
                          pad_multiple=getattr(step, "pad_multiple", 80))
    raise AttributeError(f"{type(pipe).__name__} has no Flux.3 text-encoder step (_get_qwen3_vl_prompt_embeds)")


def is_gguf(weight: object) -> bool:
    """Whether ``weight`` is diffusers' ``GGUFParameter`` (GGUF block bytes; checked by class name, without
    importing diffusers' GGUF module, which needs the ``gguf`` package)."""
    return type(weight).__name__ == "GGUFParameter" and type(weight).__module__.startswith("diffusers")


def gguf_shape(weight: Any) -> tuple[int, ...]:
    """The float shape a ``GGUFParameter`` stands for (``quant_shape``, diffusers 0.32-0.42)."""
    return tuple(weight.quant_shape)


def gguf_dequantize(weight: Any) -> torch.Tensor:
    """The float weight a ``GGUFParameter`` stands for, through diffusers' ``dequantize_gguf_tensor``."""
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    return dequantize_gguf_tensor(weight)


def gguf_dequantize_rows(weight: Any, rows: int) -> torch.Tensor:
    """The first ``rows`` rows of the float weight a 2-D ``GGUFParameter`` stands for: GGUF stores each row as
    its own run of blocks (a ``[out, bytes per row]`` tensor), so only those rows' bytes are dequantized."""
    from diffusers.quantizers.gguf.utils import GGUFParameter, dequantize_gguf_tensor

    if weight.dim() != 2 or rows >= weight.shape[0]:
        return dequantize_gguf_tensor(weight)
    return dequantize_gguf_tensor(GGUFParameter(weight.as_tensor()[:rows], quant_type=weight.quant_type))
def _group_offloading_helper(name: str) -> Any:
    try:
        from diffusers.hooks import group_offloading
    except ImportError:
        return None
    return getattr(group_offloading, name, None)


def group_offload_enabled(model: torch.nn.Module) -> bool:
    """Whether diffusers' group offloading (``enable_group_offload``) is applied to ``model``, through
    ``diffusers.hooks.group_offloading._is_group_offload_enabled`` (diffusers 0.42; feature-detected:
    False where diffusers has none)."""
    check = _group_offloading_helper("_is_group_offload_enabled")
    return bool(check is not None and check(model))


def refresh_group_offload(model: torch.nn.Module) -> None:
    """Re-apply diffusers' group offloading to ``model`` after its layers changed (LoRA layers added or
    removed), as diffusers' own LoRA loader does since its PR #11804: with CUDA streams the hooks keep a
    pinned copy of each tensor they saw at apply time, and a tensor added later would have none. Uses
    ``diffusers.hooks.group_offloading._maybe_remove_and_reapply_group_offloading`` (diffusers 0.42);
    a no-op when group offloading is not applied."""
    reapply = _group_offloading_helper("_maybe_remove_and_reapply_group_offloading")
    if reapply is not None and group_offload_enabled(model):
        reapply(model)
