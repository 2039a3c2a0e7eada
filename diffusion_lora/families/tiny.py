"""The tiny random-weight pipeline of every family, as data (built by ``models.tiny``).

Each tiny model keeps the module layout of its real family — the same component names, block types,
attention projections (``to_q``/``to_k``/``to_v``/``to_out.0``, joint ``add_q_proj``/... for SD3 and
Flux, ``q_proj``/... in CLIP, ``q``/``k``/``v``/``o`` in T5), text-encoder stack and latent channels —
with hidden sizes of 32–96, so it builds in well under a second and a 2-step 32×32 generation runs in
about a second on a CPU.

The text encoders differ in width on purpose (a "CLIP-L" of 32, an "OpenCLIP-H" of 40 and a "CLIP-G"
of 48 channels, as 768 / 1024 / 1280 in the real models), so that an adapter put on the wrong text
encoder fails loudly.
"""

from __future__ import annotations

from typing import Any

from .specs import ComponentSpec, PipelineSpec, frozen

# Text encoders, shaped like the real ones at 1/24 of the width.
_CLIP_L = frozen(
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_hidden_layers=2,
    projection_dim=32,
    hidden_act="quick_gelu",
)
_CLIP_G = frozen(
    hidden_size=48,
    intermediate_size=96,
    num_attention_heads=4,
    num_hidden_layers=2,
    projection_dim=48,
    hidden_act="gelu",
)
# T5 v1.1 (gated GELU, untied head); d_model >= CLIP-L + CLIP-G width, as SD3 pads CLIP into T5 width.
_T5 = frozen(
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
_UNET_COMMON = frozen(
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
_VAE_COMMON = frozen(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    layers_per_block=1,
    norm_num_groups=8,
)
_SD_BETAS = frozen(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
)

# SD2's OpenCLIP-H text encoder (GELU, wider than CLIP-L).
_OPENCLIP_H = frozen(
    hidden_size=40,
    intermediate_size=80,
    num_attention_heads=4,
    num_hidden_layers=2,
    projection_dim=40,
    hidden_act="gelu",
)
_SD_PIPELINE_KWARGS = frozen(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
_SD_VAE = ComponentSpec("vae", "AutoencoderKL", frozen(**_VAE_COMMON, latent_channels=4, scaling_factor=0.18215))
_SD_DDIM = frozen(**_SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1)

SD15 = PipelineSpec(
    pipeline="StableDiffusionPipeline",
    components=(
        ComponentSpec(
            "unet",
            "UNet2DConditionModel",
            frozen(**_UNET_COMMON, cross_attention_dim=32, attention_head_dim=4),
        ),
        _SD_VAE,
        ComponentSpec("text_encoder", "CLIPTextModel", _CLIP_L),
        ComponentSpec("tokenizer", "CLIPTokenizer"),
        ComponentSpec("scheduler", "DDIMScheduler", _SD_DDIM),
    ),
    pipeline_kwargs=_SD_PIPELINE_KWARGS,
)

SD2 = PipelineSpec(
    pipeline="StableDiffusionPipeline",
    components=(
        ComponentSpec(
            "unet",
            "UNet2DConditionModel",
            frozen(**_UNET_COMMON, cross_attention_dim=40, attention_head_dim=(2, 4), use_linear_projection=True),
        ),
        _SD_VAE,
        ComponentSpec("text_encoder", "CLIPTextModel", _OPENCLIP_H),
        ComponentSpec("tokenizer", "CLIPTokenizer"),
        ComponentSpec("scheduler", "DDIMScheduler", frozen(**_SD_DDIM, prediction_type="v_prediction")),  # 768-v
    ),
    pipeline_kwargs=_SD_PIPELINE_KWARGS,
)

SDXL = PipelineSpec(
    pipeline="StableDiffusionXLPipeline",
    components=(
        ComponentSpec(
            "unet",
            "UNet2DConditionModel",
            frozen(
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
        ComponentSpec(
            "vae", "AutoencoderKL", frozen(**_VAE_COMMON, latent_channels=4, scaling_factor=0.13025)
        ),
        ComponentSpec("text_encoder", "CLIPTextModel", _CLIP_L),
        ComponentSpec("text_encoder_2", "CLIPTextModelWithProjection", _CLIP_G),
        ComponentSpec("tokenizer", "CLIPTokenizer"),
        ComponentSpec("tokenizer_2", "CLIPTokenizer"),
        ComponentSpec(
            "scheduler",
            "EulerDiscreteScheduler",
            frozen(**_SD_BETAS, timestep_spacing="leading", steps_offset=1),
        ),
    ),
)

SD3 = PipelineSpec(
    pipeline="StableDiffusion3Pipeline",
    components=(
        ComponentSpec(
            "transformer",
            "SD3Transformer2DModel",
            frozen(
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
        ComponentSpec(
            "vae",
            "AutoencoderKL",
            frozen(
                **_VAE_COMMON,
                latent_channels=16,
                use_quant_conv=False,
                use_post_quant_conv=False,
                scaling_factor=1.5305,
                shift_factor=0.0609,
            ),
        ),
        ComponentSpec("text_encoder", "CLIPTextModelWithProjection", _CLIP_L),
        ComponentSpec("text_encoder_2", "CLIPTextModelWithProjection", _CLIP_G),
        ComponentSpec("text_encoder_3", "T5EncoderModel", _T5),
        ComponentSpec("tokenizer", "CLIPTokenizer"),
        ComponentSpec("tokenizer_2", "CLIPTokenizer"),
        ComponentSpec("tokenizer_3", "T5TokenizerFast"),
        ComponentSpec("scheduler", "FlowMatchEulerDiscreteScheduler", frozen(shift=3.0)),
    ),
)

# SD3.5: qk-norm (Large and Medium) and, like Medium's MMDiT-X, a dual-attention block (attn + attn2).
# Block 0 is dual, block 1 plain, block 2 the last (context_pre_only); everything else is tiny-sd3's.
SD35 = PipelineSpec(
    pipeline="StableDiffusion3Pipeline",
    components=(
        ComponentSpec(
            "transformer",
            "SD3Transformer2DModel",
            frozen(
                **{**SD3.components[0].config, "num_layers": 3, "dual_attention_layers": (0,), "qk_norm": "rms_norm"}
            ),
        ),
        *SD3.components[1:],
    ),
)

FLUX = PipelineSpec(
    pipeline="FluxPipeline",
    components=(
        ComponentSpec(
            "transformer",
            "FluxTransformer2DModel",
            frozen(
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
        ComponentSpec(
            "vae",
            "AutoencoderKL",
            frozen(
                **_VAE_COMMON,
                latent_channels=16,
                use_quant_conv=False,
                use_post_quant_conv=False,
                scaling_factor=0.3611,
                shift_factor=0.1159,
            ),
        ),
        ComponentSpec("text_encoder", "CLIPTextModel", _CLIP_L),
        ComponentSpec("text_encoder_2", "T5EncoderModel", _T5),
        ComponentSpec("tokenizer", "CLIPTokenizer"),
        ComponentSpec("tokenizer_2", "T5TokenizerFast"),
        ComponentSpec(
            "scheduler",
            "FlowMatchEulerDiscreteScheduler",
            frozen(
                shift=3.0,
                use_dynamic_shifting=True,
                base_shift=0.5,
                max_shift=1.15,
                base_image_seq_len=256,
                max_image_seq_len=4096,
            ),
        ),
    ),
)



def _flux_variant(pipeline: str, **transformer: Any) -> PipelineSpec:
    """FLUX with another pipeline class and, optionally, transformer config changes."""
    components = tuple(
        ComponentSpec(c.name, c.cls, frozen(**{**c.config, **transformer})) if c.name == "transformer" else c
        for c in FLUX.components
    )
    return PipelineSpec(pipeline=pipeline, components=components, pipeline_kwargs=FLUX.pipeline_kwargs)


# Kontext's transformer is Flux.1-dev's; only the pipeline (reference tokens on the sequence) differs.
FLUX_KONTEXT = _flux_variant("FluxKontextPipeline")
# Fill: 64 noisy + 64 masked-image + 4·vsf² mask channels, where vsf is the VAE's scale factor: 2 for this
# two-block VAE (64 + 64 + 16 = 144), 8 for the real one (384). out_channels must be given (else = in).
FLUX_FILL = _flux_variant("FluxFillPipeline", in_channels=144, out_channels=64)
# Control (Depth/Canny): 64 noisy + 64 control-image channels.
FLUX_CONTROL = _flux_variant("FluxControlPipeline", in_channels=128, out_channels=64)


# --- chroma ---
# Chroma is Flux.1's transformer without modulation Linears plus an "approximator" (distilled_guidance_layer)
# that computes every block's modulation; Flux.1's VAE and scheduler, T5 as its only text encoder.
_FLUX_PARTS = {c.name: c for c in FLUX.components}
CHROMA = PipelineSpec(
    pipeline="ChromaPipeline",
    components=(
        ComponentSpec(
            "transformer",
            "ChromaTransformer2DModel",
            frozen(
                patch_size=1,
                in_channels=64,  # 16 latent channels packed 2×2
                num_layers=2,
                num_single_layers=2,
                attention_head_dim=16,
                num_attention_heads=2,
                joint_attention_dim=96,  # T5 width
                axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
                approximator_num_channels=16,  # real 64; a multiple of 4 (time and guidance get a quarter each)
                approximator_hidden_dim=32,  # real 5120
                approximator_layers=2,  # real 5
            ),
        ),
        _FLUX_PARTS["vae"],
        ComponentSpec("text_encoder", "T5EncoderModel", _T5),
        ComponentSpec("tokenizer", "T5TokenizerFast"),
        _FLUX_PARTS["scheduler"],
    ),
)


# --- flux3 ---
# Flux.3: the Flux.2 VAE (AutoencoderKLFlux2: 32 latent channels, 2×2 patchify + BatchNorm, no scaling
# factor), a Qwen3-VL text encoder whose hidden states 4, 8, …, 32 are stacked (so ≥ 32 layers, the
# pipeline's default out-layers) and a Flux3Transformer2DModel with every block kind: per-mode image,
# image_cond and txt blocks, then joint single blocks.
_FLUX3_TEXT_HIDDEN = 8
_FLUX3_VAE = frozen(**_VAE_COMMON, latent_channels=32, use_quant_conv=True, use_post_quant_conv=True, patch_size=(2, 2))
_QWEN3_VL = frozen(
    text_config=frozen(
        vocab_size="tokenizer:len",
        hidden_size=_FLUX3_TEXT_HIDDEN,
        intermediate_size=16,
        num_hidden_layers=32,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=4,
        max_position_embeddings=1024,
        # mrope_section sums to head_dim / 2
        rope_parameters=frozen(rope_type="default", rope_theta=5000000.0, mrope_section=[1, 1, 0],
                               mrope_interleaved=True),
        pad_token_id="tokenizer:pad_token_id",
        eos_token_id="tokenizer:eos_token_id",
    ),
    vision_config=frozen(
        depth=1, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=8, spatial_merge_size=2,
        temporal_patch_size=2, out_hidden_size=_FLUX3_TEXT_HIDDEN, num_position_embeddings=16,
        deepstack_visual_indexes=[0],
    ),
    image_token_id="tokenizer:id:<|image_pad|>",
    video_token_id="tokenizer:id:<|video_pad|>",
    vision_start_token_id="tokenizer:id:<|vision_start|>",
    vision_end_token_id="tokenizer:id:<|vision_end|>",
    tie_word_embeddings=False,
)
FLUX3 = PipelineSpec(
    pipeline="Flux3ModularPipeline",
    blocks="Flux3AutoBlocks",
    # the Qwen3.5 prompt-upsampler LLM step: without it prompts are encoded as given (its docstring's advice)
    drop_blocks=("prompt_upsampler",),
    components=(
        ComponentSpec(
            "transformer",
            "Flux3Transformer2DModel",
            frozen(
                in_channels=128,  # 32 latent channels patchified 2×2
                cond_in_channels=128,
                num_layers=2,  # per mode: mode_blocks.image, mode_blocks.image_cond, txt_mode_blocks
                num_single_layers=2,
                attention_head_dim=16,
                num_attention_heads=2,
                joint_attention_dim=8 * _FLUX3_TEXT_HIDDEN,  # 8 stacked Qwen3-VL hidden states
                timestep_channels=256,
                mlp_ratio=3.0,
                axes_dims_rope=(4, 4, 4, 4),  # sums to attention_head_dim
                rope_theta=10000,
                eps=1e-6,
                flow_map=False,  # the base model; the step-distilled one has a flow-map timestep
            ),
        ),
        ComponentSpec("vae", "AutoencoderKLFlux2", _FLUX3_VAE),
        ComponentSpec("text_encoder", "Qwen3VLForConditionalGeneration", _QWEN3_VL),
        ComponentSpec("tokenizer", "Qwen3VLProcessor"),
        # the blocks' own recipe: constant shift 6.93, no dynamic shifting (Flux3SetTimestepsStep)
        ComponentSpec("scheduler", "FlowMatchEulerDiscreteScheduler", frozen(shift=6.93)),
    ),
)

# Flux.2: the real layout (fused single-block projections, SwiGLU feed-forwards, modulation shared by all
# blocks, 4-axis RoPE, no biases) at 1/192 of dev's width. The LLM text encoders keep as many layers as
# the pipelines read hidden states from by default (dev: Mistral layers 10, 20, 30; Klein: Qwen3 layers
# 9, 18, 27), so the tiny models generate through the pipelines' default call; the prompt embedding is
# those three layers stacked, 3 × 16 channels.
_FLUX2_TEXT_WIDTH = 16
_FLUX2_TRANSFORMER = frozen(
    patch_size=1,
    in_channels=128,  # 32 VAE latent channels, patchified 2×2 as the real model
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=3 * _FLUX2_TEXT_WIDTH,
    timestep_guidance_channels=256,
    mlp_ratio=3.0,
    axes_dims_rope=(4, 4, 4, 4),  # sums to attention_head_dim
    rope_theta=2000,
    eps=1e-6,
    guidance_embeds=True,  # dev is guidance-distilled; Klein is not
)
# AutoencoderKLFlux2: 32 latent channels, BatchNorm over the 2×2-patchified 128 (its running statistics are
# given non-trivial values by models.tiny, so a missing normalisation shows), quant convs as the real VAE.
_FLUX2_VAE = ComponentSpec(
    "vae",
    "AutoencoderKLFlux2",
    frozen(**_VAE_COMMON, latent_channels=32, use_quant_conv=True, use_post_quant_conv=True, patch_size=(2, 2)),
)
# FLUX.1-dev's scheduler config, which diffusers' convert_flux2_to_diffusers.py gives Flux.2 pipelines
_FLUX2_SCHEDULER = ComponentSpec(
    "scheduler",
    "FlowMatchEulerDiscreteScheduler",
    frozen(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    ),
)
_LLM_COMMON = frozen(
    hidden_size=_FLUX2_TEXT_WIDTH,
    intermediate_size=32,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=8,
    max_position_embeddings=1024,
    vocab_size="tokenizer:len",
    eos_token_id="tokenizer:eos_token_id",
    pad_token_id="tokenizer:pad_token_id",
)
_MISTRAL3 = frozen(
    text_config=frozen(
        **_LLM_COMMON, model_type="mistral", num_hidden_layers=30, rms_norm_eps=1e-5, sliding_window=None,
        bos_token_id="tokenizer:bos_token_id",
    ),
    vision_config=frozen(
        model_type="pixtral", hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        image_size=32, patch_size=8, num_channels=3, head_dim=8,
    ),
    image_token_index="tokenizer:id:[IMG]",
    spatial_merge_size=1,
    projector_hidden_act="gelu",
    vision_feature_layer=-1,
)
_QWEN3 = frozen(**_LLM_COMMON, num_hidden_layers=27, tie_word_embeddings=True, bos_token_id=None)

FLUX2 = PipelineSpec(
    pipeline="Flux2Pipeline",
    components=(
        ComponentSpec("transformer", "Flux2Transformer2DModel", _FLUX2_TRANSFORMER),
        _FLUX2_VAE,
        ComponentSpec("text_encoder", "Mistral3ForConditionalGeneration", _MISTRAL3),
        # the real pipeline holds a PixtralProcessor (it needs torchvision); the pipeline only calls
        # apply_chat_template, which the tokenizer has
        ComponentSpec("tokenizer", "LlamaTokenizer"),
        _FLUX2_SCHEDULER,
    ),
)
FLUX2_KLEIN = PipelineSpec(
    pipeline="Flux2KleinPipeline",
    components=(
        ComponentSpec(
            "transformer", "Flux2Transformer2DModel", frozen(**{**_FLUX2_TRANSFORMER, "guidance_embeds": False})
        ),
        _FLUX2_VAE,
        ComponentSpec("text_encoder", "Qwen3ForCausalLM", _QWEN3),
        ComponentSpec("tokenizer", "Qwen2Tokenizer"),
        _FLUX2_SCHEDULER,
    ),
    pipeline_kwargs=frozen(is_distilled=False),  # Klein base: real classifier-free guidance
)
