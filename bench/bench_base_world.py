"""How open the embedded base model's world is: VAE reconstruction per picture family and prompt following.

    python bench/bench_base_world.py                        # the shipped shapes-sd15
    python bench/bench_base_world.py --model OLD --model NEW --prompts

Reconstruction: 64 pictures per row (fixed seeds), encoded to the posterior mean and decoded; mean
absolute error (0–255 levels per channel) and PSNR. Rows: the toy scenes in each base style, the
families held out of base training (never seen by the VAE), and the training families. With
``--prompts``: held-out prompt following (100 combos never trained on, 20 steps, guidance 5) for the
full caption template and for short prompts ("a blue circle").
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusion_lora.models.loading import load_pipeline  # noqa: E402
from diffusion_lora.toy import scenes, styles, world  # noqa: E402
from diffusion_lora.toy.evaluate import prompt_following, reconstruction, short_caption  # noqa: E402


def scene_set(style: str, count: int = 64) -> list[Image.Image]:
    rng = random.Random(f"bench-{style}")
    return [scenes.render(scenes.random_scene(rng, style=style)) for _ in range(count)]


def family_set(family: str, count: int = 64) -> list[Image.Image]:
    if family in world.HELD_OUT_FAMILIES:
        return world.held_out_images(family, count)
    rng = np.random.default_rng([99, world.TRAINING_FAMILIES.index(family)])
    return [Image.fromarray(world.render_family(family, rng, jitter=True)[0]) for _ in range(count)]


def rows() -> list[tuple[str, str, list[Image.Image]]]:
    out = [("toy scenes", style, scene_set(style)) for style in styles.STYLES]
    out += [("held-out style", style, scene_set(style)) for style in styles.HELD_OUT_STYLES]
    families = [f for f in world.HELD_OUT_FAMILIES if f != "held-out photos" or world.photos_available()]
    out += [("held-out family", f, family_set(f)) for f in families]
    train = [f for f in world.TRAINING_FAMILIES if f != "photos" or world.photos_available()]
    out += [("training family", f, family_set(f)) for f in train]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="model folder or name (repeatable; default shapes-sd15)")
    parser.add_argument("--prompts", action="store_true", help="also measure held-out prompt following")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = args.model or ["shapes-sd15"]
    pipes = [load_pipeline(m) for m in models]
    for p in pipes:
        p.set_progress_bar_config(disable=True)
    head = " | ".join(f"{Path(m).name} MAE · PSNR" for m in models)
    print(f"| kind | set | {head} |")
    print("|---|---|" + "---|" * len(models))
    for kind, name, images in rows():
        cells = []
        for p in pipes:
            r = reconstruction(p.vae, images)
            cells.append(f"{r.mae:.1f} · {r.psnr:.1f} dB")
        print(f"| {kind} | {name} | " + " | ".join(cells) + " |", flush=True)
    if args.prompts:
        combos = scenes.held_out_combos()
        for m, p in zip(models, pipes):
            for label, caption in (("full template", None), ("short prompt", short_caption)):
                kwargs = {"caption": caption} if caption else {}
                s = prompt_following(p, combos, seed=0, steps=20, guidance=5.0, **kwargs)
                print(f"{Path(m).name} {label}: colour {s.colour:.0%}, shape {s.shape:.0%}", flush=True)


if __name__ == "__main__":
    main()
