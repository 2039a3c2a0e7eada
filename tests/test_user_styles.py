"""The held-out-style harness (toy.user_style): its references and one plain training run per seed.

Whether the embedded base learns the held-out styles is measured by bench/bench_user_styles.py (three
seeds, about 7 minutes a style on 2 cores); here only the harness itself is checked, with 2-step runs.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from PIL import Image
from safetensors.torch import load_file

from diffusion_lora.metrics import style_distance
from diffusion_lora.models.loading import load_pipeline
from diffusion_lora.toy import analysis
from diffusion_lora.toy.evaluate import caption_of, generate
from diffusion_lora.toy.styles import HELD_OUT_STYLES
from diffusion_lora.toy.user_style import learn_style, matched_references, style_prompts

SAMPLES = Path(__file__).resolve().parent.parent / "samples" / "datasets"
SETS = ("checker", "faded", "ink", "outline", "pastel", "stripes")


def _set(style: str) -> list[Image.Image]:
    return [Image.open(p) for p in sorted((SAMPLES / style).glob("*.png"))]


@pytest.mark.parametrize("style", HELD_OUT_STYLES)
def test_the_matched_references_draw_the_prompts_in_their_style(style):
    combos = style_prompts()
    refs = matched_references(style, combos)
    distances = {other: style_distance(refs, _set(other)).total for other in SETS}
    assert min(distances, key=distances.get) == style, distances
    shapes = sum(analysis.read_image(im).shape == c[2] for im, c in zip(refs, combos)) / len(combos)
    assert shapes >= 0.75  # faded's low-contrast shapes on taupe are the reader's hardest case


def test_learn_style_runs_the_plain_command_once_per_seed(tmp_path):
    pipe = load_pipeline("shapes-sd15")
    pipe.set_progress_bar_config(disable=True)
    result = learn_style(pipe, SAMPLES / "ink", tmp_path, seeds=(0, 3), extra_args=("--steps", "2"))
    assert [r.seed for r in result.runs] == [0, 3]
    for run in result.runs:
        cfg = tomllib.loads((run.adapter.parent / "config.toml").read_text())
        assert cfg["train"]["seed"] == run.seed and Path(cfg["data"]["path"]) == SAMPLES / "ink"
    a, b = (load_file(r.adapter) for r in result.runs)
    assert a.keys() == b.keys() and any((a[k] != b[k]).any() for k in a)
    # The base column is the pipeline without adapters, and every adapter was removed again.
    prompts = [caption_of(c) for c in style_prompts()]
    assert result.prompts == prompts
    again = generate(pipe, prompts, seed=1000)
    assert [im.tobytes() for im in again] == [im.tobytes() for im in result.images["base"]]
    matched = style_distance(result.images["base"], matched_references("ink", style_prompts())).total
    assert result.runs[1].distance["matched"]["base"] == pytest.approx(matched)
