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

Training speed, two ways: the median step of each training run (a global optimizer step hook; the runs
follow one another, so a shared machine's load can differ between them), and one LoRA training step
(forward, backward, AdamW at the config's batch, rank and targets) of each base's UNet, the bases taking
turns round after round, as a ratio to float32 (median of the per-round ratios).

    python bench/bench_qlora_style.py                 # stripes, 120 steps: 6.6 min on 2 shared cores (load 6-8)
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


def interleaved_steps(pipes: dict, style: str, rounds: int) -> dict[str, list[float]]:
    """Seconds of one LoRA training step (forward, backward, AdamW) of each base's UNet at the config's
    batch, rank and targets, the bases taking turns in a rotating order round after round, so a slow
    period of the shared machine hits them alike. The LoRA is removed again afterwards."""
    import torch

    import diffusion_lora as dl

    cfg = dl.load_config(SAMPLES / f"train_style_{style}.toml", [f'data.path="{SAMPLES / "datasets" / style}"'])
    steps: dict[str, tuple] = {}
    for base, pipe in pipes.items():
        dl.add_lora(pipe, "speed", rank=cfg.lora.rank, alpha=cfg.lora.effective_alpha, targets=cfg.lora.targets)
        params = [p for p in pipe.unet.parameters() if p.requires_grad]
        for p in params:
            p.data = p.data.float()
        generator = torch.Generator().manual_seed(0)
        side = cfg.data.resolution // pipe.vae_scale_factor
        latents = torch.randn(cfg.train.batch_size, 4, side, side, generator=generator)
        text = torch.randn(cfg.train.batch_size, 77, pipe.unet.config.cross_attention_dim, generator=generator)
        steps[base] = (pipe.unet, torch.optim.AdamW(params, lr=1e-4), latents, text)
    times: dict[str, list[float]] = {base: [] for base in pipes}
    order = list(pipes)
    for r in range(rounds + 1):  # round 0 warms up
        for base in order[r % len(order):] + order[:r % len(order)]:
            unet, optimizer, latents, text = steps[base]
            start = time.perf_counter()
            out = unet(latents, 500, encoder_hidden_states=text).sample
            torch.nn.functional.mse_loss(out.float(), latents).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if r:
                times[base].append(time.perf_counter() - start)
    for pipe in pipes.values():
        dl.remove_lora(pipe, "speed")
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--style", default="stripes", choices=("stripes", "pastel", "outline"))
    parser.add_argument("--steps", type=int, default=120, help="training steps of each run (config: 500)")
    parser.add_argument("--eval-steps", type=int, default=20, help="inference steps per image (the demo's: 20)")
    parser.add_argument("--rounds", type=int, default=10, help="rounds of the interleaved step timing")
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
        times = interleaved_steps(pipes, args.style, args.rounds)

    lines = [
        f"style {args.style}, {args.steps} steps, {len(prompts)} prompts x {args.eval_steps} inference steps, "
        f"torch threads {torch.get_num_threads()}, python {sys.version.split()[0]}",
        "",
        "| trained on | evaluated on | base distance | with LoRA | gap closed |",
        "|---|---|---|---|---|",
    ]
    for trained, evaluated, base_d, lora_d, closed in rows:
        lines.append(f"| {trained} | {evaluated} | {base_d:.3f} | {lora_d:.3f} | {closed:.0%} |")
    lines += [
        "",
        f"Training speed. Run: median step of each training run above (runs one after another, so the machine's "
        f"load differs between them). Interleaved: median of {args.rounds} forward+backward+AdamW steps per base, "
        "the bases taking turns; the ratio is the median of the per-round ratios to float32.",
        "",
        "| base | run: steps/s | interleaved: steps/s | interleaved: time vs float32 |",
        "|---|---|---|---|",
    ]
    for base in BASES:
        ratio = statistics.median(b / f for b, f in zip(times[base], times["float32"], strict=True))
        lines.append(f"| {base} | {1 / runs[base][1]:.2f} | {1 / statistics.median(times[base]):.2f} | "
                     f"{ratio:.2f}x |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
