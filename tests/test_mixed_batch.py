"""Per-sample adapter stacks in one batch equal each sample generated alone with its stack."""

from __future__ import annotations

import pytest
import torch

import diffusion_lora as dl
from diffusion_lora.adapters.mixed import per_sample_adapters
from diffusion_lora.families import detect_variant
from diffusion_lora.models.invoke import is_modular, run_pipeline

from .helpers import SIZE, assert_near, randomize

PROMPTS = ["a red circle", "a blue square", "a green triangle", "two yellow dots"]
STACKS = [{"a": 1.0}, {"b": 0.7, "c": -0.5}, {}, {"a": 0.3, "c": 1.0}]


def _latents(pipe, prompts, seeds):
    size = SIZE.get(type(pipe).__name__, 32)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    with torch.no_grad():
        out = run_pipeline(pipe, list(prompts), num_inference_steps=2, height=size, width=size,
                           generator=gens, output_type="latent")
    return out.images


def _adapters(pipe):
    # std 0.1: strong enough to change every image, not so strong that float rounding gets amplified past
    # the tolerance (std 0.3 on a text encoder multiplies the cross-attention logits tenfold)
    for i, name in enumerate("abc"):
        dl.add_lora(pipe, name, text_encoder=i == 1)
        randomize(pipe, name, seed=10 + i, std=0.1)


@pytest.fixture
def txt2img(pipe):
    if detect_variant(pipe).inputs:
        pytest.skip("image-input variants are not served")
    if is_modular(pipe):
        pytest.skip("a modular pipeline takes one prompt per call: the server batches it one sample at a time")
    _adapters(pipe)
    return pipe


def test_mixed_batch_equals_solo(txt2img):
    pipe = txt2img
    seeds = [5, 6, 7, 8]
    solo = []
    for prompt, seed, stack in zip(PROMPTS, seeds, STACKS):
        dl.set_weights(pipe, stack)
        solo.append(_latents(pipe, [prompt], [seed]))
    dl.set_weights(pipe, {"a": 1.0, "b": 1.0})  # whatever is active outside must not leak into the batch
    with per_sample_adapters(pipe, STACKS):
        mixed = _latents(pipe, PROMPTS, seeds)
    for i in range(len(PROMPTS)):
        assert_near(mixed[i : i + 1], solo[i])
    # the stacks really differ: sample 0 and 2 differ from the same prompt/seed without adapters
    dl.set_weights(pipe, {})
    plain = _latents(pipe, PROMPTS[:1], seeds[:1])
    assert (plain - solo[0]).abs().max() > 1e-3
    # and on exit the pipeline's own active set is back
    dl.set_weights(pipe, {"a": 1.0})
    with per_sample_adapters(pipe, [{"b": 1.0}]):
        pass
    assert torch.equal(_latents(pipe, PROMPTS[:1], seeds[:1]), solo[0])
