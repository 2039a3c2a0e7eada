"""Benchmark: training steps per second of ``dl.train`` on the tiny Flux.2 models (dev and Klein).

Per-step time is the difference between a long and a short run (same data, same config), divided by the
step difference, so start-up, model building and the first epoch's latent/text caching cancel out; the
median of ``--repeats`` pairs is reported. 64×64 images, batch 1, rank 4, float32, CPU, one thread.

    python bench/bench_train_flux2.py [--repeats 3] [--short 4] [--long 12]
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
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def make_images(folder: Path, n: int = 4) -> Path:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i, colour in enumerate(("red", "blue", "green", "orange")[:n]):
        image = Image.new("RGB", (64, 64), "white")
        ImageDraw.Draw(image).ellipse((8 + i, 8, 54, 56 - i), fill=colour)
        image.save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a {colour} circle, white background", encoding="utf-8")
    return folder


def seconds(model: str, data: Path, out: Path, steps: int) -> float:
    import diffusion_lora as dl

    cfg = {
        "model": {"name": model},
        "data": {"path": str(data), "resolution": 64, "min_bucket": 64, "max_bucket": 64},
        "lora": {"rank": 4},
        "train": {"steps": steps, "batch_size": 1, "learning_rate": 1e-4},
        "output": {"dir": str(out), "name": "bench"},
        "log": {"tensorboard": False},
    }
    start = time.perf_counter()
    dl.train(cfg, progress=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--short", type=int, default=4)
    parser.add_argument("--long", type=int, default=12)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        data = make_images(Path(tmp) / "data")
        for model in ("tiny-flux2", "tiny-flux2-klein"):
            per_step = []
            for r in range(args.repeats):
                short = seconds(model, data, Path(tmp) / f"{model}-s{r}", args.short)
                long = seconds(model, data, Path(tmp) / f"{model}-l{r}", args.long)
                per_step.append((long - short) / (args.long - args.short))
            median = statistics.median(per_step)
            print(f"{model}: {median * 1000:.0f} ms/step, {1 / median:.1f} steps/s "
                  f"(pairs: {', '.join(f'{s * 1000:.0f}' for s in per_step)} ms; load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
