"""Benchmark: training steps per second of ``dl.train`` on the tiny Flux.2 models (dev and Klein).

A step's time is the time between two consecutive calls of the transformer's forward (one per step at
batch 1, no sampling), recorded by a forward pre-hook put on the pipeline the trainer loads; the median
over the steps after the first epoch (whose latent and text caching is start-up) is reported. 64×64
images, batch 1, rank 4, float32, CPU, one thread.

    python bench/bench_train_flux2.py [--steps 24]
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


def step_seconds(model: str, data: Path, out: Path, steps: int) -> list[float]:
    import diffusion_lora as dl
    from diffusion_lora.training import trainer

    stamps: list[float] = []
    real_load = trainer.load_pipeline

    def load_and_time(*args, **kwargs):
        pipe = real_load(*args, **kwargs)
        pipe.transformer.register_forward_pre_hook(lambda *_: stamps.append(time.perf_counter()))
        return pipe

    cfg = {
        "model": {"name": model},
        "data": {"path": str(data), "resolution": 64, "min_bucket": 64, "max_bucket": 64},
        "lora": {"rank": 4},
        "train": {"steps": steps, "batch_size": 1, "learning_rate": 1e-4},
        "output": {"dir": str(out), "name": "bench"},
        "log": {"tensorboard": False},
    }
    trainer.load_pipeline = load_and_time
    try:
        dl.train(cfg, progress=False)
    finally:
        trainer.load_pipeline = real_load
    return [b - a for a, b in zip(stamps, stamps[1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        data = make_images(Path(tmp) / "data")
        for model in ("tiny-flux2", "tiny-flux2-klein"):
            steps = step_seconds(model, data, Path(tmp) / model, args.steps)[4:]  # after the first epoch (4 images)
            median = statistics.median(steps)
            print(f"{model}: median {median * 1000:.0f} ms/step = {1 / median:.1f} steps/s over {len(steps)} steps "
                  f"(min {min(steps) * 1000:.0f} ms; load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
