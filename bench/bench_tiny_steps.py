"""Benchmark: training steps per second of the trainer on a built-in tiny model (CPU, fp32).

Per-step time is the difference between a long and a short run (start-up — imports, building the tiny
model, caching latents and text — cancels out), repeated; the median is reported.

    python bench/bench_tiny_steps.py --model tiny-flux3 [--steps 10] [--repeats 3] [--batch-size 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

import diffusion_lora as dl


def dataset(root: Path, n: int = 4, size: int = 64) -> Path:
    root.mkdir(parents=True)
    for i, colour in enumerate(("red", "blue", "green", "orange")[:n]):
        image = Image.new("RGB", (size, size), "white")
        ImageDraw.Draw(image).ellipse((8 + i, 8, size - 10, size - 8 - i), fill=colour)
        image.save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text(f"a {colour} circle, white background", encoding="utf-8")
    return root


def timed_run(model: str, data: Path, out: Path, steps: int, batch_size: int) -> float:
    cfg = {
        "model": {"name": model},
        "data": {"path": str(data), "resolution": 64, "min_bucket": 64, "max_bucket": 64},
        "lora": {"rank": 4},
        "train": {"steps": steps, "learning_rate": 1e-3, "batch_size": batch_size},
        "output": {"dir": str(out), "name": "bench"},
        "log": {"tensorboard": False},
    }
    start = time.perf_counter()
    dl.train(cfg, progress=False)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-flux3")
    parser.add_argument("--steps", type=int, default=10, help="extra steps of the long run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    per_step = []
    with tempfile.TemporaryDirectory() as tmp:
        data = dataset(Path(tmp) / "data")
        timed_run(args.model, data, Path(tmp) / "warm", 1, args.batch_size)  # lazy imports, first build
        for i in range(args.repeats):
            short = timed_run(args.model, data, Path(tmp) / f"s{i}", 1, args.batch_size)
            long = timed_run(args.model, data, Path(tmp) / f"l{i}", 1 + args.steps, args.batch_size)
            per_step.append((long - short) / args.steps)
    median = statistics.median(per_step)
    print(f"{args.model}: batch {args.batch_size}, 64x64, rank 4, 1 thread: {median * 1000:.1f} ms/step, "
          f"{1 / median:.1f} steps/s (median of {args.repeats}: {', '.join(f'{s * 1000:.1f}' for s in per_step)} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
