"""The serving engine: mixed adapter stacks in one batch equal `diffusion-lora generate` alone, per image."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import diffusion_lora as dl
from diffusion_lora.cli import main
from diffusion_lora.serve import Engine, Job

from .helpers import randomize

NAMES = ("ink", "neon", "moss", "rust")


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    pipe = dl.build_tiny_pipeline("tiny-sd15")
    for i, name in enumerate(NAMES):
        dl.add_lora(pipe, name, rank=4, alpha=4, text_encoder=i % 2 == 1)
        randomize(pipe, name, seed=60 + i, std=0.15)
        dl.save_lora(pipe, name, folder / f"{name}.safetensors")
    return folder


@pytest.fixture(scope="module")
def engine(lora_dir):
    pipe = dl.build_tiny_pipeline("tiny-sd15")
    with Engine(pipe, [str(lora_dir)], max_batch=8, batch_window=0.5) as eng:
        yield eng


def _cli(tmp_path, prompt, seed, negative=None):
    out = tmp_path / f"cli-{seed}"
    args = ["generate", "--model", "tiny-sd15", "--prompt", prompt, "--steps", "3", "--height", "32", "--width", "32",
            "--seed", str(seed), "--out", str(out), "--lora-dir", str(tmp_path.parent / "loras0")]
    if negative:
        args += ["--negative-prompt", negative]
    assert main(args) == 0
    image = Image.open(sorted(out.glob("*.png"))[0])
    return np.asarray(image.convert("RGB")).astype(int), image.text["parameters"]


JOBS = [
    ("a red circle <lora:ink:0.8>", 11),
    ("a blue square <lora:neon:1> <lora:moss:-0.5>", 12),
    ("a green triangle", 13),
    ("two dots <lora:rust:0.6:1.2> <lora:ink:0.3>", 14),
]


def test_mixed_batch_matches_cli_generate(engine, lora_dir, tmp_path):
    (tmp_path.parent / "loras0").symlink_to(lora_dir) if not (tmp_path.parent / "loras0").exists() else None
    futures = [engine.submit(Job(prompt, steps=3, width=32, height=32, seed=seed)) for prompt, seed in JOBS]
    results = [f.result(timeout=120) for f in futures]
    assert engine.batches == 1  # all four ran in one pipeline call
    worst = 0
    for (prompt, seed), result in zip(JOBS, results):
        pixels, text = _cli(tmp_path, prompt, seed)
        served = np.asarray(result.images[0].image.convert("RGB")).astype(int)
        worst = max(worst, int(np.abs(served - pixels).max()))
        assert result.images[0].parameters == text
    assert worst <= 1
