"""The embedded base model's architecture: Stable Diffusion 1.x components at toy size.

A standard SD1.x pipeline — AutoencoderKL, UNet2DConditionModel with cross-attention, a CLIP text
encoder and its BPE tokenizer — sized for 64×64 images: the VAE has a scale factor of 4 (16×16×4
latents) and the whole folder is a few MB. Built here with random weights; trained by
:mod:`diffusion_lora.toy.train_base`.
"""

from __future__ import annotations

import torch
import transformers
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel

from diffusion_lora.models.tokenizers import CLIP_BOS, CLIP_EOS, build_clip_tokenizer, clip_vocab_size

__all__ = [
    "BASE_MODEL_NAME", "WIDTH", "build_untrained_pipeline", "scheduler_config", "text_config", "unet_config",
    "vae_config",
]

BASE_MODEL_NAME = "shapes-sd15"
_TEXT_WIDTH = 64


WIDTH = 32  # channels of the first block of the shipped VAE and UNet (then 2×, 2×)


def _widths(width: int, groups: int, what: str) -> tuple[int, int, int]:
    if width < groups or width % groups:
        raise ValueError(f"{what} width {width}: expected a positive multiple of {groups} (its group norm's groups)")
    return (width, 2 * width, 2 * width)


def vae_config(width: int = WIDTH) -> dict:
    return dict(
        sample_size=64,
        in_channels=3,
        out_channels=3,
        block_out_channels=_widths(width, 16, "VAE"),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
    )


def unet_config(width: int = WIDTH) -> dict:
    groups = 32 if width % 32 == 0 else 16  # 32 as SD's UNet; 16 lets widths such as 48 divide
    return dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=_widths(width, groups, "UNet"),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=_TEXT_WIDTH,
        attention_head_dim=8,
        norm_num_groups=groups,
    )


def text_config() -> transformers.CLIPTextConfig:
    tokenizer = build_clip_tokenizer()
    return transformers.CLIPTextConfig(
        vocab_size=clip_vocab_size(),
        hidden_size=_TEXT_WIDTH,
        intermediate_size=4 * _TEXT_WIDTH,
        num_attention_heads=4,
        num_hidden_layers=3,
        projection_dim=_TEXT_WIDTH,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.convert_tokens_to_ids(CLIP_BOS),
        eos_token_id=tokenizer.convert_tokens_to_ids(CLIP_EOS),
        pad_token_id=tokenizer.convert_tokens_to_ids(CLIP_EOS),
    )


def scheduler_config() -> dict:
    """Stable Diffusion 1.x's noise schedule rescaled to zero terminal SNR, with v-prediction.

    Lin et al. (2023): with SD's own schedule, the last training step still holds ``sqrt(ᾱ) ≈ 7 %``
    of the image. These latents have a large per-image mean (the background), so the UNet learned
    to read the background from that leak, which pure sampling noise lacks: it ignored "on a black
    background" and drew muddy, textured backgrounds. Zero terminal SNR removes the leak, so the
    layout comes from the prompt; it needs v-prediction and trailing timesteps. Plain diffusers
    schedulers read all three keys.
    """
    return dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
        prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing",
    )


def build_untrained_pipeline(seed: int = 0, vae_width: int = WIDTH, unet_width: int = WIDTH
                             ) -> StableDiffusionPipeline:
    """The base pipeline with freshly initialised weights (``torch.manual_seed(seed)`` per component);
    the widths are the first block's channels (the shipped model: 32 and 32)."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(**vae_config(vae_width))
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(**unet_config(unet_width))
    torch.manual_seed(seed + 2)
    text_encoder = transformers.CLIPTextModel(text_config())
    return StableDiffusionPipeline(
        vae=vae,
        unet=unet,
        text_encoder=text_encoder,
        tokenizer=build_clip_tokenizer(),
        scheduler=DPMSolverMultistepScheduler(**scheduler_config()),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
