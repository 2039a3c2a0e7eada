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


class KohyaNames(str, enum.Enum):
    """How kohya/A1111 files spell the denoiser's modules when we write them."""

    DIFFUSERS = "diffusers"  # diffusers module paths with "." -> "_" (SD 1.x/2.x, SD3)
    SGM = "sgm"  # the original SGM block names, input_blocks/middle_block/output_blocks (SDXL)
    BFL = "bfl"  # Black Forest Labs names with fused qkv (Flux)
