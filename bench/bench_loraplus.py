"""Benchmark: how many steps LoRA+ saves on the embedded demo style (not a test).

Trains ``samples/train_style_<style>.toml`` on ``shapes-sd15`` once per LoRA+ ratio (ratio 1 = the
up factors at the same rate as the down factors, i.e. plain LoRA; ``optimizer.loraplus_lr_ratio`` set
anyway so both runs have the same two optimizer groups), saving a checkpoint every ``--every`` steps
(the first ratio's run is scored only every ``--ref-every``). Each checkpoint's adapter is put into
the pipeline and scored as the demo scores it: the style distance of images for the demo's evaluation
prompts to the style's training images, as the share of the base's distance it closes (``gap``:
0 = base, 1 = as close as the training set). The table gives the gap per ratio and step, and for each
ratio the first step whose gap reaches what the first ratio reaches at its last step.

    python bench/bench_loraplus.py          # ratios 1 and 16, 500 steps, 24 prompts
    python bench/bench_loraplus.py --ratios 1,4,16 --out results.md

The gap curve is one seed's: differences of a few points between neighbouring checkpoints are noise.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusion_lora.adapters import add_lora  # noqa: E402
from diffusion_lora.adapters.state import state_of  # noqa: E402
from diffusion_lora.metrics import image_stats, style_distance  # noqa: E402
from diffusion_lora.models.loading import load_pipeline  # noqa: E402
from diffusion_lora.toy import demo  # noqa: E402
from diffusion_lora.toy.evaluate import generate  # noqa: E402
from diffusion_lora.training.checkpoint import STATE  # noqa: E402
from diffusion_lora.training.config import load_config  # noqa: E402
from diffusion_lora.training.optimizers import trainable_parameters  # noqa: E402
from diffusion_lora.training.trainer import train  # noqa: E402


def train_run(style: str, ratio: float, steps: int, every: int, out: Path, lr: float | None
              ) -> tuple[dict[int, Path], float]:
    """Checkpoint folders by step (the last one is the final state) and the run's seconds."""
    overrides = [f"train.learning_rate={lr}"] if lr is not None else []
    overrides += [f'data.path="{(ROOT / "samples" / "datasets" / style).as_posix()}"',
                 f'output.dir="{out.as_posix()}"', f"train.steps={steps}", f"checkpoint.every={every}",
                 f"checkpoint.keep={steps // every + 1}", f"optimizer.loraplus_lr_ratio={ratio}"]
    start = time.perf_counter()
    train(ROOT / "samples" / f"train_style_{style}.toml", overrides=overrides, progress=False)
    seconds = time.perf_counter() - start
    found = {int(p.name.split("-")[1]): p for p in (out / "checkpoints").glob("checkpoint-*") if (p / STATE).is_file()}
    return dict(sorted(found.items())), seconds


def score(pipe, prompts: list[str], reference, base: float) -> tuple[float, float]:
    """(style distance, share of the base's distance closed) of ``pipe``'s images for ``prompts``."""
    distance = style_distance(generate(pipe, prompts, seed=demo._SEED), reference).total
    return distance, 1.0 - distance / base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--style", default="stripes")
    ap.add_argument("--ratios", default="1,16", help="comma-separated LoRA+ ratios; the first is the reference")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--ref-every", type=int, default=100, help="score the first ratio's run only every N steps")
    ap.add_argument("--prompts", type=int, default=24, help="evaluation prompts (the demo's 24)")
    ap.add_argument("--lr", type=float, help="train.learning_rate of every run (default: the sample's)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a busy shared machine two threads wait on each other, "
                    "measured 20x slower per step)")
    ap.add_argument("--out", type=Path, help="also write the table (markdown) here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ratios = [float(r) for r in args.ratios.split(",")]
    cfg = load_config(ROOT / "samples" / f"train_style_{args.style}.toml")
    prompts = demo._eval_prompts()[: args.prompts]
    images = sorted((ROOT / "samples" / "datasets" / args.style).glob("*.png"))
    reference = image_stats([Image.open(p) for p in images])

    pipe = load_pipeline("shapes-sd15")
    pipe.set_progress_bar_config(disable=True)
    base = style_distance(generate(pipe, prompts, seed=demo._SEED), reference).total
    add_lora(pipe, cfg.output.name, rank=cfg.lora.rank, alpha=cfg.lora.effective_alpha, targets=cfg.lora.targets)
    params = dict(trainable_parameters(state_of(pipe)))
    lr = args.lr or cfg.train.learning_rate
    print(f"style {args.style}: base distance {base:.4f}, {len(prompts)} prompts, lr {lr}, "
          f"batch {cfg.train.batch_size}, torch threads {torch.get_num_threads()}", flush=True)

    gaps: dict[float, dict[int, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_loraplus_") as tmp:
        for ratio in ratios:
            found, seconds = train_run(args.style, ratio, args.steps, args.every, Path(tmp) / f"r{ratio:g}", args.lr)
            gaps[ratio] = {}
            for step, folder in found.items():
                if ratio == ratios[0] and step % args.ref_every and step != args.steps:
                    continue
                saved = torch.load(folder / STATE, map_location="cpu", weights_only=False)["params"]
                with torch.no_grad():
                    for name, tensor in saved.items():
                        params[name].copy_(tensor)
                distance, gap = score(pipe, prompts, reference, base)
                gaps[ratio][step] = gap
                print(f"ratio {ratio:g} step {step}: distance {distance:.4f} gap {gap:.3f}", flush=True)
            print(f"ratio {ratio:g}: trained {args.steps} steps in {seconds:.0f} s", flush=True)

    steps = sorted(set().union(*(gaps[r] for r in ratios)))
    target = gaps[ratios[0]][args.steps]
    lines = ["| step | " + " | ".join(f"gap, ratio {r:g}" for r in ratios) + " |",
             "|---|" + "---|" * len(ratios)]
    lines += [f"| {s} | " + " | ".join(f"{gaps[r][s]:.3f}" if s in gaps[r] else "" for r in ratios) + " |"
              for s in steps]
    lines.append("")
    for r in ratios:
        reached = next((s for s in sorted(gaps[r]) if gaps[r][s] >= target), None)
        lines.append(f"ratio {r:g}: first step with gap >= {target:.3f} (ratio {ratios[0]:g} at step {args.steps}): "
                     f"{reached if reached is not None else 'not reached'}; best gap {max(gaps[r].values()):.3f} "
                     f"at step {max(gaps[r], key=gaps[r].get)}")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
