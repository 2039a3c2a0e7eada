"""The published real-size models of each family, as data: module layout without weights.

Converting a kohya file to diffusers names (or back) needs the model's real module list, because
kohya's ``.``→``_`` flattening cannot be reversed by string rules. ``models.reference`` builds these
on the meta device, which gives that list in a second or two with no download and no weight memory.
"""

from __future__ import annotations

from .specs import ComponentSpec, frozen

_CROSS_DOWN = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
_CROSS_UP = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
SD15_UNET = frozen(
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
    down_block_types=_CROSS_DOWN, up_block_types=_CROSS_UP, sample_size=64,
)
SD2_UNET = frozen(
    **{**SD15_UNET, "cross_attention_dim": 1024, "attention_head_dim": (5, 10, 20, 20),
       "use_linear_projection": True, "sample_size": 96}
)
SDXL_UNET = frozen(
    block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048, attention_head_dim=(5, 10, 20), addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, use_linear_projection=True,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), sample_size=128,
)
SD3_TRANSFORMER = frozen(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=192,
)
# SD3.5 Large (and Large Turbo, a distilled checkpoint of the same layout): 38 blocks of 38 heads, qk-norm
SD35_LARGE_TRANSFORMER = frozen(
    **{**SD3_TRANSFORMER, "num_layers": 38, "num_attention_heads": 38, "caption_projection_dim": 2432,
       "qk_norm": "rms_norm"}
)
# SD3.5 Medium (MMDiT-X): SD3 medium's sizes, qk-norm, a second image self-attention (attn2) in blocks 0-12
SD35_MEDIUM_TRANSFORMER = frozen(
    **{**SD3_TRANSFORMER, "pos_embed_max_size": 384, "qk_norm": "rms_norm", "dual_attention_layers": tuple(range(13))}
)
FLUX_TRANSFORMER = frozen(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
)
CLIP_L = frozen(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768
)
OPENCLIP_H = frozen(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16, projection_dim=1024
)
OPENCLIP_BIGG = frozen(
    hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, projection_dim=1280
)
T5_XXL = frozen(
    d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64, vocab_size=32128, feed_forward_proj="gated-gelu"
)

SD15 = (
    ComponentSpec("unet", "UNet2DConditionModel", SD15_UNET),
    ComponentSpec("text_encoder", "CLIPTextModel", CLIP_L),
)
SD2 = (
    ComponentSpec("unet", "UNet2DConditionModel", SD2_UNET),
    ComponentSpec("text_encoder", "CLIPTextModel", OPENCLIP_H),
)
SDXL = (
    ComponentSpec("unet", "UNet2DConditionModel", SDXL_UNET),
    ComponentSpec("text_encoder", "CLIPTextModel", CLIP_L),
    ComponentSpec("text_encoder_2", "CLIPTextModelWithProjection", OPENCLIP_BIGG),
)
SD3 = (
    ComponentSpec("transformer", "SD3Transformer2DModel", SD3_TRANSFORMER),
    ComponentSpec("text_encoder", "CLIPTextModelWithProjection", CLIP_L),
    ComponentSpec("text_encoder_2", "CLIPTextModelWithProjection", OPENCLIP_BIGG),
    ComponentSpec("text_encoder_3", "T5EncoderModel", T5_XXL),
)
SD35_LARGE = (ComponentSpec("transformer", "SD3Transformer2DModel", SD35_LARGE_TRANSFORMER), *SD3[1:])
SD35_MEDIUM = (ComponentSpec("transformer", "SD3Transformer2DModel", SD35_MEDIUM_TRANSFORMER), *SD3[1:])
FLUX1 = (
    ComponentSpec("transformer", "FluxTransformer2DModel", FLUX_TRANSFORMER),
    ComponentSpec("text_encoder", "CLIPTextModel", CLIP_L),
    ComponentSpec("text_encoder_2", "T5EncoderModel", T5_XXL),
)
# FLUX.1 Fill [dev] / Depth and Canny [dev]: Flux.1-dev with a wider input layer (x_embedder, BFL img_in):
# Fill 64 noisy + 64 masked-image + 8·8·4 mask channels, Control 64 + 64 control-image channels
# (diffusers single_file_utils: img_in.weight.shape[1] 384 -> flux-fill, 128 -> flux-depth). Kontext = FLUX1.
FLUX1_FILL = (
    ComponentSpec("transformer", "FluxTransformer2DModel", frozen(**{**FLUX_TRANSFORMER, "in_channels": 384,
                                                                       "out_channels": 64})),
    *FLUX1[1:],
)
FLUX1_CONTROL = (
    ComponentSpec("transformer", "FluxTransformer2DModel", frozen(**{**FLUX_TRANSFORMER, "in_channels": 128,
                                                                       "out_channels": 64})),
    *FLUX1[1:],
)


# --- chroma ---
# Chroma1-HD (lodestones/Chroma1-HD): ChromaTransformer2DModel's defaults, which diffusers documents as that
# model's and which its single-file converter assumes (inner 3072, mlp ratio 4); T5-XXL as for Flux.1.
CHROMA_TRANSFORMER = frozen(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, axes_dims_rope=(16, 56, 56), approximator_num_channels=64,
    approximator_hidden_dim=5120, approximator_layers=5,
)
CHROMA = (
    ComponentSpec("transformer", "ChromaTransformer2DModel", CHROMA_TRANSFORMER),
    ComponentSpec("text_encoder", "T5EncoderModel", T5_XXL),
)


# --- flux3 ---
# No conversion script or hub config of a published Flux.3 is available to us: the transformer layout
# is Flux3Transformer2DModel's class defaults (its docstring describes the released model, whose default
# repositories are black-forest-labs/flux-3-image-klein(-base)); joint_attention_dim 20480 = 8 stacked
# hidden states of a 2560-wide Qwen3-VL, i.e. Qwen3-VL-4B, whose commonly published text config is below
# (nested configs are plain dicts: transformers' config classes type-check them).
FLUX3_TRANSFORMER = frozen(
    in_channels=128, cond_in_channels=128, num_layers=5, num_single_layers=28, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=20480, timestep_channels=256, mlp_ratio=3.0,
    axes_dims_rope=(32, 32, 32, 32), rope_theta=10000, eps=1e-6, flow_map=False,
)
QWEN3_VL_4B = frozen(
    text_config=dict(
        vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
        rope_parameters=dict(rope_type="default", rope_theta=5000000.0, mrope_section=[24, 20, 20],
                               mrope_interleaved=True),
    ),
    vision_config=dict(
        depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, patch_size=16, spatial_merge_size=2,
        temporal_patch_size=2, out_hidden_size=2560, num_position_embeddings=2304, deepstack_visual_indexes=[5, 11, 17],
    ),
    tie_word_embeddings=True,
)
FLUX3 = (
    ComponentSpec("transformer", "Flux3Transformer2DModel", FLUX3_TRANSFORMER),
    ComponentSpec("text_encoder", "Qwen3VLForConditionalGeneration", QWEN3_VL_4B),
)
# the step-distilled checkpoint: the same layout plus the flow-map target-timestep embedder
FLUX3_DISTILLED = (
    ComponentSpec("transformer", "Flux3Transformer2DModel", frozen(**{**FLUX3_TRANSFORMER, "flow_map": True})),
    ComponentSpec("text_encoder", "Qwen3VLForConditionalGeneration", QWEN3_VL_4B),
)

# Flux.2, from diffusers' scripts/convert_flux2_to_diffusers.py (get_flux2_transformer_config). The text
# encoders: Mistral Small 3.2 24B (dev), Qwen3 4B / 8B (Klein 4B / 9B); each joint_attention_dim is 3 × the
# encoder's hidden size, the three hidden layers the pipeline stacks.
FLUX2_DEV_TRANSFORMER = frozen(
    patch_size=1, in_channels=128, num_layers=8, num_single_layers=48, attention_head_dim=128, num_attention_heads=48,
    joint_attention_dim=15360, timestep_guidance_channels=256, mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32),
    rope_theta=2000, eps=1e-6, guidance_embeds=True,
)
FLUX2_KLEIN_4B_TRANSFORMER = frozen(
    **{**FLUX2_DEV_TRANSFORMER, "num_layers": 5, "num_single_layers": 20, "num_attention_heads": 24,
       "joint_attention_dim": 7680, "guidance_embeds": False}
)
FLUX2_KLEIN_9B_TRANSFORMER = frozen(
    **{**FLUX2_DEV_TRANSFORMER, "num_layers": 8, "num_single_layers": 24, "num_attention_heads": 32,
       "joint_attention_dim": 12288, "guidance_embeds": False}
)
MISTRAL_SMALL_3_2 = frozen(
    text_config=frozen(
        model_type="mistral", vocab_size=131072, hidden_size=5120, intermediate_size=32768, num_hidden_layers=40,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128,
    ),
    vision_config=frozen(
        model_type="pixtral", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        head_dim=64, image_size=1540, patch_size=14,
    ),
)
QWEN3_4B = frozen(
    vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
)
QWEN3_8B = frozen(
    vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
)
FLUX2_DEV = (
    ComponentSpec("transformer", "Flux2Transformer2DModel", FLUX2_DEV_TRANSFORMER),
    ComponentSpec("text_encoder", "Mistral3ForConditionalGeneration", MISTRAL_SMALL_3_2),
)
FLUX2_KLEIN_4B = (
    ComponentSpec("transformer", "Flux2Transformer2DModel", FLUX2_KLEIN_4B_TRANSFORMER),
    ComponentSpec("text_encoder", "Qwen3ForCausalLM", QWEN3_4B),
)
FLUX2_KLEIN_9B = (
    ComponentSpec("transformer", "Flux2Transformer2DModel", FLUX2_KLEIN_9B_TRANSFORMER),
    ComponentSpec("text_encoder", "Qwen3ForCausalLM", QWEN3_8B),
)
