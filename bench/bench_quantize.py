"""Benchmark: quantized loading — load time and output error of each quantization against the float model.

For every built-in tiny model (random weights) and the embedded ``shapes-sd15`` (trained weights), for
each mode (nf4, int8, fp8 and a GGUF Q8_0 / Q4_0 denoiser file written from the same weights), the
pipeline is loaded with ``dl.load_pipeline(..., quantize=MODE)`` (GGUF: ``denoiser=FILE``) and its
denoiser's output is compared with the float model's on the same inputs: two denoising steps at the tiny
size (latents out), seed 0. The error is ``‖out_q − out_float‖ / ‖out_float‖`` on the final latents. Load
times are the median of ``--repeats`` loads, beside the float load in the same run (ratio printed).
Random tiny weights quantize worse than trained ones (nf4 especially); the embedded model shows trained
weights.

    python bench/bench_quantize.py [--repeats 3] [--models tiny-flux,shapes-sd15] [--modes nf4,int8]
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", help="comma-separated (default: every buildable tiny model and shapes-sd15)")
    parser.add_argument("--modes", default="nf4,int8,fp8,Q8_0,Q4_0")
    args = parser.parse_args()

    import torch

    import diffusion_lora as dl
    from diffusion_lora.models.tiny import missing_classes

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.gguf_files import write_gguf
    from tests.helpers import run

    torch.set_num_threads(1)
    models = args.models.split(",") if args.models else [
        *(k for k in dl.families.tiny_models() if not missing_classes(k)), "shapes-sd15"]
    modes = args.modes.split(",")
    print("| model | mode | load s (median) | float load s | ratio | output rel. error vs float |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            def timed_load(**kwargs):
                times, pipe = [], None
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    pipe = dl.load_pipeline(name, **kwargs)
                    times.append(time.perf_counter() - start)
                pipe.set_progress_bar_config(disable=True)
                return statistics.median(times), pipe

            float_s, base = timed_load()
            ref = run(base)
            denoiser = getattr(base, "transformer", None) or base.unet
            for mode in modes:
                try:
                    if mode.startswith("Q"):
                        path = Path(tmp, f"{name}-{mode}.gguf")
                        write_gguf(denoiser, path, mode)
                        seconds, pipe = timed_load(denoiser=path)
                    else:
                        seconds, pipe = timed_load(quantize=mode)
                    out = run(pipe)
                except Exception as exc:  # a row that fails is reported, the others still run
                    print(f"| {name} | {mode} | fails: {type(exc).__name__}: {str(exc).splitlines()[0][:120]} | | | |")
                    continue
                err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                print(f"| {name} | {mode} | {seconds:.3f} | {float_s:.3f} | {seconds / float_s:.2f} | {err:.4f} |",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
