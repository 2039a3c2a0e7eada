"""Real-size reference models of each family, built on the meta device: module names without weights.

Converting a kohya file to diffusers names (or back) needs the model's real module list, because
kohya's ``.``→``_`` flattening cannot be reversed by string rules. Building the published configs
on the meta device gives that list in a second or two, with no download and no memory for weights.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..adapters.layers import layer_shapes
from ..families import get_family
from ..formats.model_keys import ModelKeys
from ..formats.sgm_blocks import UNetLayout

_CROSS_DOWN = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
_CROSS_UP = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
SD15_UNET = {"block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2, "cross_attention_dim": 768,
             "attention_head_dim": 8, "down_block_types": _CROSS_DOWN, "up_block_types": _CROSS_UP, "sample_size": 64}
SD2_UNET = {**SD15_UNET, "cross_attention_dim": 1024, "attention_head_dim": (5, 10, 20, 20),
            "use_linear_projection": True, "sample_size": 96}
SDXL_UNET = {
    "block_out_channels": (320, 640, 1280), "layers_per_block": 2, "transformer_layers_per_block": (1, 2, 10),
    "cross_attention_dim": 2048, "attention_head_dim": (5, 10, 20), "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816, "use_linear_projection": True,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), "sample_size": 128,
}
SD3_TRANSFORMER = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 24, "attention_head_dim": 64,
                   "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536,
                   "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 192}
FLUX_TRANSFORMER = {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
                    "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
                    "pooled_projection_dim": 768, "guidance_embeds": True}
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
          "projection_dim": 768}
OPENCLIP_H = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23, "num_attention_heads": 16,
              "projection_dim": 1024}
OPENCLIP_BIGG = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
                 "projection_dim": 1280}
T5_XXL = {"d_model": 4096, "d_ff": 10240, "num_layers": 24, "num_heads": 64, "d_kv": 64, "vocab_size": 32128,
          "feed_forward_proj": "gated-gelu"}  # fmt: skip


def _unet(config: Mapping[str, Any]) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**config)


def _clip(config: Mapping[str, Any], projection: bool = False) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(CLIPTextConfig(**config))


def _t5(config: Mapping[str, Any]) -> torch.nn.Module:
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(**config))


def _sd3() -> torch.nn.Module:
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(**SD3_TRANSFORMER)


def _flux() -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(**FLUX_TRANSFORMER)


_BUILDERS: Mapping[str, Mapping[str, Callable[[], torch.nn.Module]]] = {
    "sd1": {"unet": lambda: _unet(SD15_UNET), "text_encoder": lambda: _clip(CLIP_L)},
    "sd2": {"unet": lambda: _unet(SD2_UNET), "text_encoder": lambda: _clip(OPENCLIP_H)},
    "sdxl": {
        "unet": lambda: _unet(SDXL_UNET),
        "text_encoder": lambda: _clip(CLIP_L),
        "text_encoder_2": lambda: _clip(OPENCLIP_BIGG, projection=True),
    },
    "sd3": {
        "transformer": _sd3,
        "text_encoder": lambda: _clip(CLIP_L, projection=True),
        "text_encoder_2": lambda: _clip(OPENCLIP_BIGG, projection=True),
        "text_encoder_3": lambda: _t5(T5_XXL),
    },
    "flux1": {"transformer": _flux, "text_encoder": lambda: _clip(CLIP_L), "text_encoder_2": lambda: _t5(T5_XXL)},
}


@functools.lru_cache(maxsize=None)
def reference_keys(family_name: str) -> ModelKeys:
    """Module names of the family's published base model (SD1.5, SD2, SDXL base, SD3 medium, Flux.1-dev)."""
    family = get_family(family_name)
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    layout = None
    config: dict = {}
    with torch.device("meta"):
        for component, build in _BUILDERS[family.name].items():
            model = build()
            shapes[component] = layer_shapes(model)
            if component == family.denoiser:
                config = dict(model.config)
                layout = UNetLayout.from_config(config) if component == "unet" else None
            del model
    return ModelKeys(family, shapes, layout, config)
