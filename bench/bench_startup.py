"""Start-up time of the command line and of `import diffusion_lora`, against what a CLI that imports its
stack at the top pays (`import torch, diffusers, transformers, peft`, as sd-scripts' and most trainers'
entry points do).

Each row starts a fresh interpreter; the rows are interleaved, so a busy machine slows them all alike.

    python bench/bench_startup.py [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

ROWS = {
    "diffusion-lora --help": [sys.executable, "-m", "diffusion_lora.cli", "--help"],
    "import diffusion_lora": [sys.executable, "-c", "import diffusion_lora"],
    "import torch, diffusers, transformers, peft": [
        sys.executable, "-c", "import torch, diffusers, transformers, peft",
    ],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    times: dict[str, list[float]] = {name: [] for name in ROWS}
    for _ in range(args.runs):
        for name, command in ROWS.items():
            start = time.perf_counter()
            subprocess.run(command, env=env, stdout=subprocess.DEVNULL, check=True)
            times[name].append(time.perf_counter() - start)
    heavy = statistics.median(times["import torch, diffusers, transformers, peft"])
    print(f"{'row':45s} {'median':>9s}  {'vs the heavy import':>20s}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:45s} {median:8.3f}s  {heavy / median:19.1f}x")


if __name__ == "__main__":
    main()
