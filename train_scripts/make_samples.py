"""Write the sample LoRA datasets into samples/datasets/ (20 images + captions each).

    python train_scripts/make_samples.py [--out samples/datasets]

Deterministic: rerunning rewrites byte-identical files. Three styles the embedded base model never
draws (outline, stripes, pastel), three more that are also kept out of its training altogether
(checker, faded, ink: stand-ins for a user's own style) and one character (the mascot "zorbo").
"""

from __future__ import annotations

import argparse
from pathlib import Path

from diffusion_lora.toy.datasets import SAMPLE_SETS, character_scenes, style_scenes, write_set


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="samples/datasets")
    args = parser.parse_args()
    for name, (kind, style) in SAMPLE_SETS.items():
        items = character_scenes() if kind == "character" else style_scenes(style)
        paths = write_set(Path(args.out) / name, items)
        print(f"{name}: {len(paths)} images in {Path(args.out) / name}")


if __name__ == "__main__":
    main()
