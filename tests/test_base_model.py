"""The embedded base model: a plain SD1.x diffusers folder that really follows prompts."""

from __future__ import annotations

import pytest
import torch

import diffusion_lora as dl
from diffusion_lora.models.loading import embedded_model_path
from diffusion_lora.toy import world
from diffusion_lora.toy.evaluate import prompt_following
from diffusion_lora.toy.scenes import held_out_combos
from diffusion_lora.toy.train_base import BasePlan, train_base_model

pytestmark = pytest.mark.slow

GUIDANCE = 5.0


@pytest.fixture
def two_threads():
    """Generation and training are the slow part of these tests; give them both cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_embedded_model_is_a_plain_sd15_folder_of_at_most_25_mb():
    from diffusers import StableDiffusionPipeline

    folder = embedded_model_path("shapes-sd15")
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size <= 25 * 2**20
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    assert type(pipe.unet).__name__ == "UNet2DConditionModel" and type(pipe.vae).__name__ == "AutoencoderKL"
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel" and type(pipe.tokenizer).__name__ == "CLIPTokenizer"
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 64


@pytest.fixture(scope="module")
def base():
    pipe = dl.load_pipeline("shapes-sd15")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _score(pipe, caption):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        combos = held_out_combos()
        assert len(combos) == 100
        score = prompt_following(pipe, combos, caption=caption, seed=0, steps=20, guidance=GUIDANCE)
    finally:
        torch.set_num_threads(before)
    print(f"held-out prompt following ({caption.__name__}): colour {score.colour:.0%}, shape {score.shape:.0%}")
    return score


@pytest.fixture(scope="module")
def held_out_score(base):
    from diffusion_lora.toy.evaluate import caption_of

    return _score(base, caption_of)  # "a large blue circle on a white background"


def test_base_model_draws_the_requested_shape_for_60_percent_of_held_out_prompts(held_out_score):
    assert held_out_score.shape >= 0.60


def test_base_model_draws_the_requested_colour_for_80_percent_of_held_out_prompts(held_out_score):
    assert held_out_score.colour >= 0.80


@pytest.fixture(scope="module")
def short_prompt_score(base):
    from diffusion_lora.toy.evaluate import short_caption

    return _score(base, short_caption)  # "a blue circle": no size, no background


def test_base_model_follows_short_prompts_colour_80_percent_shape_60_percent(short_prompt_score):
    """Natural short prompts of the held-out combos, as a new user types them (issue 17)."""
    assert short_prompt_score.colour >= 0.80 and short_prompt_score.shape >= 0.60


def _tiny_plan() -> BasePlan:
    return BasePlan(vae_steps=2, vae_batch=2, sharpen_steps=2, polish_steps=2, images=16, unet_steps=3,
                    unet_batch=4, warmup=1, checkpoint_every=2, photos=world.photos_available(), open_vae_steps=2,
                    open_vae2_steps=2, open_images=16, open_unet_steps=3, open_warmup=1, open_decay_from=2,
                    reword_steps=0)


def _weights(pipe) -> dict[str, torch.Tensor]:
    return {f"{c}.{k}": v.clone() for c in ("vae", "unet", "text_encoder")
            for k, v in getattr(pipe, c).state_dict().items()}


def test_base_model_training_is_reproducible_and_resumable(tmp_path, two_threads):
    """Every stage is seeded: two short runs of the real trainer give the same weights, and a run stopped
    after one open-world UNet step (as a killed run) and started again ends with the same weights too."""
    plan = _tiny_plan()
    states = []
    for run in ("a", "b"):
        pipe = train_base_model(tmp_path / run / "model", tmp_path / run / "work", plan)
        states.append(_weights(pipe))
    assert train_base_model(tmp_path / "c" / "model", tmp_path / "c" / "work", plan, until=1) is None
    assert not (tmp_path / "c" / "model").exists()
    states.append(_weights(train_base_model(tmp_path / "c" / "model", tmp_path / "c" / "work", plan)))
    for other in states[1:]:
        assert states[0].keys() == other.keys()
        assert all(torch.equal(states[0][k], other[k]) for k in states[0])
    reloaded = dl.load_pipeline(tmp_path / "a" / "model")
    assert torch.equal(reloaded.unet.conv_in.weight, states[0]["unet.conv_in.weight"])
    _assert_sample_is_the_mean(reloaded.vae)


def test_the_frozen_encoder_stages_keep_every_latent_and_are_reproducible_and_resumable(tmp_path, two_threads):
    """Stages 5b (the decoder on the open-world mix) and 7b (the text encoder learns what rewordings stand
    for) change only the decoder and the text encoder: the encoder and the UNet are bit-equal
    to the closed-world run's, so LoRAs trained on the closed world's latents stay valid. A run stopped
    after one stage-7b step and started again ends with the same weights as an uninterrupted one."""
    from dataclasses import replace

    closed_plan = replace(_tiny_plan(), open_vae_steps=0, open_vae2_steps=0, open_unet_steps=0)
    plan = replace(closed_plan, open_decoder_steps=2, reword_steps=3)
    closed = _weights(train_base_model(tmp_path / "closed" / "model", tmp_path / "closed" / "work", closed_plan))
    opened = _weights(train_base_model(tmp_path / "a" / "model", tmp_path / "a" / "work", plan))
    assert train_base_model(tmp_path / "c" / "model", tmp_path / "c" / "work", plan, until=1) is None
    resumed = _weights(train_base_model(tmp_path / "c" / "model", tmp_path / "c" / "work", plan))
    assert all(torch.equal(opened[k], resumed[k]) for k in opened)
    kept = [k for k in closed if k.startswith(("unet.", "vae.encoder.", "vae.quant_conv."))]
    assert len(kept) > 50 and all(torch.equal(closed[k], opened[k]) for k in kept)
    for part in ("vae.decoder.", "text_encoder."):
        assert any(not torch.equal(closed[k], opened[k]) for k in closed if k.startswith(part)), part
    with pytest.raises(ValueError, match="two alternative plans"):
        train_base_model(tmp_path / "bad", tmp_path / "bad-work", replace(plan, open_unet_steps=1))


def test_a_wider_base_trains_and_loads_in_plain_diffusers(tmp_path, two_threads):
    """--vae-width / --unet-width (the shipped model: 32) widen every block; 48 takes 16 norm groups in the
    UNet. The saved folder loads in plain StableDiffusionPipeline with the trained weights."""
    from dataclasses import replace

    from diffusers import StableDiffusionPipeline

    plan = replace(_tiny_plan(), vae_width=48, unet_width=48, open_vae_steps=0, open_vae2_steps=0, open_unet_steps=0)
    pipe = train_base_model(tmp_path / "model", tmp_path / "work", plan)
    plain = StableDiffusionPipeline.from_pretrained(tmp_path / "model", safety_checker=None)
    assert tuple(plain.vae.config.block_out_channels) == tuple(plain.unet.config.block_out_channels) == (48, 96, 96)
    assert plain.unet.config.norm_num_groups == 16 and plain.vae.config.norm_num_groups == 16
    assert torch.equal(plain.unet.conv_in.weight, pipe.unet.conv_in.weight)
    assert torch.equal(plain.vae.decoder.conv_out.weight, pipe.vae.decoder.conv_out.weight)
    with pytest.raises(ValueError, match="UNet width 40: expected a positive multiple of 16"):
        train_base_model(tmp_path / "bad", tmp_path / "bad-work", replace(plan, unet_width=40))


def _assert_sample_is_the_mean(vae) -> None:
    """A LoRA trainer's ``latent_dist.sample()`` must give the means the base UNet was trained on."""
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
        sample = posterior.sample(generator=torch.Generator().manual_seed(4))
    spread = float(posterior.mean.std())
    assert spread > 0.01
    assert float((sample - posterior.mean).abs().max()) < 1e-5 * spread


def test_embedded_vae_posterior_is_its_mean():
    from diffusers import AutoencoderKL

    _assert_sample_is_the_mean(AutoencoderKL.from_pretrained(embedded_model_path("shapes-sd15"), subfolder="vae"))


def test_the_shipped_text_encoder_reads_short_prompts_as_their_template_and_keeps_other_captions():
    """Stage 7b of the shipped run, checked against the text encoder it started from (stage 3's averaged
    weights, kept in train_scripts/base_work/denoiser.pt): a short prompt now gives what the template it
    stands for gave, the template captions and a trigger-word caption give what they gave."""
    from pathlib import Path

    from transformers import CLIPTextModel, CLIPTokenizer

    folder = embedded_model_path("shapes-sd15")
    shipped = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    before = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    state = torch.load(Path(__file__).resolve().parents[1] / "train_scripts" / "base_work" / "denoiser.pt",
                       weights_only=False, map_location="cpu")
    params = list(before.parameters())
    with torch.no_grad():
        for p, e in zip(params, state["ema"][-len(params):]):
            p.copy_(e)
    tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")

    def states(model, caption):
        ids = tok([caption], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
        with torch.no_grad():
            return model(ids)[0][0]

    def rel(a, b):
        return float((a - b).pow(2).mean() / b.pow(2).mean())

    # (medium, blue, circle, white) is a held-out combo: "a blue circle" stands for the first trained default
    for short, template in (("a blue circle", "a small blue circle on a white background"),
                            ("an orange star", "a medium orange star on a white background")):
        assert rel(states(shipped, short), states(before, template)) < 0.05
        assert rel(states(before, short), states(before, template)) > 0.5  # what stage 7b changed
    for caption in ("a large red circle on a white background", "zorbo, a small mascot on a gray background", ""):
        assert rel(states(shipped, caption), states(before, caption)) < 0.05, caption
