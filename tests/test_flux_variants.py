"""Flux.1 Kontext, Fill and Control: what training feeds the transformer equals what the real pipeline feeds it.

Each test runs the variant's diffusers pipeline on its tiny model, captures the keyword arguments of its
transformer's first call (a forward pre-hook), and builds the same inputs the way training does: the
variant's conditioner on the pipeline's own noisy tokens, with latents from ``latent_dist`` and
``Conditioner.latents`` (drawing from a generator in the order the pipeline draws from its own).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import diffusion_lora as dl
from diffusion_lora.families import FAMILIES, detect_variant
from diffusion_lora.models.invoke import run_pipeline
from diffusion_lora.training.conditioning import _unpack, conditioner_for, latent_dist

from .helpers import input_images

SIZE = 32


def captured(pipe, images, seed=0):
    seen = {}

    def hook(module, args, kwargs):
        seen.setdefault("kw", {k: (v.clone() if torch.is_tensor(v) else v) for k, v in kwargs.items()})

    handle = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            run_pipeline(pipe, "a red square", images=images, num_inference_steps=1, height=SIZE, width=SIZE,
                         generator=torch.Generator().manual_seed(seed), output_type="latent")
    finally:
        handle.remove()
    return seen["kw"]


def pixels(img):
    values = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0)
    return values.permute(2, 0, 1)[None] if values.dim() == 3 else values[None, None]


def noisy_of(pipe, hidden):
    """The pipeline's noisy latents [1, C, h, w] from its first tokens and channels."""
    h = w = SIZE // pipe.vae_scale_factor
    c = pipe.vae.config.latent_channels
    return _unpack(hidden[:, : (h // 2) * (w // 2), : 4 * c], 1, c, h, w)


def conditioner_of(pipe):
    family = FAMILIES["flux1"]
    return conditioner_for(family, detect_variant(pipe))


def scaled(pipe, z):
    return (z - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor


def test_kontext_reference_tokens_follow_the_noisy_ones_as_in_the_pipeline():
    pipe = dl.build_tiny_pipeline("tiny-flux-kontext")
    images = input_images(pipe, SIZE)
    kw = captured(pipe, images)
    with torch.no_grad():
        mean, _ = latent_dist(pipe.vae, pixels(images["image"]))
        cond = {"reference": scaled(pipe, mean)}  # Kontext encodes its reference with the mean (argmax)
        hidden, ids = conditioner_of(pipe).transformer_inputs(pipe, noisy_of(pipe, kw["hidden_states"]), cond)
    assert hidden.shape == kw["hidden_states"].shape == (1, 128, 64)  # 64 noisy + 64 reference tokens
    torch.testing.assert_close(hidden, kw["hidden_states"], rtol=0, atol=1e-5)
    assert torch.equal(ids, kw["img_ids"])
    assert (ids[64:, 0] == 1).all() and (ids[:64, 0] == 0).all()


def test_fill_masked_image_and_mask_channels_as_in_the_pipeline():
    pipe = dl.build_tiny_pipeline("tiny-flux-fill")
    images = input_images(pipe, SIZE)
    kw = captured(pipe, images)
    conditioner = conditioner_of(pipe)
    g = torch.Generator().manual_seed(0)
    noise_shape = (1, pipe.vae.config.latent_channels, SIZE // 2, SIZE // 2)
    for _ in ("image latents", "initial noise"):  # the pipeline's first draws (it encodes the image with a sample)
        torch.randn(noise_shape, generator=g)
    mask = (pixels(images["mask_image"]) >= 0).float()  # white (1.0) = repaint, binarized
    with torch.no_grad():
        mean, std = latent_dist(pipe.vae, pixels(images["image"]) * (1 - mask))
        masked = conditioner.latents(pipe.vae, mean, std, g)  # ... then samples the masked image's latents
        hidden, ids = conditioner.transformer_inputs(
            pipe, noisy_of(pipe, kw["hidden_states"]), {"masked": masked, "mask": mask})
    assert hidden.shape == kw["hidden_states"].shape == (1, 64, 144)  # 64 + 64 + 4·2² channels
    torch.testing.assert_close(hidden, kw["hidden_states"], rtol=0, atol=1e-5)
    assert torch.equal(ids, kw["img_ids"])


def test_control_image_channels_as_in_the_pipeline():
    pipe = dl.build_tiny_pipeline("tiny-flux-control")
    images = input_images(pipe, SIZE)
    kw = captured(pipe, images)
    conditioner = conditioner_of(pipe)
    g = torch.Generator().manual_seed(0)  # the pipeline samples the control latents before its noise
    with torch.no_grad():
        mean, std = latent_dist(pipe.vae, pixels(images["control_image"]))
        control = conditioner.latents(pipe.vae, mean, std, g)
        hidden, ids = conditioner.transformer_inputs(pipe, noisy_of(pipe, kw["hidden_states"]), {"control": control})
    assert hidden.shape == kw["hidden_states"].shape == (1, 64, 128)
    torch.testing.assert_close(hidden, kw["hidden_states"], rtol=0, atol=1e-5)
    assert torch.equal(ids, kw["img_ids"])


@pytest.mark.parametrize("kind", ["tiny-flux-kontext", "tiny-flux-fill", "tiny-flux-control"])
def test_missing_or_foreign_image_input_is_a_config_error(kind):
    pipe = dl.build_tiny_pipeline(kind)
    with pytest.raises(dl.ConfigError, match="needs"):
        run_pipeline(pipe, "x", num_inference_steps=1, height=SIZE, width=SIZE)
    given = input_images(pipe, SIZE)
    foreign = "mask_image" if "control_image" in given else "control_image"
    images = {**given, foreign: next(iter(given.values()))}
    with pytest.raises(dl.ConfigError, match="takes no"):
        run_pipeline(pipe, "x", images=images, num_inference_steps=1, height=SIZE, width=SIZE)


def test_kontext_prediction_is_read_from_the_noisy_tokens_and_depends_on_the_reference():
    pipe = dl.build_tiny_pipeline("tiny-flux-kontext")
    conditioner = conditioner_of(pipe)
    text = conditioner.encode_text(pipe, ["a red square"], torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    noisy = torch.randn(1, 16, 16, 16, generator=g)
    reference = torch.randn(1, 16, 8, 12, generator=g)  # another size than the target: its own ids
    with torch.no_grad():
        args = (pipe, pipe.transformer, noisy, torch.tensor([500.0]), text, [None], 2.5)
        plain = conditioner.predict(*args)
        edited = conditioner.predict(*args, cond={"reference": reference})
        mixed = conditioner.predict(*args, cond={"references": [reference]})
    assert edited.shape == noisy.shape
    assert not torch.allclose(plain, edited)
    torch.testing.assert_close(mixed, edited, rtol=0, atol=0)


# ---------------------------------------------------------------- generate: --image / --mask / --control-image


@pytest.fixture(scope="module")
def input_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    pipe = dl.build_tiny_pipeline("tiny-flux-fill")
    paths = {}
    for name, img in input_images(pipe, SIZE).items():
        paths[name] = folder / f"{name}.png"
        img.save(paths[name])
    return paths


def _cli(kind, out, *extra):
    from diffusion_lora.cli import main

    return main(["generate", "--model", kind, "--prompt", "make it blue", "--steps", "2", "--height", "32",
                 "--width", "32", "--guidance", "2.5", "--out", str(out), *extra])


def test_generate_cli_edits_with_kontext_and_fills_with_a_mask(tmp_path, input_files):
    from PIL import Image

    assert _cli("tiny-flux-kontext", tmp_path / "k", "--image", str(input_files["image"])) == 0
    (png,) = (tmp_path / "k").glob("*.png")
    assert Image.open(png).size == (32, 32)  # the requested size, not Kontext's one-megapixel default
    assert _cli("tiny-flux-fill", tmp_path / "f", "--image", str(input_files["image"]),
                "--mask", str(input_files["mask_image"])) == 0
    assert len(list((tmp_path / "f").glob("*.png"))) == 1
    # the reference image matters: another one gives other pixels
    other = tmp_path / "other.png"
    Image.fromarray(np.full((32, 32, 3), 200, dtype=np.uint8)).save(other)
    assert _cli("tiny-flux-kontext", tmp_path / "k2", "--image", str(other)) == 0
    (png2,) = (tmp_path / "k2").glob("*.png")
    assert not np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(png2)))


def test_generate_api_takes_pil_images_and_matches_the_cli(tmp_path, input_files):
    from PIL import Image

    from diffusion_lora.generate import GenerationSettings, generate

    pipe = dl.build_tiny_pipeline("tiny-flux-kontext")
    settings = GenerationSettings(prompts=["make it blue"], steps=2, height=32, width=32, guidance=2.5,
                                  image=Image.open(input_files["image"]))
    (result,) = generate(pipe, settings, progress=False)
    assert _cli("tiny-flux-kontext", tmp_path, "--image", str(input_files["image"])) == 0
    (png,) = tmp_path.glob("*.png")
    assert np.array_equal(np.asarray(result.image), np.asarray(Image.open(png).convert("RGB")))


@pytest.mark.parametrize(("kind", "extra", "message"), [
    ("tiny-flux-kontext", (), "needs --image"),
    ("tiny-flux-fill", ("--image", "{image}"), "needs --mask"),
    ("tiny-flux", ("--image", "{image}"), "takes no --image"),
    ("tiny-flux-kontext", ("--image", "{image}", "--control-image", "{image}"), "takes no --control-image"),
    ("tiny-flux-kontext", ("--image", "{missing}"), "no such file"),
    ("tiny-flux-kontext", ("--image", "{text}"), "not a readable image"),
    ("tiny-flux-kontext", ("--image", "{folder}"), "is a directory"),
])
def test_generate_cli_refuses_bad_image_inputs_in_one_line(tmp_path, capsys, input_files, kind, extra, message):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    names = {"image": input_files["image"], "missing": tmp_path / "nope.png", "text": text, "folder": tmp_path}
    args = [a.format(**names) for a in extra]
    from diffusion_lora.cli import main

    code = main(["generate", "--model", kind, "--prompt", "x", "--steps", "1", "--height", "32", "--width", "32",
                 "--out", str(tmp_path / "out"), *args])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not list((tmp_path / "out").glob("*.png"))


def test_generate_refuses_an_oversized_input_before_decoding(tmp_path):
    from PIL import Image

    from diffusion_lora.models import image_inputs

    path = tmp_path / "big.png"
    Image.new("RGB", (64, 64)).save(path)
    with pytest.raises(dl.ConfigError, match="over the limit"):
        image_inputs.read_input_image(path, "image", max_pixels=32 * 32)


def test_kontext_inpainting_pipeline_takes_an_image_and_a_mask():
    from diffusers import FluxKontextInpaintPipeline

    kontext = dl.build_tiny_pipeline("tiny-flux-kontext")
    pipe = FluxKontextInpaintPipeline(**{k: v for k, v in kontext.components.items()
                                         if k in FluxKontextInpaintPipeline._optional_components
                                         or k in ("transformer", "vae", "text_encoder", "text_encoder_2",
                                                  "tokenizer", "tokenizer_2", "scheduler")})
    pipe.set_progress_bar_config(disable=True)
    assert detect_variant(pipe).name == "flux1-kontext-inpaint"
    images = input_images(dl.build_tiny_pipeline("tiny-flux-fill"), SIZE)  # an image and a mask
    with torch.no_grad():
        out = run_pipeline(pipe, "make it blue", images=images, num_inference_steps=2, height=SIZE, width=SIZE,
                           output_type="latent", generator=torch.Generator().manual_seed(0)).images
    assert torch.isfinite(out).all()
    with pytest.raises(dl.ConfigError, match="needs --mask"):
        run_pipeline(pipe, "x", images={"image": images["image"]}, num_inference_steps=1, height=SIZE, width=SIZE)
