"""Save a built-in tiny pipeline as a standard diffusers folder.

    python train_scripts/export_tiny.py tiny-sdxl models/tiny-sdxl

The folder loads with ``DiffusionPipeline.from_pretrained`` (and ``--model models/tiny-sdxl``), which is
how benchmarks hand the same model to diffusers' own scripts.
"""

from __future__ import annotations

import argparse

from diffusion_lora.models import TINY_MODELS, build_tiny_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=TINY_MODELS)
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    build_tiny_pipeline(args.kind, seed=args.seed).save_pretrained(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
