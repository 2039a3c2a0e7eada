"""Write a small paired (editing) dataset for Flux.1 Kontext LoRA training, offline and deterministic.

Each pair is a control image (grey shapes on white: the image to edit) and a target image (the same
shapes, recoloured: the edit), with the edit instruction as the target's caption:

    data/kontext_pairs/targets/pair_000.png  + pair_000.txt ("make the shapes red")
    data/kontext_pairs/controls/pair_000.png

Run:  python samples/make_paired_dataset.py [folder] [--count N] [--size PX]
Then: diffusion-lora train samples/train_flux_kontext.toml
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "blue": (40, 70, 220), "green": (40, 170, 70), "orange": (240, 150, 30)}


def write_pairs(root: Path, count: int = 12, size: int = 512, seed: int = 0) -> tuple[Path, Path]:
    """Write ``count`` pairs under ``root``; returns (targets folder, controls folder)."""
    targets, controls = root / "targets", root / "controls"
    targets.mkdir(parents=True, exist_ok=True)
    controls.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    names = sorted(COLOURS)
    for i in range(count):
        colour = names[i % len(names)]
        control = Image.new("RGB", (size, size), "white")
        target = Image.new("RGB", (size, size), "white")
        for _ in range(rng.randint(1, 3)):
            x0, y0 = rng.randint(0, size // 2), rng.randint(0, size // 2)
            box = (x0, y0, x0 + rng.randint(size // 6, size // 2), y0 + rng.randint(size // 6, size // 2))
            shape = rng.choice(("ellipse", "rectangle"))
            getattr(ImageDraw.Draw(control), shape)(box, fill=(128, 128, 128))
            getattr(ImageDraw.Draw(target), shape)(box, fill=COLOURS[colour])
        control.save(controls / f"pair_{i:03d}.png")
        target.save(targets / f"pair_{i:03d}.png")
        (targets / f"pair_{i:03d}.txt").write_text(f"make the shapes {colour}", encoding="utf-8")
    return targets, controls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", default="data/kontext_pairs")
    parser.add_argument("--count", type=int, default=12)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    targets, controls = write_pairs(Path(args.folder), args.count, args.size)
    print(f"targets: {targets}\ncontrols: {controls}")


if __name__ == "__main__":
    main()
