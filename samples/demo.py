"""The demo of the README: a style LoRA and a character LoRA trained on the embedded base, on CPU.

    python samples/demo.py [--style stripes|outline|pastel] [--out out/demo]

Trains samples/train_style_<style>.toml and samples/train_character_zorbo.toml on the embedded
shapes-sd15 model (about a minute each on 2 CPU cores), then writes out/demo/comparison.png (base /
style at weight 0.5 / 1.0) and out/demo/stacked.png (base / character / character + style), and
prints how far each column is from the style in the style metric, and how often the mascot appears.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from diffusion_lora.toy.demo import run_demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--style", default="stripes", choices=("stripes", "outline", "pastel"))
    parser.add_argument("--out", default="out/demo")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    start = time.perf_counter()
    result = run_demo(Path(__file__).resolve().parent, Path(args.out), style=args.style)
    print(f"\nstyle distance to samples/datasets/{args.style} (0 = same look; diffusion_lora.metrics):")
    for column, value in result.distance.items():
        closed = f"   closes {result.gap_closed(column):.0%} of the gap" if column != "base" else ""
        print(f"  {column:<22} {value:.3f}{closed}")
    print("mascot drawn for 'zorbo, ...' prompts:")
    for column, rate in result.mascot.items():
        print(f"  {column:<22} {rate:.0%}")
    print(f"\n{result.comparison}\n{result.stacked}\nadapters: {result.style_adapter}, {result.character_adapter}")
    print(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
