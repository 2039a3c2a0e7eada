"""The engine serves every text-to-image family: two different adapter stacks and none in one batch, each image
equal to the same stack and seed generated alone on a separate pipeline (set_weights, one prompt)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffusion_lora as dl
from diffusion_lora.families import detect_variant
from diffusion_lora.models.invoke import is_modular, run_pipeline
from diffusion_lora.serve import AdapterRef, Engine, Job

from .helpers import SIZE, randomize

JOBS = [("a red circle", 3, {"one": 0.8}), ("a blue square", 4, {"two": 1.0, "one": -0.5}), ("a green dot", 5, {})]


def _solo(pipe, prompt, seed, stack, size):
    dl.set_weights(pipe, stack)
    with torch.inference_mode():
        image = run_pipeline(pipe, [prompt], num_inference_steps=2, height=size, width=size,
                             generator=[torch.Generator().manual_seed(seed)]).images[0]
    return np.asarray(image.convert("RGB")).astype(int)


def test_engine_serves_each_family(tiny_kind, make_pipe, tmp_path):
    pipe = make_pipe(tiny_kind)
    if detect_variant(pipe).inputs:
        pytest.skip("image-input variants are not served (the engine refuses them)")
    size = SIZE.get(type(pipe).__name__, 32)
    maker = make_pipe(tiny_kind)
    for i, name in enumerate(("one", "two")):
        dl.add_lora(maker, name, rank=4, alpha=4, text_encoder=i == 1)
        randomize(maker, name, seed=90 + i, std=0.1)
        dl.save_lora(maker, name, tmp_path / f"{name}.safetensors")
    reference = make_pipe(tiny_kind)
    for name in ("one", "two"):
        dl.load_lora(reference, tmp_path / f"{name}.safetensors", name=name)
    expected = [_solo(reference, prompt, seed, stack, size) for prompt, seed, stack in JOBS]
    with Engine(pipe, [str(tmp_path)], batch_window=1.0) as engine:
        futures = [engine.submit(Job(prompt, loras=[AdapterRef(n, w) for n, w in stack.items()], steps=2,
                                     width=size, height=size, seed=seed)) for prompt, seed, stack in JOBS]
        results = [f.result(timeout=300) for f in futures]
        assert engine.batches == (len(JOBS) if is_modular(pipe) else 1)  # a modular pipeline: one prompt per call
    worst = max(int(np.abs(np.asarray(r.images[0].image.convert("RGB")).astype(int) - e).max())
                for r, e in zip(results, expected))
    assert worst <= 1, worst
    assert np.abs(expected[0] - expected[2]).max() > 8  # the adapters do change the images
