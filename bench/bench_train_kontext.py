"""Benchmark: training steps per second on the tiny Flux.1 Kontext model from paired data (CPU, fp32).

Per-step time is the difference between a long and a short ``dl.train`` run on the same pairs (start-up,
model building and the first caching cancel out), taken as the median of ``--repeats`` pairs of runs.
Also runs tiny-flux (text-to-image, the same transformer without reference tokens) for comparison.

    python bench/bench_train_kontext.py [--threads 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import tempfile
import time
from pathlib import Path


def _pairs(root: Path) -> tuple[Path, Path]:
    script = Path(__file__).resolve().parents[1] / "samples" / "make_paired_dataset.py"
    spec = importlib.util.spec_from_file_location("make_paired_dataset", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write_pairs(root, count=4, size=64)


def _seconds(model: str, targets: Path, controls: Path | None, out: Path, steps: int) -> float:
    import diffusion_lora as dl

    data = {"path": str(targets), "resolution": 64, "min_bucket": 64, "max_bucket": 64, "bucket_step": 32}
    if controls is not None:
        data["control_path"] = str(controls)
    cfg = {"model": {"name": model}, "data": data, "lora": {"rank": 8},
           "train": {"steps": steps, "batch_size": 1, "learning_rate": 1e-3},
           "output": {"dir": str(out), "name": "bench"}, "log": {"tensorboard": False}}
    start = time.perf_counter()
    dl.train(cfg, progress=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--short", type=int, default=5)
    parser.add_argument("--long", type=int, default=25)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        targets, controls = _pairs(root / "pairs")
        for model, ctrl in (("tiny-flux-kontext", controls), ("tiny-flux", None)):
            _seconds(model, targets, ctrl, root / f"{model}-warm-up", args.short)  # first-use costs
            per_step = []
            for r in range(args.repeats):
                short = _seconds(model, targets, ctrl, root / f"{model}-s{r}", args.short)
                long = _seconds(model, targets, ctrl, root / f"{model}-l{r}", args.long)
                per_step.append((long - short) / (args.long - args.short))
            median = statistics.median(per_step)
            print(f"{model:18s} {1 / median:6.1f} steps/s  ({median * 1000:.0f} ms/step, 64x64, batch 1, rank 8, "
                  f"{args.threads} thread(s); runs: {', '.join(f'{s * 1000:.0f}' for s in per_step)} ms)")


if __name__ == "__main__":
    main()
