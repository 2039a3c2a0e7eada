"""Benchmark: our trainer vs diffusers' official `examples/text_to_image/train_text_to_image_lora.py`.

Both train the same SD-architecture model (saved to a local folder), on the same images, at the same
resolution, batch size, rank, learning rate and precision (fp32, CPU), in one run. Per-step time is
measured as the difference between a long and a short run of each trainer, so start-up (imports,
model loading, caching) cancels out; peak memory is the process's max RSS.

The diffusers script is not part of this project: pass its path (e.g. from a clone of diffusers).
It needs `datasets` and `torchvision`, which do not import beside this machine's CPU torch build,
so run this benchmark from an environment that has them (see bench/README.md):

    python bench/bench_train.py --diffusers-script /path/to/train_text_to_image_lora.py [--model small]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SMALL_UNET = {  # SD1.5's layout at a quarter of the width: big enough that per-step work dominates
    "block_out_channels": (64, 128, 256, 256), "layers_per_block": 2, "cross_attention_dim": 32,
    "attention_head_dim": 8, "sample_size": 16,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
}  # fmt: skip


SD15_VAE = {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "latent_channels": 4,
            "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
            "sample_size": 512}  # fmt: skip


def make_model(kind: str, folder: Path) -> Path:
    """tiny: tiny-sd15. small: a quarter-width SD1.5 UNet with tiny-sd15's VAE and CLIP.
    sd15-io: the same small UNet behind SD1.5's real-size VAE and CLIP-L text encoder (random weights),
    so encoding images and captions costs what it costs in real training."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    import diffusion_lora as dl

    pipe = dl.build_tiny_pipeline("tiny-sd15")
    torch.manual_seed(0)
    if kind in ("small", "sd15-io"):
        unet = UNet2DConditionModel(**{**SMALL_UNET, "cross_attention_dim": 768 if kind == "sd15-io" else 32})
        pipe.register_modules(unet=unet)
    if kind == "sd15-io":
        from transformers import CLIPTextConfig, CLIPTextModel

        from diffusion_lora.families.published import CLIP_L

        vocab = pipe.text_encoder.config.vocab_size
        special = {k: getattr(pipe.text_encoder.config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L, vocab_size=vocab, max_position_embeddings=77, **special))
        pipe.register_modules(vae=AutoencoderKL(**SD15_VAE), text_encoder=text_encoder)
    pipe.save_pretrained(folder)
    return folder


def make_images(folder: Path, n: int, size: int) -> Path:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    colours = ("red", "blue", "green", "orange", "purple")
    with open(folder / "metadata.jsonl", "w", encoding="utf-8") as meta:
        for i in range(n):
            image = Image.new("RGB", (size, size), "white")
            colour = colours[i % len(colours)]
            ImageDraw.Draw(image).ellipse((4 + i % 7, 4, size - 6, size - 4 - i % 5), fill=colour)
            image.save(folder / f"img{i:03d}.png")
            (folder / f"img{i:03d}.txt").write_text(f"a {colour} circle", encoding="utf-8")
            meta.write(json.dumps({"file_name": f"img{i:03d}.png", "text": f"a {colour} circle"}) + "\n")
    return folder


_MEASURE = (
    "import resource, subprocess, sys\n"
    "r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
    "sys.stderr.write(r.stderr[-3000:])\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    "sys.exit(r.returncode)\n"
)


def _run(cmd: list[str], env: dict) -> tuple[float, int]:
    """(wall seconds, max RSS in KiB) of one command, measured by a fresh wrapper process."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"command failed ({result.returncode}): {' '.join(cmd)}\n{result.stderr[-3000:]}")
    return wall, int(result.stdout.strip().splitlines()[-1])


def ours_cmd(model: Path, data: Path, out: Path, steps: int, a: argparse.Namespace) -> list[str]:
    return [sys.executable, "-m", "diffusion_lora.cli", "train", "--model", str(model), "--data", str(data),
            "--out", str(out), "--steps", str(steps), "--rank", str(a.rank), "--lr", "1e-4",
            "--resolution", str(a.resolution), "--batch-size", str(a.batch_size), "--seed", "0",
            "--set", f"data.min_bucket={a.resolution}", "--set", f"data.max_bucket={a.resolution}",
            "--set", "data.buckets=false", "--set", "log.tensorboard=false", "--set", "train.max_grad_norm=1.0"]


def diffusers_cmd(script: Path, model: Path, data: Path, out: Path, steps: int, a: argparse.Namespace) -> list[str]:
    return [sys.executable, str(script), "--pretrained_model_name_or_path", str(model), "--train_data_dir",
            str(data), "--output_dir", str(out), "--max_train_steps", str(steps), "--rank", str(a.rank),
            "--learning_rate", "1e-4", "--resolution", str(a.resolution), "--train_batch_size",
            str(a.batch_size), "--seed", "0", "--center_crop", "--mixed_precision", "no",
            "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--checkpointing_steps", "100000",
            "--dataloader_num_workers", "0", "--report_to", "tensorboard"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--diffusers-script", required=True, type=Path)
    parser.add_argument("--model", choices=["tiny", "small", "sd15-io"], default="small")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--short", type=int, default=5)
    parser.add_argument("--long", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=3)
    a = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = make_model(a.model, root / "model")
        data = make_images(root / "data", a.images, a.resolution)
        per_step: dict[str, list[float]] = {"ours": [], "diffusers": []}
        rss: dict[str, int] = {"ours": 0, "diffusers": 0}
        for r in range(a.repeats):
            for name in ("ours", "diffusers"):
                times = {}
                for steps in (a.short, a.long):
                    out = root / f"{name}-{r}-{steps}"
                    cmd = (ours_cmd(model, data, out, steps, a) if name == "ours"
                           else diffusers_cmd(a.diffusers_script, model, data, out, steps, a))
                    times[steps], peak = _run(cmd, env)
                    rss[name] = max(rss[name], peak)
                per_step[name].append((times[a.long] - times[a.short]) / (a.long - a.short))
                print(f"[{name} #{r}] {per_step[name][-1]:.3f} s/step", flush=True)
    ours, theirs = statistics.median(per_step["ours"]), statistics.median(per_step["diffusers"])
    print(f"\nmodel {a.model}, {a.resolution}px, batch {a.batch_size}, rank {a.rank}, fp32, CPU, "
          f"{a.repeats} repeats of ({a.long} − {a.short}) steps\n")
    print("| trainer | steps/s (median) | peak RSS |")
    print("|---|---|---|")
    print(f"| diffusion-lora | {1 / ours:.2f} | {rss['ours'] / 1024:.0f} MiB |")
    print(f"| diffusers example | {1 / theirs:.2f} | {rss['diffusers'] / 1024:.0f} MiB |")
    print(f"\nspeed ratio ours/diffusers: {theirs / ours:.2f}×  ·  memory ratio: {rss['ours'] / rss['diffusers']:.2f}×")
    print("(peak RSS: the largest max-RSS of any run of that trainer, from getrusage in a wrapper process)")


if __name__ == "__main__":
    main()
