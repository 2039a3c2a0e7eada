"""The serving engine: mixed adapter stacks in one batch equal `diffusion-lora generate` alone, per image."""

from __future__ import annotations

import numpy as np
import pytest

import diffusion_lora as dl
from diffusion_lora.serve import Engine, Job

from .serve_files import cli_image, write_adapters

NAMES = ("ink", "neon", "moss", "rust")


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    write_adapters(folder, list(NAMES), seed=60, text_encoder=NAMES[1::2])
    return folder


@pytest.fixture(scope="module")
def engine(lora_dir):
    pipe = dl.build_tiny_pipeline("tiny-sd15")
    with Engine(pipe, [str(lora_dir)], max_batch=8, batch_window=0.5) as eng:
        yield eng


JOBS = [
    ("a red circle <lora:ink:0.8>", 11),
    ("a blue square <lora:neon:1> <lora:moss:-0.5>", 12),
    ("a green triangle", 13),
    ("two dots <lora:rust:0.6:1.2> <lora:ink:0.3>", 14),
]


def test_mixed_batch_matches_cli_generate(engine, lora_dir, tmp_path):
    futures = [engine.submit(Job(prompt, steps=3, width=32, height=32, seed=seed)) for prompt, seed in JOBS]
    results = [f.result(timeout=120) for f in futures]
    assert engine.batches == 1  # all four ran in one pipeline call
    worst = 0
    for (prompt, seed), result in zip(JOBS, results):
        pixels, text = cli_image(tmp_path / f"cli-{seed}", lora_dir, prompt, seed)
        served = np.asarray(result.images[0].image.convert("RGB")).astype(int)
        worst = max(worst, int(np.abs(served - pixels).max()))
        assert result.images[0].parameters == text
    assert worst <= 1
