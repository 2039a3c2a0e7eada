"""The image conditions of Flux.1 Kontext, Fill and Control, as their pipelines feed them to the transformer.

Pure functions over latents; each reproduces one diffusers 0.42 pipeline (checked against the tensors
the pipeline passes to its transformer in ``tests/test_flux_variants.py``):

* Kontext (``pipeline_flux_kontext.py``): the reference image's latents (the VAE mean) are packed
  and appended to the noisy tokens along the sequence; their position ids have 1 in column 0. The
  prediction is read from the first (noisy) tokens only.
* Fill (``pipeline_flux_fill.py``): the masked image's latents and the mask, pixel-unshuffled by the
  VAE's scale factor, are packed and appended along the channels.
* Control (``pipeline_flux_control.py``): the control image's latents, packed and appended along the
  channels.

Latents here are already shifted and scaled the way the denoiser expects.
"""

from __future__ import annotations

from typing import Any

import torch

from ..compat.diffusers import flux_latent_ids, pack_flux_latents


def kontext_tokens(pipe: Any, packed: torch.Tensor, ids: torch.Tensor,
                   reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden states, position ids): ``packed`` [B, N, 4C] followed by the packed ``reference`` latents
    [B, C, rh, rw] along the sequence; the reference's ids (its own grid) have column 0 set to 1."""
    b, _, rh, rw = reference.shape
    ref_ids = flux_latent_ids(pipe, b, rh // 2, rw // 2, ids.device, ids.dtype).clone()
    ref_ids[..., 0] = 1
    hidden = torch.cat([packed, pack_flux_latents(pipe, reference.to(packed.dtype))], dim=1)
    return hidden, torch.cat([ids, ref_ids], dim=0)


def fill_channels(pipe: Any, packed: torch.Tensor, masked: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``packed`` [B, N, 4C] with the packed masked-image latents [B, C, h, w] and the packed mask appended
    along the channels. ``mask`` [B, 1, H, W] in pixels (1 = repaint) is pixel-unshuffled by the VAE's
    scale factor ``vsf`` into vsf² channels: 4C + 4C + 4·vsf² channels in all."""
    vsf = pipe.vae_scale_factor
    b, _, height, width = mask.shape
    h, w = height // vsf, width // vsf
    unshuffled = mask[:, 0].reshape(b, h, vsf, w, vsf).permute(0, 2, 4, 1, 3).reshape(b, vsf * vsf, h, w)
    extra = torch.cat([pack_flux_latents(pipe, masked.to(packed.dtype)),
                       pack_flux_latents(pipe, unshuffled.to(packed.dtype))], dim=-1)
    return torch.cat([packed, extra], dim=2)


def control_channels(pipe: Any, packed: torch.Tensor, control: torch.Tensor) -> torch.Tensor:
    """``packed`` [B, N, 4C] with the packed control-image latents [B, C, h, w] appended along the channels."""
    return torch.cat([packed, pack_flux_latents(pipe, control.to(packed.dtype))], dim=2)


def random_box_masks(batch: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """[B, 1, H, W] masks of one random box each (1 inside = repaint), a quarter to three quarters of each
    side, placed anywhere; drawn from ``generator`` only."""
    masks = torch.zeros(batch, 1, height, width)
    for i in range(batch):
        u = torch.rand(4, generator=generator).tolist()
        box_h = max(1, round(height * (0.25 + 0.5 * u[0])))
        box_w = max(1, round(width * (0.25 + 0.5 * u[1])))
        top = int(u[2] * (height - box_h + 1))
        left = int(u[3] * (width - box_w + 1))
        masks[i, 0, top : top + box_h, left : left + box_w] = 1.0
    return masks
