"""Benchmark: training speed of every family's tiny model through the same trainer.

For each built-in tiny model (every family and variant in the registry) the trainer runs twice on
the same 4 images at 32×32, batch 1, rank 4 — a short and a long run — and the per-step time is
the difference divided by the extra steps, so start-up (building the model, caching latents and
captions) cancels out. The long and short runs of all models are interleaved, and each pair is
repeated; the table gives the median. Numbers are for the tiny models only (random weights, a few
hundred thousand parameters): they show that every family's training path runs and what it costs
on this machine, not real-model speed.

Flux.1 Kontext and Control train from pairs (``samples/make_paired_dataset.py``: a control image
beside each target), Fill from random box masks, as their configs would.

    python bench/bench_families.py [--repeats 3] [--short 2] [--long 12] [--models tiny-flux2,tiny-sd15]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def make_images(folder: Path, n: int = 4, size: int = 32) -> Path:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    colours = ("red", "blue", "green", "orange")
    for i in range(n):
        image = Image.new("RGB", (size, size), "white")
        ImageDraw.Draw(image).ellipse((4 + i, 4, size - 6, size - 4 - i), fill=colours[i % 4])
        image.save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a {colours[i % 4]} circle", encoding="utf-8")
    return folder


def make_pairs(root: Path) -> tuple[Path, Path]:
    """(targets, controls) folders from the sample script that writes paired data."""
    script = Path(__file__).resolve().parents[1] / "samples" / "make_paired_dataset.py"
    spec = importlib.util.spec_from_file_location("make_paired_dataset", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write_pairs(root, count=4, size=32)


def needs_pairs(model: str) -> bool:
    from diffusion_lora.families import Conditioning, tiny_models

    return tiny_models()[model][1].conditioning in (Conditioning.FLUX_KONTEXT, Conditioning.FLUX_CONTROL)


def timed_run(model: str, data: Path, out: Path, steps: int, controls: Path | None = None) -> float:
    import diffusion_lora as dl

    cfg = {
        "model": {"name": model},
        "data": {"path": str(data), "resolution": 32, "min_bucket": 32, "max_bucket": 32, "bucket_step": 32,
                 **({"control_path": str(controls)} if controls else {})},
        "lora": {"rank": 4},
        "train": {"steps": steps, "learning_rate": 1e-4, "batch_size": 1},
        "output": {"dir": str(out), "name": "bench"},
        "log": {"tensorboard": False},
    }
    start = time.perf_counter()
    dl.train(cfg, progress=False)
    return time.perf_counter() - start


def main() -> None:
    import torch

    import diffusion_lora as dl

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--short", type=int, default=2)
    parser.add_argument("--long", type=int, default=12)
    parser.add_argument("--models", default=",".join(dl.TINY_MODELS))
    args = parser.parse_args()
    models = [m for m in args.models.split(",") if m]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    per_step: dict[str, list[float]] = {m: [] for m in models}
    with tempfile.TemporaryDirectory() as tmp:
        plain = make_images(Path(tmp) / "data")
        targets, controls = make_pairs(Path(tmp) / "pairs")
        inputs = {m: (targets, controls) if needs_pairs(m) else (plain, None) for m in models}
        for m in models:  # warm-up: imports, first builds
            timed_run(m, inputs[m][0], Path(tmp) / "warm" / m, 1, inputs[m][1])
        for r in range(args.repeats):
            for m in models:
                short = timed_run(m, inputs[m][0], Path(tmp) / f"s{r}" / m, args.short, inputs[m][1])
                long = timed_run(m, inputs[m][0], Path(tmp) / f"l{r}" / m, args.long, inputs[m][1])
                per_step[m].append((long - short) / (args.long - args.short))
    print(f"\n| tiny model | family / variant | s/step (median of {args.repeats}) | steps/s |")
    print("|---|---|---|---|")
    for m in models:
        family, variant = dl.families.tiny_models()[m]
        s = statistics.median(per_step[m])
        print(f"| `{m}` | {family.name} / {variant.name} | {s:.3f} | {1 / s:.1f} |")


if __name__ == "__main__":
    main()
