"""Chroma (ChromaTransformer2DModel): detection of every pipeline that uses it, and training's denoiser call
checked bit for bit against what ChromaPipeline itself feeds its transformer (captured with a forward hook)."""

from __future__ import annotations

import diffusers
import pytest
import torch
from safetensors.torch import load_file

import diffusion_lora as dl
from diffusion_lora.families import FAMILIES, detect_family
from diffusion_lora.training.conditioning import SizeInfo, conditioner_for, text_cond_cat, text_cond_slice

from .helpers import assert_near, run, trained_adapter

# captions of different lengths: each sample has its own text mask
CAPTIONS = ["a red circle on a white background", "a cat"]


@pytest.fixture(scope="module")
def pipe():
    return dl.build_tiny_pipeline("tiny-chroma")


def captured_call(transformer: torch.nn.Module, call) -> tuple[dict, torch.Tensor]:
    """The tensor kwargs and output of ``transformer``'s first forward during ``call()``."""
    seen: dict = {}

    def hook(module, args, kwargs, out):  # noqa: ANN001
        if "kwargs" not in seen:
            seen["kwargs"] = {k: v.clone() for k, v in kwargs.items() if torch.is_tensor(v)}
            seen["out"] = (out[0] if isinstance(out, tuple) else out.sample).clone()

    handle = transformer.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            call()
    finally:
        handle.remove()
    return seen["kwargs"], seen["out"]


@pytest.mark.parametrize("pipeline", ["ChromaPipeline", "ChromaImg2ImgPipeline", "ChromaInpaintPipeline"])
def test_every_chroma_pipeline_is_detected(pipe, pipeline):
    other = getattr(diffusers, pipeline)(**pipe.components)
    assert detect_family(other) is FAMILIES["chroma"]


def test_conditioner_calls_the_transformer_exactly_as_the_pipeline(pipe):
    """Same latents and prompts through ChromaPipeline (1 step, no CFG) and through the trainer's
    conditioner: every tensor the transformer gets — packed latents, T5 states, extended text mask, ids,
    timestep — and its output are bit-identical."""
    conditioner = conditioner_for(FAMILIES["chroma"])
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 16, 16, 16, generator=g)  # 32×32 images, tiny VAE ×2
    packed = pipe._pack_latents(latents, 2, 16, 16, 16)  # the pipeline takes packed latents
    expected, expected_out = captured_call(pipe.transformer, lambda: pipe(
        prompt=CAPTIONS, height=32, width=32, num_inference_steps=1, latents=packed, guidance_scale=1.0,
        output_type="latent",
    ))
    t = pipe.scheduler.timesteps[0].expand(2)  # σ·1000, what the trainer passes
    with torch.no_grad():
        text = conditioner.encode_text(pipe, CAPTIONS, torch.device("cpu"))
        sizes = [SizeInfo((32, 32), (0, 0), (32, 32))] * 2
        got, got_out = captured_call(pipe.transformer, lambda: conditioner.predict(
            pipe, pipe.transformer, latents, t, text, sizes, 5.0))
        pred = conditioner.predict(pipe, pipe.transformer, latents, t, text, sizes, 5.0)
    assert got.keys() == expected.keys() == {
        "hidden_states", "timestep", "encoder_hidden_states", "txt_ids", "img_ids", "attention_mask"
    }
    for key in expected:
        assert got[key].dtype == expected[key].dtype, key
        assert torch.equal(got[key], expected[key]), key
    assert torch.equal(got_out, expected_out)
    # the mask keeps each caption's tokens plus one padding token, then every image token
    mask = expected["attention_mask"]
    assert mask.shape == (2, 512 + 64)
    lengths = [int(n) for n in mask[:, :512].sum(dim=1)]
    assert lengths[0] > lengths[1] > 1 and mask[:, 512:].all()
    # unpacked back to the latents' layout: sample 0's prediction is the pipeline's, unpacked
    assert pred.shape == latents.shape
    assert torch.equal(pipe._pack_latents(pred, 2, 16, 16, 16), expected_out)


def test_text_condition_slices_per_sample(pipe):
    """Cached text conditions are stored per sample and batched again: the mask travels with its sample."""
    conditioner = conditioner_for(FAMILIES["chroma"])
    with torch.no_grad():
        text = conditioner.encode_text(pipe, CAPTIONS, torch.device("cpu"))
    parts = [text_cond_slice(text, i) for i in range(2)]
    assert parts[0]["attention_mask"].shape == (1, 512)
    again = text_cond_cat(parts[::-1])
    assert torch.equal(again["attention_mask"], text["attention_mask"].flip(0))
    assert torch.equal(again["encoder_hidden_states"], text["encoder_hidden_states"].flip(0))
    assert torch.equal(again["txt_ids"], text["txt_ids"])


def test_sample_config_loads_round_trips_and_smoke_overrides_apply():
    import tomllib
    from pathlib import Path

    from diffusion_lora.training.config import TextCache, TimestepSampling

    path = Path(__file__).resolve().parent.parent / "samples" / "train_chroma.toml"
    cfg = dl.load_config(path)
    assert dl.load_config(tomllib.loads(cfg.to_toml())) == cfg
    assert cfg.model.name == "lodestones/Chroma1-HD" and not cfg.lora.text_encoder
    assert cfg.cache.text is TextCache.MEMORY and cfg.train.timestep_sampling is TimestepSampling.SHIFT
    assert cfg.train.shift is None  # the family's resolution-dependent shift
    # the smoke test the file's header shows
    smoke = dl.load_config(path, [
        "model.name=tiny-chroma", "train.steps=20", "data.resolution=64", "model.dtype=float32",
        "train.mixed_precision=no", "optimizer.name=adamw", "data.min_bucket=32", "data.max_bucket=128",
        "data.bucket_step=16", "scheduler.warmup_steps=5", "sample.width=64", "sample.height=64",
    ])
    assert smoke.model.name == "tiny-chroma" and smoke.sample.width == 64


def test_training_resumes_bit_identically_caches_agree_and_samples(tmp_path):
    """tiny-chroma through the trainer: a run stopped at step 2 and resumed ends bit-identical to a straight
    run; cached and uncached text/latents give the same losses; previews are drawn through ChromaPipeline."""
    from .test_train import config, make_dataset

    data = make_dataset(tmp_path / "data", n=4)
    sections = {"model": "tiny-chroma", "train": {"steps": 4, "batch_size": 2}, "checkpoint": {"every": 2}}
    straight = dl.train(config(data, tmp_path / "a", **sections,
                               sample={"every": 2, "prompts": ["a red circle"], "steps": 1}), progress=False)
    assert sorted(p.name for p in (tmp_path / "a" / "samples").glob("*.png")) == [
        "step_000002.png", "step_000004.png"
    ]
    cfg = config(data, tmp_path / "b", **sections)
    first = dl.train(cfg, progress=False, max_steps_this_run=2)
    assert first.adapter is None
    resumed = dl.train(cfg, progress=False, resume=True)
    a, b = load_file(str(straight.adapter)), load_file(str(resumed.adapter))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert straight.losses[2:] == resumed.losses
    uncached = dl.train(config(data, tmp_path / "c", **sections, cache={"latents": "off", "text": "off"}),
                        progress=False)
    assert uncached.losses == straight.losses


@pytest.mark.parametrize(
    ("targets", "blocks", "keep"),
    [
        ("attn", {"default": 0.0, "blocks.1": 1.0}, lambda k: k.startswith("transformer.transformer_blocks.1.")),
        ("attn", {"default": 0.0, "single.0-1": 1.0}, lambda k: k.startswith("transformer.single_transformer_blocks.")),
        # all-linear reaches the approximator and the input/output projections, outside every block: "default"
        ("all-linear", {"default": 1.0, "blocks": 0.0, "single": 0.0}, lambda k: "_blocks." not in k),
    ],
    ids=["double-1", "single", "outside-blocks"],
)
def test_per_block_weights_affect_only_named_blocks(tmp_path, targets, blocks, keep):
    from .test_adapters import _restricted_file

    pipe = dl.build_tiny_pipeline("tiny-chroma")
    trained_adapter(pipe, "s", seed=12, rank=4, targets=targets)
    full = dl.save_lora(pipe, "s", tmp_path / "full.safetensors")
    dl.set_weights(pipe, {"s": blocks})
    per_block = run(pipe)
    only = dl.build_tiny_pipeline("tiny-chroma")
    dl.load_lora(only, _restricted_file(full, tmp_path / "only.safetensors", keep))
    assert torch.equal(per_block, run(only))
    assert not torch.equal(per_block, run(dl.build_tiny_pipeline("tiny-chroma")))


def test_hotswap_replaces_weights_in_place(tmp_path):
    from diffusion_lora.adapters.state import state_of

    src = dl.build_tiny_pipeline("tiny-chroma")
    trained_adapter(src, "x", seed=14, rank=4, alpha=2)
    a = dl.save_lora(src, "x", tmp_path / "a.safetensors", format="comfyui")
    dl.remove_lora(src, "x")
    trained_adapter(src, "x", seed=15, rank=4, alpha=6)
    b = dl.save_lora(src, "x", tmp_path / "b.safetensors", format="kohya")
    expected_b = run(src)
    pipe = dl.build_tiny_pipeline("tiny-chroma")
    dl.load_lora(pipe, a, name="x")
    layers = {id(s.layer) for s in state_of(pipe).sites()}
    dl.hotswap(pipe, "x", b)
    assert {id(s.layer) for s in state_of(pipe).sites()} == layers
    assert_near(run(pipe), expected_b, rel=1e-4)  # b went through kohya's fused qkv: float rounding only
