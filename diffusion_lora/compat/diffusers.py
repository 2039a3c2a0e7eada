"""The diffusers internals diffusion_lora relies on, in one place.

Imports no diffusers module: the functions take the pipeline and look its helpers up on it.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["flux_latent_ids", "pack_flux_latents"]


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
