"""A user's own style on the embedded base, with the plain command: how much of the style gap closes.

    python bench/bench_user_styles.py [--seeds 0 1 2] [--model shapes-sd15] [--out out/user-styles]
                                      [--grid docs/images/user-styles.png]

For each held-out style set (samples/datasets/checker, faded, ink: never part of base training) and each
training seed it runs ``diffusion-lora train --data samples/datasets/<style> --out <out>/<style>/seed-N
--seed N`` (nothing else: the recipe comes from the model and the data), then generates 24 prompts with
the base, the LoRA at 0.5 and at 1.0 and prints, per seed and as the mean over seeds:

- the gap closed against the style set (1 - distance(LoRA) / distance(base)) and its ceiling (what the
  prompts drawn perfectly in the style would close: the set shows other shapes and colours);
- the gap closed against the content-matched reference (the same 24 prompts drawn in the style);
- how often the shape reader finds the prompt's shape (base, 1.0) and whether 0.5 lies between;
- the decoder's limit: the gap against the matched reference that a perfect LoRA closes (one that
  produces exactly the latents of the matched reference, which the VAE decodes into its own version).

One seed decides nothing on this model (the seed moves the gap by up to 30 points): run three or more.
``--decoder-grid PATH`` writes what the decoder makes of the matched references (reference | decoded, in
pairs); with ``--seeds`` and nothing after it, only that (no training, seconds).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusion_lora.models.loading import load_pipeline  # noqa: E402
from diffusion_lora.toy.evaluate import round_trip  # noqa: E402
from diffusion_lora.toy.styles import HELD_OUT_STYLES  # noqa: E402
from diffusion_lora.toy.user_style import learn_style, matched_references, style_prompts  # noqa: E402
from diffusion_lora.training.outputs import image_grid  # noqa: E402

SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "datasets"
CELL = 128


def _pct(values) -> str:
    return " · ".join(f"{v:.0%}" for v in values)


def decoder_grid(pipe, styles, path: str, per_row: int = 4) -> None:
    """Per style, the first matched references next to their VAE round trip (what a perfect LoRA yields)."""
    rows, labels = [], []
    for style in styles:
        refs = matched_references(style, style_prompts()[:per_row])
        cells = [im for pair in zip(refs, round_trip(pipe.vae, refs)) for im in pair]
        rows.append([c.convert("RGB").resize((CELL, CELL), Image.Resampling.NEAREST) for c in cells])
        labels.append(f"{style}: [matched reference | through the VAE] x {per_row}")
    image_grid(rows, labels).save(path)
    print(f"decoder grid: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shapes-sd15", help="the base (a model name or diffusers folder)")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--out", default="out/user-styles")
    parser.add_argument("--grid", default="", help="also write a comparison grid (first seed) here")
    parser.add_argument("--decoder-grid", default="", help="write the decoder's-limit picture here")
    parser.add_argument("--styles", nargs="*", default=list(HELD_OUT_STYLES))
    args = parser.parse_args()
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    if args.decoder_grid:
        decoder_grid(pipe, args.styles, args.decoder_grid)
    if not args.seeds:
        return
    extra = () if args.model == "shapes-sd15" else ("--model", args.model)
    print(f"model {args.model}, training seeds {args.seeds}, torch threads {torch.get_num_threads()}")
    print("| style | vs style set: gap per seed → mean (ceiling) | vs matched: gap per seed → mean "
          "(decoder's limit) | shape found base → 1.0 (mean) | 0.5 between (seeds) | time per seed |")
    print("|---|---|---|---|---|---|")
    rows, labels = [], []
    for style in args.styles:
        folder = SAMPLES / style
        start = time.perf_counter()
        r = learn_style(pipe, folder, Path(args.out) / style, seeds=tuple(args.seeds), extra_args=extra)
        took = (time.perf_counter() - start) / len(args.seeds)
        between = sum(run.distance["set"]["1.0"] < run.distance["set"]["0.5"] < run.distance["set"]["base"]
                      for run in r.runs)
        print(f"| {style} | {_pct(run.gap_closed('set') for run in r.runs)} → **{r.gap_closed('set'):.0%}** "
              f"({r.ceiling:.0%}) | {_pct(run.gap_closed('matched') for run in r.runs)} → "
              f"**{r.gap_closed('matched'):.0%}** ({r.decoder_ceiling:.0%}) | "
              f"{r.runs[0].shape['base']:.0%} → {r.shape('1.0'):.0%} | "
              f"{between} of {len(r.runs)} | {took:.0f} s |", flush=True)
        example = Image.open(sorted(folder.glob("*.png"))[0]).convert("RGB")
        first = r.runs[0].seed
        for i in range(2):
            cells = [example, r.images["base"][i], r.images[f"{first}:0.5"][i], r.images[f"{first}:1.0"][i]]
            rows.append([c.resize((CELL, CELL), Image.Resampling.NEAREST) for c in cells])
            labels.append(f"{style}: {r.prompts[i]}  [training image | base | 0.5 | 1.0]")
    if args.grid:
        image_grid(rows, labels).save(args.grid)
        print(f"grid: {args.grid}")


if __name__ == "__main__":
    main()
