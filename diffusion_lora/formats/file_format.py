"""The adapter file formats diffusion_lora reads and writes, as a closed set (no torch needed to name them)."""

from __future__ import annotations

import enum


class FileFormat(str, enum.Enum):
    """Key layouts diffusion_lora reads; the value is the name the CLI and metadata use."""

    DIFFUSERS = "diffusers"  # also bare PEFT and older diffusers keys
    KOHYA = "kohya"  # kohya / A1111 (lora_unet_…, lora_te_…)
    COMFYUI = "comfyui"  # diffusion_model. / text_encoders. prefixes
