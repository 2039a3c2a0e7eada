"""Built-in tiny random-weight pipelines of every supported family, for tests, docs and CI.

Each tiny model keeps the module layout of its real family — the same component names, block types,
attention projections (``to_q``/``to_k``/``to_v``/``to_out.0``, joint ``add_q_proj``/... for SD3 and
Flux, ``q_proj``/... in CLIP, ``q``/``k``/``v``/``o`` in T5), text-encoder stack and latent channels —
with hidden sizes of 32–96, so it builds in well under a second and a 2-step 32×32 generation runs in
about a second on a CPU. Weights are random: images are noise, but every code path runs.

The two CLIP encoders differ in width on purpose (a "CLIP-L" of 32 and a "CLIP-G" of 48 channels, as
768 vs 1280 in the real models), so that an adapter put on the wrong text encoder fails loudly.

The configs are plain data in :data:`TINY_SPECS`; :func:`build_tiny_pipeline` only interprets them.
The built pipeline records its name: ``pipe.name_or_path == "tiny-sd15"`` (``pipe.config._name_or_path``).
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import diffusers
import torch
import transformers
from diffusers import DiffusionPipeline

from ..errors import ModelLoadError
from .tokenizers import (
    CLIP_MAX_LENGTH,
    build_clip_tokenizer,
    build_t5_tokenizer,
    clip_vocab_size,
    t5_vocab_size,
)

__all__ = ["TINY_MODELS", "TINY_SPECS", "TinyComponent", "TinySpec", "build_tiny_pipeline"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TinyComponent:
    """One pipeline component: its name in the pipeline, its class name and its constructor config.

    ``cls`` is looked up in :mod:`diffusers` or, for text encoders and tokenizers, :mod:`transformers`.
    Tokenizers take no config; text encoders get token ids and vocabulary size from the tokenizers.
    """

    name: str
    cls: str
    config: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class TinySpec:
    """A tiny pipeline: its diffusers class, its components in build order and extra pipeline kwargs."""

    pipeline: str
    components: tuple[TinyComponent, ...]
    pipeline_kwargs: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


def _frozen(**kwargs: Any) -> Mapping[str, Any]:
    return MappingProxyType(kwargs)


# Text encoders, shaped like the real ones at 1/24 of the width.
_CLIP_L = _frozen(
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_hidden_layers=2,
    projection_dim=32,
    hidden_act="quick_gelu",
)
_CLIP_G = _frozen(
    hidden_size=48,
    intermediate_size=96,
    num_attention_heads=4,
    num_hidden_layers=2,
    projection_dim=48,
    hidden_act="gelu",
)
# T5 v1.1 (gated GELU, untied head); d_model >= CLIP-L + CLIP-G width, as SD3 pads CLIP into T5 width.
_T5 = _frozen(
    d_model=96,
    d_kv=8,
    d_ff=128,
    num_heads=4,
    num_layers=2,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
    feed_forward_proj="gated-gelu",
    tie_word_embeddings=False,
    dropout_rate=0.0,
)

# latent 16×16 for a 32×32 image (2 VAE blocks: scale factor 2).
_UNET_COMMON = _frozen(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=8,
)
_VAE_COMMON = _frozen(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    layers_per_block=1,
    norm_num_groups=8,
)
_SD_BETAS = _frozen(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
)

TINY_SPECS: Mapping[str, TinySpec] = MappingProxyType(
    {
        "tiny-sd15": TinySpec(
            pipeline="StableDiffusionPipeline",
            components=(
                TinyComponent(
                    "unet",
                    "UNet2DConditionModel",
                    _frozen(**_UNET_COMMON, cross_attention_dim=32, attention_head_dim=4),
                ),
                TinyComponent(
                    "vae", "AutoencoderKL", _frozen(**_VAE_COMMON, latent_channels=4, scaling_factor=0.18215)
                ),
                TinyComponent("text_encoder", "CLIPTextModel", _CLIP_L),
                TinyComponent("tokenizer", "CLIPTokenizer"),
                TinyComponent(
                    "scheduler",
                    "DDIMScheduler",
                    _frozen(**_SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1),
                ),
            ),
            pipeline_kwargs=_frozen(
                safety_checker=None, feature_extractor=None, requires_safety_checker=False
            ),
        ),
        "tiny-sdxl": TinySpec(
            pipeline="StableDiffusionXLPipeline",
            components=(
                TinyComponent(
                    "unet",
                    "UNet2DConditionModel",
                    _frozen(
                        **_UNET_COMMON,
                        cross_attention_dim=32 + 48,  # CLIP-L and CLIP-G hidden states, concatenated
                        attention_head_dim=(2, 4),
                        transformer_layers_per_block=(1, 2),
                        use_linear_projection=True,
                        addition_embed_type="text_time",
                        addition_time_embed_dim=8,
                        projection_class_embeddings_input_dim=6 * 8 + 48,  # 6 time ids + pooled CLIP-G
                    ),
                ),
                TinyComponent(
                    "vae", "AutoencoderKL", _frozen(**_VAE_COMMON, latent_channels=4, scaling_factor=0.13025)
                ),
                TinyComponent("text_encoder", "CLIPTextModel", _CLIP_L),
                TinyComponent("text_encoder_2", "CLIPTextModelWithProjection", _CLIP_G),
                TinyComponent("tokenizer", "CLIPTokenizer"),
                TinyComponent("tokenizer_2", "CLIPTokenizer"),
                TinyComponent(
                    "scheduler",
                    "EulerDiscreteScheduler",
                    _frozen(**_SD_BETAS, timestep_spacing="leading", steps_offset=1),
                ),
            ),
        ),
        "tiny-sd3": TinySpec(
            pipeline="StableDiffusion3Pipeline",
            components=(
                TinyComponent(
                    "transformer",
                    "SD3Transformer2DModel",
                    _frozen(
                        sample_size=16,
                        patch_size=2,
                        in_channels=16,
                        out_channels=16,
                        num_layers=2,  # the last block is context_pre_only (no to_add_out)
                        attention_head_dim=8,
                        num_attention_heads=4,
                        joint_attention_dim=96,  # T5 width
                        caption_projection_dim=32,
                        pooled_projection_dim=32 + 48,  # pooled CLIP-L + CLIP-G
                        pos_embed_max_size=32,  # latents up to 64×64, images up to 128×128
                    ),
                ),
                TinyComponent(
                    "vae",
                    "AutoencoderKL",
                    _frozen(
                        **_VAE_COMMON,
                        latent_channels=16,
                        use_quant_conv=False,
                        use_post_quant_conv=False,
                        scaling_factor=1.5305,
                        shift_factor=0.0609,
                    ),
                ),
                TinyComponent("text_encoder", "CLIPTextModelWithProjection", _CLIP_L),
                TinyComponent("text_encoder_2", "CLIPTextModelWithProjection", _CLIP_G),
                TinyComponent("text_encoder_3", "T5EncoderModel", _T5),
                TinyComponent("tokenizer", "CLIPTokenizer"),
                TinyComponent("tokenizer_2", "CLIPTokenizer"),
                TinyComponent("tokenizer_3", "T5TokenizerFast"),
                TinyComponent("scheduler", "FlowMatchEulerDiscreteScheduler", _frozen(shift=3.0)),
            ),
        ),
        "tiny-flux": TinySpec(
            pipeline="FluxPipeline",
            components=(
                TinyComponent(
                    "transformer",
                    "FluxTransformer2DModel",
                    _frozen(
                        patch_size=1,
                        in_channels=64,  # 16 latent channels packed 2×2
                        num_layers=2,
                        num_single_layers=2,
                        attention_head_dim=16,
                        num_attention_heads=2,
                        joint_attention_dim=96,  # T5 width
                        pooled_projection_dim=32,  # pooled CLIP-L
                        guidance_embeds=True,  # like FLUX.1-dev
                        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
                    ),
                ),
                TinyComponent(
                    "vae",
                    "AutoencoderKL",
                    _frozen(
                        **_VAE_COMMON,
                        latent_channels=16,
                        use_quant_conv=False,
                        use_post_quant_conv=False,
                        scaling_factor=0.3611,
                        shift_factor=0.1159,
                    ),
                ),
                TinyComponent("text_encoder", "CLIPTextModel", _CLIP_L),
                TinyComponent("text_encoder_2", "T5EncoderModel", _T5),
                TinyComponent("tokenizer", "CLIPTokenizer"),
                TinyComponent("tokenizer_2", "T5TokenizerFast"),
                TinyComponent(
                    "scheduler",
                    "FlowMatchEulerDiscreteScheduler",
                    _frozen(
                        shift=3.0,
                        use_dynamic_shifting=True,
                        base_shift=0.5,
                        max_shift=1.15,
                        base_image_seq_len=256,
                        max_image_seq_len=4096,
                    ),
                ),
            ),
        ),
    }
)

TINY_MODELS: tuple[str, ...] = tuple(TINY_SPECS)

_TOKENIZERS = {"CLIPTokenizer": build_clip_tokenizer, "T5TokenizerFast": build_t5_tokenizer}
_TEXT_ENCODERS = frozenset({"CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel"})


def _text_config(component: TinyComponent) -> transformers.PretrainedConfig:
    """The transformers config of a text encoder, with token ids that match the built-in tokenizers."""
    if component.cls.startswith("CLIP"):
        vocab = clip_vocab_size()
        # <|startoftext|>, <|endoftext|> are the two last ids; <|endoftext|> also pads.
        return transformers.CLIPTextConfig(
            **component.config,
            vocab_size=vocab,
            max_position_embeddings=CLIP_MAX_LENGTH,
            bos_token_id=vocab - 2,
            eos_token_id=vocab - 1,
            pad_token_id=vocab - 1,
        )
    return transformers.T5Config(
        **component.config,
        vocab_size=t5_vocab_size(),
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        is_encoder_decoder=False,
        use_cache=False,
    )


def _component_seed(seed: int, name: str) -> int:
    """A seed per component, so that each one's weights depend only on (seed, component name)."""
    return (seed * 0x9E3779B1 + zlib.crc32(name.encode())) % (2**63)


def _build_component(component: TinyComponent, seed: int) -> Any:
    """Instantiate one component; modules are initialised from ``torch.manual_seed`` of its seed."""
    if component.cls in _TOKENIZERS:
        return _TOKENIZERS[component.cls]()
    if component.cls in _TEXT_ENCODERS:
        model_cls = getattr(transformers, component.cls)
        torch.manual_seed(_component_seed(seed, component.name))
        return model_cls(_text_config(component)).eval()
    obj_cls = getattr(diffusers, component.cls)
    torch.manual_seed(_component_seed(seed, component.name))
    obj = obj_cls(**component.config)
    return obj.eval() if isinstance(obj, torch.nn.Module) else obj


def build_tiny_pipeline(kind: str, seed: int = 0) -> DiffusionPipeline:
    """Build the tiny random-weight pipeline ``kind`` (one of :data:`TINY_MODELS`) on the CPU in float32.

    The same ``(kind, seed)`` gives bit-identical weights; another seed gives other weights. The
    global torch RNG state is left as it was. The name is recorded: ``pipe.name_or_path == kind``.

    Raises ModelLoadError for an unknown ``kind``.
    """
    try:
        spec = TINY_SPECS[kind]
    except KeyError:
        raise ModelLoadError(
            f"unknown tiny model {kind!r}; the built-in tiny models are {', '.join(TINY_MODELS)}"
        ) from None
    with torch.random.fork_rng(devices=[]):
        components = {c.name: _build_component(c, seed) for c in spec.components}
    pipeline_cls = getattr(diffusers, spec.pipeline)
    pipe = pipeline_cls(**components, **spec.pipeline_kwargs)
    pipe.register_to_config(_name_or_path=kind)
    logger.debug("built tiny pipeline %s (seed %d)", kind, seed)
    return pipe
