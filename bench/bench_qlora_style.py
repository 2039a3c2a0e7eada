"""Measurement: a style LoRA trained on the float32 base vs on an nf4 and an int8 base (QLoRA), on the
embedded model ``shapes-sd15``.

The same config (``samples/train_style_<style>.toml``, only ``train.steps`` bounded and ``model.quantize``
changed) is trained three times in one run: on the float32 base, on the base with its UNet's linear layers
quantized to nf4 (bitsandbytes) and to int8 (torchao, weight-only). Each LoRA is then evaluated the way
``samples/demo.py`` measures a style (24 toy-world prompts, seed 1000, 20 steps, guidance 5, the style
distance of :mod:`diffusion_lora.metrics` to the style's training images) on the base it was trained on
AND on the float32 base (where a QLoRA file is meant to be used as well). The distance of each base
itself is measured too: nf4 changes the small embedded UNet a lot (about 20 % output error), so the share
of the style gap a LoRA closes is given relative to the base it is evaluated on:
``gap closed = 1 - distance(base + LoRA) / distance(base)``.

Training speed: the time of every optimizer step (a global optimizer step hook), median over the steps
after the first, as steps/s and as a ratio to the float32 run.

    python bench/bench_qlora_style.py                 # stripes, 150 steps: see bench/README.md for times
    python bench/bench_qlora_style.py --steps 500     # the sample config's full length
    python bench/bench_qlora_style.py --style pastel --out results.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"
BASES = ("float32", "nf4", "int8")


def train_one(style: str, base: str, steps: int, out: Path) -> tuple[Path, list[float], float]:
    """Train the style on ``base``; returns the adapter, the per-step seconds and the run's wall time."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    import diffusion_lora as dl

    stamps: list[float] = []
    handle = register_optimizer_step_pre_hook(lambda *_: stamps.append(time.perf_counter()))
    overrides = [f'data.path="{(SAMPLES / "datasets" / style).as_posix()}"', f'output.dir="{out.as_posix()}"',
                 f"train.steps={steps}"] + ([f"model.quantize={base}"] if base != "float32" else [])
    start = time.perf_counter()
    try:
        result = dl.train(SAMPLES / f"train_style_{style}.toml", overrides=overrides, progress=False)
    finally:
        handle.remove()
    wall = time.perf_counter() - start
    assert result.adapter is not None
    return result.adapter, [b - a for a, b in zip(stamps, stamps[1:])], wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--style", default="stripes", choices=("stripes", "pastel", "outline"))
    parser.add_argument("--steps", type=int, default=150, help="training steps of each run (config: 500)")
    parser.add_argument("--eval-steps", type=int, default=20, help="inference steps per image (the demo's: 20)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared machine a second thread mostly waits)")
    parser.add_argument("--out", help="also write the table (Markdown) to this file")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)

    from PIL import Image

    import diffusion_lora as dl
    from diffusion_lora.metrics import image_stats, style_distance
    from diffusion_lora.toy.demo import _SEED, _eval_prompts  # the demo's own evaluation set
    from diffusion_lora.toy.evaluate import generate

    reference = image_stats([Image.open(p) for p in sorted((SAMPLES / "datasets" / args.style).glob("*.png"))])
    prompts = _eval_prompts()

    def distance(pipe) -> float:
        return style_distance(generate(pipe, prompts, seed=_SEED, steps=args.eval_steps), reference).total

    with tempfile.TemporaryDirectory(prefix="bench_qlora_") as tmp:
        runs = {}
        for base in BASES:
            adapter, step_times, wall = train_one(args.style, base, args.steps, Path(tmp) / base)
            runs[base] = (adapter, statistics.median(step_times[1:] or step_times), wall)
            print(f"trained on {base}: {wall:.0f} s, median step {runs[base][1] * 1000:.0f} ms", flush=True)

        pipes = {}
        for base in BASES:
            pipes[base] = dl.load_pipeline("shapes-sd15", quantize=None if base == "float32" else base)
            pipes[base].set_progress_bar_config(disable=True)
        base_distance = {base: distance(pipe) for base, pipe in pipes.items()}
        rows = []
        for trained in BASES:
            for evaluated in dict.fromkeys((trained, "float32")):
                pipe = pipes[evaluated]
                dl.load_lora(pipe, runs[trained][0], name="style")
                with_lora = distance(pipe)
                dl.remove_lora(pipe, "style")
                rows.append((trained, evaluated, base_distance[evaluated], with_lora,
                             1.0 - with_lora / base_distance[evaluated]))

    step_fp32 = runs["float32"][1]
    lines = [
        f"style {args.style}, {args.steps} steps, {len(prompts)} prompts x {args.eval_steps} inference steps, "
        f"torch threads {torch.get_num_threads()}, "
        f"python {sys.version.split()[0]}",
        "",
        "| trained on | evaluated on | base distance | with LoRA | gap closed | steps/s (median) | vs float32 |",
        "|---|---|---|---|---|---|---|",
    ]
    for trained, evaluated, base_d, lora_d, closed in rows:
        step = runs[trained][1]
        lines.append(f"| {trained} | {evaluated} | {base_d:.3f} | {lora_d:.3f} | {closed:.0%} | {1 / step:.2f} | "
                     f"{step_fp32 / step:.2f}x |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
