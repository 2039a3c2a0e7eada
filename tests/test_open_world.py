"""The open world of the embedded base: generic picture families, natural captions, held-out sets kept out."""

from __future__ import annotations

import hashlib
import random
import re

import numpy as np
import pytest
from PIL import Image

from diffusion_lora.toy import open_world, scenes, styles, world
from diffusion_lora.toy.datasets import SAMPLE_SETS, style_scenes
from diffusion_lora.toy.shapes import COLOURS, SHAPES


def _digest(image: Image.Image | np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(np.asarray(image)).tobytes()).hexdigest()


@pytest.mark.parametrize("family", [f for f in world.FAMILIES if "photo" not in f])
def test_every_family_renders_64px_rgb_deterministically_and_varies_with_the_seed(family):
    first = [world.render_family(family, np.random.default_rng(5), jitter=j) for j in (False, True)]
    again = [world.render_family(family, np.random.default_rng(5), jitter=j) for j in (False, True)]
    other = world.render_family(family, np.random.default_rng(6))
    for (a, cap_a), (b, cap_b) in zip(first, again):
        assert a.shape == (64, 64, 3) and a.dtype == np.uint8
        assert np.array_equal(a, b) and cap_a == cap_b and cap_a.strip()
    assert not np.array_equal(first[0][0], other[0])
    assert first[0][0].std() > 1.0  # a picture, not a flat fill


def test_named_colours_in_captions_are_the_colours_drawn():
    """Two-colour families name their colours; the named colours are what the image holds (no jitter)."""
    rng = np.random.default_rng(0)
    for family in ("stripes", "checks", "gradient"):
        for _ in range(5):
            image, caption = world.render_family(family, rng)
            names = [n for n in world.NAMED_COLOURS if re.search(rf"\b{n}\b", caption)]
            assert len(names) == 2, caption
            pixels = image.reshape(-1, 3).astype(int)
            for name in names:
                nearest = np.abs(pixels - np.array(world.NAMED_COLOURS[name])).sum(axis=1).min()
                assert nearest <= 12, (caption, name, nearest)


def test_held_out_sets_are_disjoint_from_training_by_name():
    assert not set(world.TRAINING_FAMILIES) & set(world.HELD_OUT_FAMILIES)
    assert not set(styles.STYLES) & set(styles.HELD_OUT_STYLES)
    assert not set(world.TRAINING_PHOTOS) & set(world.HELD_OUT_PHOTOS)
    assert {SAMPLE_SETS[s][1] for s in styles.HELD_OUT_STYLES} == set(styles.HELD_OUT_STYLES)


def test_base_training_streams_never_yield_a_held_out_style_or_family():
    """Thousands of items of both training streams (VAE and UNet): every one is a base style or a training
    family, and no image is pixel-equal to a held-out style set's image or a held-out family's test image."""
    combos = scenes.training_combos()
    families = open_world.base_families(photos=False)
    held_out_images = {_digest(scenes.render(s)) for st in styles.HELD_OUT_STYLES for s in style_scenes(st)}
    held_out_images |= {_digest(im) for f in world.HELD_OUT_FAMILIES if f != "held-out photos"
                        for im in world.held_out_images(f, 16)}
    rng = random.Random(0)
    seen_styles, seen_families = set(), set()
    for i in range(1500):
        item = (open_world.vae_item(rng, combos, families, 0.35) if i % 2
                else open_world.unet_item(rng, combos, families, 0.7, 0.4))
        (seen_styles if item.kind == "scene" else seen_families).add(item.name)
        assert _digest(item.image) not in held_out_images
    assert seen_styles == set(styles.STYLES)  # the VAE sees every base style (and only those)
    assert seen_families == set(families)
    assert not seen_families & set(world.HELD_OUT_FAMILIES)


@pytest.mark.parametrize("name", [*styles.HELD_OUT_STYLES, "rings", "held-out photos"])
def test_check_trainable_refuses_held_out_items(name):
    kind = "scene" if name in styles.HELD_OUT_STYLES else "family"
    item = open_world.Item(kind, name, "x", Image.new("RGB", (64, 64)))
    with pytest.raises(ValueError, match="held out of base training"):
        open_world.check_trainable(item)


def test_every_caption_variant_names_the_colour_and_a_word_for_the_shape():
    shape_words = {"circle": ("circle", "disc", "round dot"), "square": ("square", "box"),
                   "triangle": ("triangle",), "star": ("star",)}
    rng = random.Random(3)
    forms = set()
    for _ in range(600):
        scene = scenes.random_scene(rng)
        text = scenes.caption_variant(scene, rng)
        assert re.search(rf"\b{scene.colour}\b", text), text
        assert any(w in text for w in shape_words[scene.shape]), text
        assert not any(re.search(rf"\b{c}\b", text) for c in COLOURS if c != scene.colour), text
        assert not re.search(r"\ba [aeiou]", text), text  # "an orange star", never "a orange star"
        forms.add(re.sub(r"\b(" + "|".join(list(COLOURS) + list(SHAPES)) + r")\b", "_", text))
    assert len(forms) > 20  # many wordings, not one template
    mascot = scenes.Scene(styles.MASCOT, styles.MASCOT_COLOUR, "small", "white", 32, 32)
    assert scenes.caption_variant(mascot, rng) == mascot.caption


def test_a_rewording_stands_for_the_template_with_what_it_leaves_out_set_to_a_default():
    """scenes.reworded: the template caption keeps the scene's colour and shape, the size and background
    the rewording names, and for what it leaves out the first default a training combo allows (a short
    prompt means a medium shape on white where that combo is trained)."""
    size_words = {"small": ("small", "little", "tiny"), "medium": ("medium", "mid-sized"),
                  "large": ("large", "big", "huge")}
    bg_words = {"white": ("white",), "black": ("black",), "gray": ("gray", "grey")}
    combos = scenes.training_combos()
    rng, words = random.Random(4), random.Random(5)
    short = 0
    for _ in range(800):
        scene = scenes.random_scene(rng, combos)
        state = words.getstate()
        text, template = scenes.reworded(scene, words, combos)
        words.setstate(state)
        assert scenes.caption_variant(scene, words) == text  # the same draw
        m = re.fullmatch(r"a (small|medium|large) (\w+) (\w+) on a (white|black|gray) background", template)
        assert m, template
        size, colour, shape, bg = m.groups()
        assert (colour, shape) == (scene.colour, scene.shape) and (size, colour, shape, bg) in combos
        names_size = any(re.search(rf"\b{w}\b", text) for ws in size_words.values() for w in ws)
        names_bg = any(re.search(rf"\b{w}\b", text) for ws in bg_words.values() for w in ws)
        if names_size:
            assert size == scene.size, (text, template)
        if names_bg:
            assert bg == scene.background, (text, template)
        if not names_size and not names_bg:
            short += 1
            defaults = [(z, b) for b in ("white", "gray", "black") for z in ("medium", "large", "small")
                        if (z, colour, shape, b) in combos]
            assert (size, bg) == defaults[0], (text, template)
    assert short > 100
    mascot = scenes.Scene(styles.MASCOT, styles.MASCOT_COLOUR, "small", "white", 32, 32)
    assert scenes.reworded(mascot, words) == (mascot.caption, mascot.caption)


def test_the_photo_family_needs_scikit_image_and_says_so(monkeypatch):
    monkeypatch.setattr(world, "_photo_dir", lambda: None)
    with pytest.raises(RuntimeError, match="pip install scikit-image"):
        open_world.base_families(photos=True)
    assert "photos" not in open_world.base_families(photos=False)


def test_reconstruction_error_matches_a_direct_computation():
    """evaluate.reconstruction against the same numbers computed here from the VAE's own outputs, on the
    shipped VAE (toy scenes: 1.7–4.6 mean absolute error in the README's table)."""
    import math

    import torch

    from diffusion_lora.models.loading import load_pipeline
    from diffusion_lora.toy.evaluate import reconstruction

    vae = load_pipeline("shapes-sd15").vae
    rng = random.Random(9)
    images = [scenes.render(scenes.random_scene(rng)) for _ in range(5)] + world.held_out_images("plaid", 3)
    x = torch.tensor(np.stack([np.asarray(im, dtype=np.float32) for im in images])).permute(0, 3, 1, 2)
    with torch.no_grad():
        out = vae.decode(vae.encode(x / 127.5 - 1).latent_dist.mean).sample
    y = torch.round((out.clamp(-1, 1) + 1) * 127.5)
    mae = float((y - x).abs().mean())
    psnr = 10 * math.log10(255**2 / float(((y - x) ** 2).mean()))
    got = reconstruction(vae, images, batch=3)  # batches of 3: the same as one batch of 8
    assert got.mae == pytest.approx(mae, rel=1e-4) and got.psnr == pytest.approx(psnr, rel=1e-4)
    scenes_only = reconstruction(vae, images[:5])
    assert scenes_only.mae < got.mae and scenes_only.mae <= 6.0
