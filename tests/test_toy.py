"""The toy world: deterministic scenes, an exact pixel reader, the style metric, the sample sets."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from diffusion_lora.metrics import image_stats, style_distance
from diffusion_lora.toy import analysis, scenes, styles
from diffusion_lora.toy.datasets import SAMPLE_SETS, character_scenes, style_scenes, write_set

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def _scenes(n: int, seed: int, style: str = "plain") -> list[scenes.Scene]:
    rng = random.Random(seed)
    return [scenes.random_scene(rng, style=style) for _ in range(n)]


def test_rendering_is_deterministic_and_seeded():
    a = [scenes.render(s).tobytes() for s in _scenes(5, seed=1)]
    b = [scenes.render(s).tobytes() for s in _scenes(5, seed=1)]
    c = [scenes.render(s).tobytes() for s in _scenes(5, seed=2)]
    assert a == b
    assert a != c


def test_held_out_combos_never_train():
    held, train = scenes.held_out_combos(), scenes.training_combos()
    assert len(held) == 100 and len(set(held)) == 100
    assert not set(held) & set(train)
    assert sorted(held + train) == sorted(scenes.all_combos())
    # every colour and every shape still appears in training
    assert {c[1] for c in train} == set(scenes.COLOURS) and {c[2] for c in train} == set(scenes.SHAPES)


def test_reader_is_exact_on_plain_scenes():
    items = _scenes(150, seed=3)
    readings = [analysis.read_image(scenes.render(s)) for s in items]
    assert [r.shape for r in readings] == [s.shape for s in items]
    assert [r.colour for r in readings] == [s.colour for s in items]


def test_reader_sees_outlines_as_their_shape_and_finds_the_mascot():
    items = _scenes(60, seed=4, style="outline")
    correct = sum(analysis.read_image(scenes.render(s)).shape == s.shape for s in items)
    assert correct >= 54  # thin small outlines of stars and circles are sometimes confused
    mascots = character_scenes(30, seed=5)
    shapes = scenes.SHAPES + (styles.MASCOT,)
    assert all(analysis.read_image(scenes.render(m), shapes=shapes).shape == styles.MASCOT for m in mascots)
    # and no plain shape is read as the mascot
    plain = _scenes(60, seed=6)
    assert not any(analysis.read_image(scenes.render(s), shapes=shapes).shape == styles.MASCOT for s in plain)


def test_reader_reports_an_empty_image_as_nothing():
    reading = analysis.read_image(Image.new("RGB", (64, 64), (245, 245, 245)))
    assert reading.shape is None and reading.colour is None and reading.area == 0


def test_metric_is_zero_for_a_set_against_itself_and_symmetric():
    base = [scenes.render(s) for s in _scenes(12, seed=6)]
    outline = [scenes.render(s) for s in _scenes(12, seed=6, style="outline")]
    assert style_distance(base, base).total == 0.0
    ab, ba = style_distance(base, outline), style_distance(outline, base)
    assert ab.total == pytest.approx(ba.total)


@pytest.mark.parametrize("style", ["outline", "stripes", "pastel"])
def test_metric_separates_each_sample_style_from_the_base_look(style):
    reference = [Image.open(p) for p in sorted((SAMPLES / "datasets" / style).glob("*.png"))]
    base = [scenes.render(s) for s in _scenes(40, seed=7)]
    same_style = [scenes.render(s) for s in style_scenes(style, 40, seed=8)]
    assert style_distance(same_style, reference).total < 0.5 * style_distance(base, reference).total


def test_solidity_matches_hand_computed_areas():
    square = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(square).rectangle((10, 10, 29, 29), fill=(200, 0, 0))  # 20×20 = 400 px, its own hull
    assert image_stats([square]).solidity == pytest.approx(1.0)
    ring = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(ring).rectangle((10, 10, 29, 29), outline=(200, 0, 0), width=2)  # 400 - 16² = 144 px
    assert image_stats([ring]).solidity == pytest.approx(144 / 400)


def test_colour_term_is_the_total_variation_of_saturation_value_histograms():
    red = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(red).rectangle((8, 8, 40, 40), fill=(255, 0, 0))  # S=255, V=255: bin (3, 3)
    pale = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(pale).rectangle((8, 8, 40, 40), fill=(255, 200, 200))  # S≈55, V=255: bin (0, 3)
    assert style_distance([red], [pale]).colour == pytest.approx(1.0)
    hist = image_stats([red]).histogram
    assert hist[3 * 4 + 3] == pytest.approx(1.0)


@pytest.mark.parametrize("name", sorted(SAMPLE_SETS))
def test_sample_datasets_are_what_the_script_writes(tmp_path, name):
    kind, style = SAMPLE_SETS[name]
    items = character_scenes() if kind == "character" else style_scenes(style)
    written = write_set(tmp_path, items)
    shipped = sorted((SAMPLES / "datasets" / name).glob("*.png"))
    assert [p.name for p in written] == [p.name for p in shipped]
    assert 10 <= len(shipped) <= 30
    for new, old in zip(written, shipped):
        assert np.array_equal(np.asarray(Image.open(new)), np.asarray(Image.open(old)))
        assert new.with_suffix(".txt").read_text() == old.with_suffix(".txt").read_text()
