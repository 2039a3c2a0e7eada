"""Flux.3 (modular Flux3ModularPipeline): the training conditioner against what the real pipeline feeds its
transformer, the refusal of the step-distilled model for training, and the modular call path."""

from __future__ import annotations

import pytest
import torch

import diffusion_lora as dl
from diffusion_lora.errors import ConfigError
from diffusion_lora.families import Conditioning, get_family
from diffusion_lora.models.invoke import run_pipeline
from diffusion_lora.training.conditioning import conditioner_for, latent_dist, text_cond_cat, text_cond_slice

PROMPT = "a small red circle on a white background"
LONG = " ".join(["a small red circle on a white background"] * 12)  # > 80 tokens: a 160-token window


@pytest.fixture(scope="module")
def pipe():
    p = dl.build_tiny_pipeline("tiny-flux3")
    p.set_progress_bar_config(disable=True)
    return p


def _capture(pipe, call):
    """The kwargs and output of the transformer's first call while ``call`` runs."""
    seen = {}

    def hook(module, args, kwargs, out):
        if "kwargs" not in seen:
            seen["kwargs"] = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in kwargs.items()}
            seen["out"] = out[0].clone()

    handle = pipe.transformer.register_forward_hook(hook, with_kwargs=True)
    try:
        call()
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("prompt", [PROMPT, LONG])
def test_conditioner_feeds_the_transformer_exactly_what_the_pipeline_does(pipe, prompt):
    family = dl.detect_family(pipe)
    assert family.conditioning is Conditioning.FLUX3
    conditioner = conditioner_for(family)
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    with torch.no_grad():
        mean, std = latent_dist(pipe.vae, pixels)
        latents = conditioner.latents(pipe.vae, mean, std, torch.Generator().manual_seed(1))
        assert latents.shape == (1, 128, 8, 8)  # 32 VAE channels patchified 2×2, BatchNorm-normalised
        # the pipeline's CFG guider runs the conditional pass first: that is the call compared
        seen = _capture(pipe, lambda: pipe(prompt=prompt, height=32, width=32, num_inference_steps=1,
                                            latents=latents, output="latents"))
        t = pipe.scheduler.timesteps[:1]
        text = conditioner.encode_text(pipe, [prompt], torch.device("cpu"))
        calls = _capture(pipe, lambda: conditioner.predict(pipe, pipe.transformer, latents, t, text, [None], 1.0))
    ours, theirs = calls["kwargs"], seen["kwargs"]
    assert sorted(ours) == sorted(k for k, v in theirs.items() if v is not None)
    for key, value in theirs.items():
        if torch.is_tensor(value):
            assert value.dtype == ours[key].dtype and torch.equal(value, ours[key]), key
    assert torch.equal(calls["out"], seen["out"])
    assert text["prompt_embeds"].shape[1] % 80 == 0 and bool(text["text_mask"].all())


def test_a_batch_of_captions_of_different_windows_predicts_each_as_alone(pipe):
    conditioner = conditioner_for(get_family("flux3"))
    noisy = torch.randn(2, 128, 4, 4, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([700.0, 300.0])
    with torch.no_grad():
        text = conditioner.encode_text(pipe, [PROMPT, LONG], torch.device("cpu"))
        assert text["prompt_embeds"].shape[1] == 160 and text["text_mask"].sum(dim=1).tolist() == [80, 160]
        # cached per caption, then batched: the same as encoding the batch
        cached = text_cond_cat([text_cond_slice(conditioner.encode_text(pipe, [c], torch.device("cpu")), 0)
                                for c in (PROMPT, LONG)])
        assert all(torch.equal(cached[k], text[k]) for k in text)
        both = conditioner.predict(pipe, pipe.transformer, noisy, t, text, [None, None], 1.0)
        for i in range(2):
            alone = conditioner.predict(pipe, pipe.transformer, noisy[i : i + 1], t[i : i + 1],
                                        text_cond_slice(text, i), [None], 1.0)
            torch.testing.assert_close(both[i : i + 1], alone, rtol=1e-5, atol=1e-6)


def test_the_step_distilled_transformer_is_refused_for_training(pipe):
    distilled = diffusers_distilled(pipe)
    variant = dl.families.detect_variant(distilled)
    assert (dl.detect_family(distilled).name, variant.name) == ("flux3", "flux3-distilled")
    conditioner = conditioner_for(get_family("flux3"), variant)
    with pytest.raises(ConfigError, match="flow_map"):
        conditioner.check_trainable(distilled)
    with pytest.raises(ConfigError, match="step-distilled"):
        conditioner.encode_text(distilled, [PROMPT], torch.device("cpu"))


def diffusers_distilled(pipe):
    """The tiny pipeline's components in a Flux3DistilledModularPipeline with a flow-map transformer."""
    import diffusers

    blocks = diffusers.Flux3DistilledAutoBlocks()
    blocks.sub_blocks.pop("prompt_upsampler")
    distilled = blocks.init_pipeline()
    config = {k: v for k, v in pipe.transformer.config.items() if not k.startswith("_")}
    torch.manual_seed(0)
    transformer = diffusers.Flux3Transformer2DModel(**{**config, "flow_map": True}).eval()
    distilled.update_components(transformer=transformer, vae=pipe.vae, text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    return distilled


def test_run_pipeline_runs_a_list_of_prompts_one_by_one(pipe):
    kwargs = dict(num_inference_steps=2, height=32, width=32, output_type="latent")
    both = run_pipeline(pipe, [PROMPT, "a blue square"], generator=torch.Generator().manual_seed(0), **kwargs).images
    g = torch.Generator().manual_seed(0)
    first = run_pipeline(pipe, PROMPT, generator=g, **kwargs).images
    second = run_pipeline(pipe, "a blue square", generator=g, **kwargs).images
    assert both.shape == (2, 128, 8, 8)
    assert torch.equal(both, torch.cat([first, second]))
    assert not torch.equal(first, second)


def test_image_cond_blocks_act_only_with_reference_images(make_pipe):
    """LoRA on mode_blocks.image_cond.* changes nothing in text-to-image (the branch does not run) and
    changes the prediction once reference-image tokens are given: the honest limit of 'every target
    influences the output'."""
    from .helpers import run, trained_adapter

    pipe = make_pipe("tiny-flux3")
    base = run(pipe)
    trained_adapter(pipe, "s", seed=13, rank=4)
    dl.set_weights(pipe, {"s": {"default": 0.0, "image_cond": 1.0}})
    assert torch.equal(run(pipe), base)
    g = torch.Generator().manual_seed(3)
    tokens, cond = torch.randn(1, 16, 128, generator=g), torch.randn(1, 16, 128, generator=g)
    ids = torch.cartesian_prod(torch.arange(1), torch.arange(4), torch.arange(4), torch.arange(1)).float()
    kwargs = dict(hidden_states=tokens, encoder_hidden_states=torch.randn(1, 80, 64, generator=g),
                  timestep=torch.tensor([0.5]), img_ids=ids, txt_ids=torch.zeros(80, 4),
                  image_cond_hidden_states=cond, image_cond_ids=ids - torch.tensor([0.0, 0.0, 0.0, 1.0]))
    with torch.no_grad():
        on = pipe.transformer(**kwargs).sample
        dl.set_weights(pipe, {"s": 0.0})
        off = pipe.transformer(**kwargs).sample
    assert not torch.equal(on, off)


def test_compat_reads_the_modular_pipelines_own_settings(pipe):
    from diffusion_lora.compat.diffusers import modular_setting
    from diffusion_lora.models.loading import native_size

    assert modular_setting(pipe, "image_rope_scale", None) == 0.5
    assert modular_setting(pipe, "pad_multiple", None) == 80
    assert modular_setting(pipe, "default_height", None) == native_size(pipe) == 1024
    assert modular_setting(pipe, "no_such_setting", "default") == "default"
    assert modular_setting(object(), "image_rope_scale", 0.25) == 0.25


def test_hotswap_of_comfyui_files_in_place(make_pipe, tmp_path):
    from diffusion_lora.adapters.state import state_of

    from .helpers import run, trained_adapter

    src = make_pipe("tiny-flux3")
    trained_adapter(src, "x", seed=14, rank=4, alpha=2, targets="attn-ff")
    a = dl.save_lora(src, "x", tmp_path / "a.safetensors", format="comfyui")
    dl.remove_lora(src, "x")
    trained_adapter(src, "x", seed=15, rank=4, alpha=6, targets="attn-ff")
    b = dl.save_lora(src, "x", tmp_path / "b.safetensors", format="comfyui")
    expected = run(src)
    pipe = make_pipe("tiny-flux3")
    dl.load_lora(pipe, a, name="x")
    layers = {id(s.layer) for s in state_of(pipe).sites()}
    dl.hotswap(pipe, "x", b)
    assert {id(s.layer) for s in state_of(pipe).sites()} == layers
    torch.testing.assert_close(run(pipe), expected, rtol=0, atol=1e-6)


def test_guidance_is_set_on_the_guider_for_one_call_and_refused_without_one(pipe):
    kwargs = dict(num_inference_steps=2, height=32, width=32, output_type="latent")
    guider = pipe.guider
    default = run_pipeline(pipe, PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).images
    same = run_pipeline(pipe, PROMPT, generator=torch.Generator().manual_seed(0), guidance_scale=3.5, **kwargs).images
    other = run_pipeline(pipe, PROMPT, generator=torch.Generator().manual_seed(0), guidance_scale=7.0, **kwargs).images
    assert guider.config["guidance_scale"] == 3.5 and torch.equal(default, same) and not torch.equal(default, other)
    assert pipe.guider is guider
    distilled = diffusers_distilled(pipe)
    with pytest.raises(ConfigError, match="guidance_scale"):
        run_pipeline(distilled, PROMPT, guidance_scale=2.0, **kwargs)
