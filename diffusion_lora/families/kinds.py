"""The closed sets a family entry chooses from: objective, conditioning and kohya naming."""

from __future__ import annotations

import enum


class Objective(str, enum.Enum):
    """What the denoiser is trained to predict."""

    EPSILON = "epsilon"
    V_PREDICTION = "v_prediction"
    FLOW_MATCHING = "flow_matching"


class Conditioning(str, enum.Enum):
    """How training encodes captions for the denoiser and calls it (one conditioner per value)."""

    UNET = "unet"  # CLIP hidden states as cross-attention context (SD 1.x / 2.x)
    SDXL = "sdxl"  # two CLIP encoders, pooled embeddings, size/crop micro-conditioning
    SD3 = "sd3"  # joint attention over CLIP-L + CLIP-G + T5, timestep = sigma * 1000
    FLUX = "flux"  # packed 2x2 latent patches, CLIP pooled + T5 context, guidance embedding
    FLUX_KONTEXT = "flux_kontext"  # Flux.1 + reference-image tokens appended to the sequence
    FLUX_FILL = "flux_fill"  # Flux.1 + masked-image latents and mask as extra input channels
    FLUX_CONTROL = "flux_control"  # Flux.1 + control-image latents as extra input channels
    FLUX2 = "flux2"  # Flux.2: patchified, batch-norm-normalised latents, LLM hidden-state context
    FLUX3 = "flux3"  # Flux.3: Flux.2 latents, Qwen3-VL context, per-mode blocks
    CHROMA = "chroma"  # Flux.1 packing, T5 context with attention mask, no pooled/guidance embedding


class KohyaNames(str, enum.Enum):
    """How kohya/A1111 files spell the denoiser's modules when we write them."""

    DIFFUSERS = "diffusers"  # diffusers module paths with "." -> "_" (SD 1.x/2.x, SD3)
    SGM = "sgm"  # the original SGM block names, input_blocks/middle_block/output_blocks (SDXL)
    BFL = "bfl"  # Black Forest Labs names with fused qkv (Flux)
    BFL2 = "bfl2"  # Black Forest Labs Flux.2 names (fused qkv; single blocks already fused in diffusers)
    BFL3 = "bfl3"  # Black Forest Labs Flux.3 names (renames only)
    MMDIT = "mmdit"  # Stability's MMDiT names with fused qkv (SD3 / SD3.5): joint_blocks.N.x_block...
