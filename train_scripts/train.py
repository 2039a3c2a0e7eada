"""Train a LoRA: a thin wrapper over ``diffusion_lora.training`` for people who prefer scripts.

    python train_scripts/train.py samples/train_style_sd15.toml --set train.steps=100
    accelerate launch --multi_gpu --num_processes 2 train_scripts/train.py CONFIG   # data parallel

Same flags as ``diffusion-lora train``.
"""

import sys

from diffusion_lora.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
