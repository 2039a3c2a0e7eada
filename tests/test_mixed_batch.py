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


# Each layer's two ways of adding per-sample adapters (per adapter on its rows, or gathered per sample into batched
# matmuls) against the sums written out from the adapter weights.
FAST_STACKS = [{"a": 1.0, "b": 0.5}, {"a": -0.4}, {}, {"a": 0.7, "c": 2.0}]  # a covers rows 0,1,3: not all


@pytest.fixture(scope="module")
def three_adapters():
    pipe = dl.build_tiny_pipeline("tiny-sd15")
    for i, (name, rank) in enumerate(zip("abc", (4, 8, 2))):
        dl.add_lora(pipe, name, rank=rank, alpha=2 * rank + i, text_encoder=True)
        randomize(pipe, name, seed=30 + i, std=0.2)
    return pipe


@pytest.mark.parametrize("stacks", [FAST_STACKS, [{"a": 0.5, "b": 1}, {"a": -1.0, "b": 1}, {"a": 2.0, "b": 1}]])
@pytest.mark.parametrize("grad", [False, True])
def test_fast_paths_equal_reference_math(three_adapters, stacks, grad):
    from diffusion_lora.adapters.mixed import _checked, _routes, _SampleHook
    from diffusion_lora.adapters.state import state_of

    state = state_of(three_adapters)
    checked = _checked(state, stacks)
    n, reps = len(stacks), 2  # CFG's doubled batch: row j is sample j % n
    g = torch.Generator().manual_seed(0)
    linear = [s for s in state.sites() if isinstance(s.layer.base_layer, torch.nn.Linear)]
    assert len(linear) > 4
    with torch.set_grad_enabled(grad):
        for site in linear:
            layer = site.layer
            hook = _SampleHook(site.path, n, _routes(site, checked, {}))
            x = torch.randn(reps * n, 5, layer.base_layer.in_features, generator=g)
            base = layer.base_layer(x).detach()
            expect = base.double().clone()
            for j in range(reps * n):
                for name, weight in stacks[j % n].items():
                    down, up = layer.lora_A[name].weight.double(), layer.lora_B[name].weight.double()
                    scale = layer.lora_alpha[name] / layer.r[name]
                    expect[j] += weight * scale * (x[j].double() @ down.T @ up.T)
            for path in (hook.add_per_adapter, hook.add_gathered):
                given = base.clone()
                got = path(x, given, reps, not grad)
                assert torch.equal(given, base)  # the layer's own output is never changed in place
                torch.testing.assert_close(got.double(), expect, rtol=1e-5, atol=1e-5)
