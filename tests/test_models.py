"""Tests of the built-in tiny models, their tokenizers and load_pipeline, all offline."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before anything imports huggingface_hub; load_pipeline re-reads it

import time

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, ModularPipeline
from safetensors.torch import save_file
from transformers import CLIPTokenizer, T5TokenizerFast

import diffusion_lora as dl
from diffusion_lora.models.invoke import pipeline_name, run_pipeline
from diffusion_lora.models.loading import detect_single_file_pipeline
from diffusion_lora.models.tokenizers import build_clip_tokenizer, build_t5_tokenizer, tiny_words

from .helpers import input_images

CAPTION = "a small red circle on a white background"
SIZE = 32  # pixels; every tiny model generates at 32×32


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and 2 OpenMP threads on a busy 2-core machine
    spin-wait each other into 10-100x slower runs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def built() -> dict[str, tuple[DiffusionPipeline, float]]:
    """Each tiny pipeline, built once, with its build time in seconds."""
    out = {}
    for kind in dl.TINY_MODELS:
        start = time.perf_counter()
        pipe = dl.build_tiny_pipeline(kind)
        out[kind] = (pipe, time.perf_counter() - start)
        pipe.set_progress_bar_config(disable=True)
    return out


def _generate(pipe: DiffusionPipeline) -> np.ndarray:
    result = run_pipeline(
        pipe,
        CAPTION,
        num_inference_steps=2,
        height=SIZE,
        width=SIZE,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        images=input_images(pipe, SIZE),  # a variant's image inputs (Kontext, Fill)
    )
    return result.images


def _modules(pipe: DiffusionPipeline) -> dict[str, torch.nn.Module]:
    return {k: v for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)}


@pytest.mark.parametrize("kind", dl.TINY_MODELS)
def test_builds_fast_with_name_and_family(built, kind):
    pipe, seconds = built[kind]
    assert seconds < 15, f"{kind} took {seconds:.1f}s to build (target < 5 s)"
    assert pipeline_name(pipe) == kind
    assert dl.families.detect_variant(pipe).tiny_model == kind  # a variant's tiny model (tiny-sd35) too


@pytest.mark.parametrize("kind", dl.TINY_MODELS)
def test_same_seed_same_weights_other_seed_other_weights(built, kind):
    rng_before = torch.random.get_rng_state()
    again, other = dl.build_tiny_pipeline(kind, seed=0), dl.build_tiny_pipeline(kind, seed=1)
    assert torch.equal(rng_before, torch.random.get_rng_state()), "global RNG state was disturbed"
    for name, module in _modules(built[kind][0]).items():
        ref = module.state_dict()
        same, diff = getattr(again, name).state_dict(), getattr(other, name).state_dict()
        assert all(torch.equal(ref[k], same[k]) for k in ref), f"{kind}.{name}: same seed, other weights"
        assert any(not torch.equal(ref[k], diff[k]) for k in ref), f"{kind}.{name}: other seed, same weights"


def _linear_names(module: torch.nn.Module, suffix: str) -> list[str]:
    return [n for n, m in module.named_modules() if n.endswith(suffix) and isinstance(m, torch.nn.Linear)]


@pytest.mark.parametrize("kind", dl.TINY_MODELS)
def test_denoiser_has_the_real_layout(built, kind):
    pipe = built[kind][0]
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    for proj in ("to_q", "to_k", "to_v", "to_out.0"):
        assert _linear_names(denoiser, "." + proj), f"{kind}: no {proj} Linear"
    if hasattr(pipe, "unet"):
        blocks = denoiser.down_blocks, denoiser.up_blocks
        assert all(len(b) >= 2 and all(hasattr(x, "attentions") for x in b) for b in blocks)
        assert _linear_names(denoiser.mid_block, "attn2.to_k")
    else:  # joint attention's add_*_proj (SD3, Flux.1), or whatever else the family's attn preset names
        for proj in dl.detect_family(pipe).targets("attn"):
            assert _linear_names(denoiser, "." + proj), f"{kind}: no {proj} Linear"
    if kind == "tiny-flux":
        assert len(denoiser.transformer_blocks) >= 2 and len(denoiser.single_transformer_blocks) >= 2
        assert pipe.vae.config.latent_channels * 4 == denoiser.config.in_channels


@pytest.mark.parametrize("kind", dl.TINY_MODELS)
def test_text_encoders_match_their_tokenizers(built, kind):
    pipe = built[kind][0]
    for suffix in ("", "_2", "_3"):
        encoder = getattr(pipe, "text_encoder" + suffix, None)
        tokenizer = getattr(pipe, "tokenizer" + suffix, None)
        if encoder is None:
            continue
        config = getattr(encoder.config, "text_config", None) or encoder.config  # a VLM's language model
        assert config.vocab_size == len(tokenizer)
        assert (config.eos_token_id, config.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)
        if isinstance(tokenizer, CLIPTokenizer):
            assert config.bos_token_id == tokenizer.bos_token_id
            assert config.max_position_embeddings == tokenizer.model_max_length == 77
            assert _linear_names(encoder, "self_attn.q_proj")


@pytest.mark.parametrize("kind", dl.TINY_MODELS)
def test_generation_is_sized_and_reproducible(built, kind):
    pipe = built[kind][0]
    first, second = _generate(pipe), _generate(pipe)
    assert first.shape == (1, SIZE, SIZE, 3)
    assert np.isfinite(first).all()
    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize("kind", dl.TINY_MODELS)
def test_save_then_load_pipeline_gives_identical_output(built, kind, tmp_path):
    pipe = built[kind][0]
    if isinstance(pipe, ModularPipeline):
        pytest.skip("a modular pipeline folder (Flux.3) loads its tokenizer through Qwen3VLProcessor, which needs "
                    "torchvision; the tiny model's stand-in processor cannot be saved as one")
    pipe.save_pretrained(tmp_path)
    loaded = dl.load_pipeline(tmp_path, exact=True)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is type(pipe)
    np.testing.assert_array_equal(_generate(loaded), _generate(pipe))


def test_load_pipeline_tiny_name_with_dtype():
    pipe = dl.load_pipeline("tiny-sd15", torch_dtype=torch.float16)
    assert pipe.unet.dtype == pipe.text_encoder.dtype == torch.float16


@pytest.mark.parametrize("build", [build_clip_tokenizer, build_t5_tokenizer])
def test_tokenizer_words_are_single_tokens_and_survive_save_load(build, tmp_path):
    tokenizer = build()
    cls = CLIPTokenizer if isinstance(tokenizer, CLIPTokenizer) else T5TokenizerFast
    tokenizer.save_pretrained(tmp_path)
    reloaded = cls.from_pretrained(tmp_path)
    special = 2 if cls is CLIPTokenizer else 1  # CLIP: bos + eos; T5: eos
    ids = tokenizer(CAPTION).input_ids
    assert len(ids) == len(CAPTION.split()) + special
    word_ids = ids[1:-1] if cls is CLIPTokenizer else ids[:-1]
    assert [tokenizer.decode([i]) for i in word_ids] == CAPTION.split()
    assert reloaded(CAPTION).input_ids == ids
    assert len(reloaded) == len(tokenizer)
    assert reloaded.decode(ids, skip_special_tokens=True) == CAPTION
    assert len(tokenizer("xylophonic").input_ids) > 1 + special  # unknown words fall back to pieces


def test_every_listed_word_is_one_clip_token():
    tokenizer = build_clip_tokenizer()
    assert {"circle", "hexagon", "watercolor", "checkered", "corner", "sks"} <= set(tiny_words())
    assert all(len(tokenizer(w).input_ids) == 3 for w in tiny_words())


def test_load_pipeline_missing_path_names_it(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(dl.ModelLoadError, match="no_such_model: no such file or folder"):
        dl.load_pipeline(missing)
    with pytest.raises(dl.ModelLoadError, match="did you mean tiny-sd15"):
        dl.load_pipeline("tiny-sd16")


def test_load_pipeline_unknown_hub_id_offline():
    repo = "nobody-here/no-such-model"
    with pytest.raises(dl.ModelLoadError, match=rf"could not download {repo}: offline.*tiny-sd15"):
        dl.load_pipeline(repo)


def test_load_pipeline_folder_without_model_index(tmp_path):
    with pytest.raises(dl.ModelLoadError, match="no model_index.json"):
        dl.load_pipeline(tmp_path)


def test_load_pipeline_bad_device():
    with pytest.raises(dl.ConfigError, match="device"):
        dl.load_pipeline("tiny-sd15", device="not-a-device")


def _sd1_keys() -> dict[str, torch.Tensor]:
    return {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight": torch.zeros(8, 16, 1, 1),
    }


def test_single_file_without_config_asks_for_config(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(_sd1_keys(), str(path))
    with pytest.raises(dl.ModelLoadError, match=r"--config DIR"):
        dl.load_pipeline(path)


def test_single_file_config_must_be_a_diffusers_folder(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(_sd1_keys(), str(path))
    with pytest.raises(dl.ModelLoadError, match="no model_index.json"):
        dl.load_pipeline(path, config=tmp_path)


def test_single_file_of_unknown_layout(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"encoder.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(dl.ModelLoadError, match="not a Stable Diffusion"):
        dl.load_pipeline(path)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    with pytest.raises(dl.ModelLoadError, match="not a readable checkpoint"):
        dl.load_pipeline(broken)


SD1 = {
    "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
    "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
}
SDXL = {
    **SD1,
    "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (1280,),
}
SD3 = {
    "model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias": (9216,),
    "model.diffusion_model.pos_embed": (1, 36864, 1536),
}
FLUX_DEV = {
    "double_blocks.0.img_attn.norm.key_norm.scale": (128,),
    "guidance_in.in_layer.bias": (3072,),
    "img_in.weight": (3072, 64),
}
FLUX_SCHNELL = {k: v for k, v in FLUX_DEV.items() if not k.startswith("guidance_in")}


@pytest.mark.parametrize(
    ("shapes", "pipeline"),
    [
        (SD1, "StableDiffusionPipeline"),
        (SDXL, "StableDiffusionXLPipeline"),
        (SD3, "StableDiffusion3Pipeline"),
        (FLUX_DEV, "FluxPipeline"),
        (FLUX_SCHNELL, "FluxPipeline"),
    ],
)
def test_single_file_pipeline_detection(shapes, pipeline):
    assert detect_single_file_pipeline(shapes)[1] == pipeline


def test_build_unknown_tiny_model():
    with pytest.raises(dl.ModelLoadError, match="tiny-sd15, tiny-sd2, tiny-sdxl"):
        dl.build_tiny_pipeline("tiny-sd9")


def test_a_tiny_model_the_installed_diffusers_cannot_build_says_which_classes(monkeypatch):
    import dataclasses

    from diffusion_lora.models import tiny

    future = dataclasses.replace(tiny.TINY_SPECS["tiny-flux"], pipeline="FluxFromTheFuturePipeline")
    monkeypatch.setattr(tiny, "TINY_SPECS", {**tiny.TINY_SPECS, "tiny-flux": future})
    assert tiny.missing_classes("tiny-flux") == ["FluxFromTheFuturePipeline"]
    with pytest.raises(dl.ModelLoadError, match="FluxFromTheFuturePipeline.*upgrade diffusers"):
        tiny.build_tiny_pipeline("tiny-flux")
    assert all(not tiny.missing_classes(kind) for kind in dl.TINY_MODELS if kind != "tiny-flux")
