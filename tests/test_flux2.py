"""Flux.2 (dev and Klein): the trainer's conditioner against what the real pipelines feed their transformer.

The reference is the pipeline itself: it runs one denoising step on given latents with a hook on its
transformer, and the conditioner's call for the same latents, prompt and timestep must give the same
inputs and the same prediction, bit for bit. The latent encoding is checked against the pipeline's own
image encoder (``_encode_vae_image``: VAE mode, 2×2 patchify, BatchNorm statistics).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import diffusion_lora as dl
from diffusion_lora.families import detect_variant
from diffusion_lora.formats.safetensors_io import read_metadata
from diffusion_lora.models.invoke import run_pipeline
from diffusion_lora.training.conditioning import conditioner_for, latent_dist

PROMPT = "a red circle on a white background"
KINDS = ("tiny-flux2", "tiny-flux2-klein")


def _capture(module: torch.nn.Module, call):
    """(kwargs, output) of ``module``'s first forward call during ``call()``."""
    seen: dict = {}

    def hook(_module, _args, kwargs, out):
        if "kwargs" not in seen:
            seen["kwargs"] = {k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}
            seen["out"] = (out[0] if isinstance(out, tuple) else out.sample).clone()

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        result = call()
    finally:
        handle.remove()
    return seen["kwargs"], seen["out"], result


def _ids(ids: torch.Tensor) -> torch.Tensor:
    return ids[0] if ids.dim() == 3 else ids  # the transformer takes batch 0 of 3-d ids


@pytest.mark.parametrize("kind", KINDS)
def test_conditioner_feeds_the_transformer_what_the_pipeline_does(make_pipe, kind):
    pipe = make_pipe(kind)
    family, variant = dl.detect_family(pipe), detect_variant(pipe)
    conditioner = conditioner_for(family, variant)
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    with torch.no_grad():
        mean, std = latent_dist(pipe.vae, pixels)
        latents = conditioner.latents(pipe.vae, mean, std, torch.Generator().manual_seed(1))
        assert latents.shape == (2, 128, 8, 8)  # 32 channels × 2×2 patches; the tiny VAE halves 32 px
        guidance = 4.0 if pipe.transformer.config.guidance_embeds else 1.0  # Klein: no CFG, one call
        pipe_kwargs, pipe_out, _ = _capture(pipe.transformer, lambda: run_pipeline(
            pipe, [PROMPT, PROMPT], height=32, width=32, num_inference_steps=1, latents=latents,
            guidance_scale=guidance, output_type="latent",
        ))
        timesteps = pipe.scheduler.timesteps[:1].expand(2)  # the step the pipeline just ran (σ·1000)
        text = conditioner.encode_text(pipe, [PROMPT, PROMPT], torch.device("cpu"))
        ours_kwargs, ours_out, pred = _capture(pipe.transformer, lambda: conditioner.predict(
            pipe, pipe.transformer, latents, timesteps, text, [], guidance))
    for name in ("hidden_states", "timestep", "encoder_hidden_states"):
        assert torch.equal(ours_kwargs[name], pipe_kwargs[name]), name
    for name in ("img_ids", "txt_ids"):
        assert torch.equal(_ids(ours_kwargs[name]), _ids(pipe_kwargs[name])), name
    if variant.name == "flux2-klein":
        assert pipe_kwargs["guidance"] is None and ours_kwargs["guidance"] is None
    else:
        assert torch.equal(ours_kwargs["guidance"], pipe_kwargs["guidance"])
    assert torch.equal(ours_out, pipe_out)
    # the prediction comes back in the latents' layout: token (row, column) -> position (row, column)
    assert torch.equal(pred, pipe_out.permute(0, 2, 1).reshape(latents.shape))


@pytest.mark.parametrize("kind", KINDS)
def test_latents_are_the_pipelines_image_latents(make_pipe, kind):
    """With the distribution's mode (std 0), the training latents are what Flux2Pipeline encodes an image to."""
    pipe = make_pipe(kind)
    conditioner = conditioner_for(dl.detect_family(pipe), detect_variant(pipe))
    pixels = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        mean, _ = latent_dist(pipe.vae, pixels)
        ours = conditioner.latents(pipe.vae, mean, torch.zeros_like(mean), torch.Generator().manual_seed(0))
        theirs = pipe._encode_vae_image(pixels, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ours, theirs)
    assert conditioner.image_seq_len(*ours.shape[-2:]) == 64  # every patchified position is a token


def test_klein_and_dev_are_told_apart_by_config():
    klein = dl.build_tiny_pipeline("tiny-flux2-klein")
    family = dl.detect_family(klein)
    assert family.name == "flux2"
    # a Klein transformer in a plain Flux2Pipeline is still Klein (no guidance embedding)
    assert family.variant_of("Flux2Pipeline", dict(klein.transformer.config)).name == "flux2-klein"
    assert family.variant_of("Flux2Pipeline", {"guidance_embeds": True}).name == "flux2"
    nine = {"guidance_embeds": False, "num_attention_heads": 32}
    assert family.variant_of("Flux2KleinPipeline", nine).name == "flux2-klein-9b"


def _train_config(data, out, model, **sections):
    cfg = {
        "model": {"name": model},
        "data": {"path": str(data), "resolution": 64, "min_bucket": 64, "max_bucket": 64},
        "lora": {"rank": 4},
        "train": {"steps": 6, "learning_rate": 1e-3, "batch_size": 2},
        "output": {"dir": str(out), "name": "f2"},
        "log": {"tensorboard": False},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from .test_train import make_dataset

    return make_dataset(tmp_path_factory.mktemp("f2data"), n=4)


def test_klein_training_resumes_bit_identically_and_samples(dataset, tmp_path):
    sample = {"every": 3, "prompts": ["a red circle"], "seeds": [0], "steps": 2}
    straight = dl.train(_train_config(dataset, tmp_path / "a", "tiny-flux2-klein", checkpoint={"every": 3},
                                      sample=sample), progress=False)
    cfg = _train_config(dataset, tmp_path / "b", "tiny-flux2-klein", checkpoint={"every": 3})
    assert dl.train(cfg, progress=False, max_steps_this_run=3).adapter is None
    resumed = dl.train(cfg, progress=False, resume=True)
    a, b = load_file(str(straight.adapter)), load_file(str(resumed.adapter))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert straight.losses[3:] == resumed.losses
    assert sorted(p.name for p in (tmp_path / "a" / "samples").glob("*.png")) == ["step_000003.png",
                                                                                 "step_000006.png"]
    # the Qwen3 encoder was freed after the captions and the sample prompt (and, for Klein's real CFG, the
    # empty negative prompt) were encoded; the previews replay those encodings
    assert straight.freed_text_encoders == ("text_encoder",)
    meta = read_metadata(straight.adapter)
    assert meta["modelspec.architecture"] == "Flux.2-klein-4b/lora"
    assert any(".to_qkv_mlp_proj." in k for k in a) and not any(k.startswith("text_encoder") for k in a)


def test_text_encoder_runs_once_per_caption(dataset, tmp_path, monkeypatch):
    """With text caching (the default), the 24B/4B LLM encodes each distinct caption once, up front, and is
    freed; every step reads the cache."""
    from diffusion_lora.training import trainer

    calls = []
    real_load = trainer.load_pipeline

    def load_and_count(*args, **kwargs):
        pipe = real_load(*args, **kwargs)
        pipe.text_encoder.register_forward_hook(lambda *_: calls.append(1))
        return pipe

    monkeypatch.setattr(trainer, "load_pipeline", load_and_count)
    result = dl.train(_train_config(dataset, tmp_path / "c", "tiny-flux2", train={"steps": 8}), progress=False)
    captions = {p.read_text(encoding="utf-8") for p in dataset.glob("*.txt")}
    assert len(result.losses) == 8 and len(captions) == 4  # 16 samples seen, 4 distinct captions
    assert len(calls) == len(captions)
    assert result.freed_text_encoders == ("text_encoder",)



@pytest.mark.parametrize("kind", KINDS)
def test_generate_cli_with_a_lora(tmp_path, kind):
    import numpy as np
    from PIL import Image

    from diffusion_lora.cli import main

    from .helpers import trained_adapter

    pipe = dl.build_tiny_pipeline(kind)
    trained_adapter(pipe, "s", seed=3, rank=4, alpha=4)
    lora = dl.save_lora(pipe, "s", tmp_path / "s.safetensors", format="comfyui")
    common = ["generate", "--model", kind, "--prompt", "a blue star", "--steps", "2", "--height", "32",
              "--width", "32", "--seed", "0"]
    images = {}
    for label, extra in (("base", []), ("lora", ["--lora", str(lora)]), ("again", ["--lora", str(lora)])):
        assert main([*common, *extra, "--out", str(tmp_path / label)]) == 0
        (png,) = (tmp_path / label).glob("*.png")
        images[label] = np.asarray(Image.open(png))
    assert not np.array_equal(images["base"], images["lora"])
    np.testing.assert_array_equal(images["lora"], images["again"])
