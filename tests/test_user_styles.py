"""The held-out-style harness (toy.user_style): its references and one plain training run per seed.

Whether the embedded base learns the held-out styles is measured by bench/bench_user_styles.py (three
seeds, about 7 minutes a style on 2 cores); here only the harness itself is checked, with 2-step runs.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffusion_lora.metrics import style_distance
from diffusion_lora.models.loading import load_pipeline
from diffusion_lora.toy import analysis
from diffusion_lora.toy.evaluate import caption_of, generate, reconstruction, round_trip
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
    refs = matched_references("ink", style_prompts())
    matched = style_distance(result.images["base"], refs).total
    assert result.runs[1].distance["matched"]["base"] == pytest.approx(matched)
    # The decoder's limit: the matched references through the VAE (posterior mean, 8-bit), against them.
    x = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)
                     for im in refs]) / 127.5 - 1
    with torch.no_grad():
        y = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample
    y = ((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    decoded = style_distance([Image.fromarray(a) for a in y], refs).total
    # (tolerance: the reference batches in another memory layout, which moves a few pixels by one level)
    assert result.decoder_ceiling == pytest.approx(1 - decoded / matched, abs=2e-3)
    # The shipped decoder cannot draw ink's look: no LoRA closes half the gap to the matched references.
    assert result.decoder_ceiling < 0.5


def test_round_trip_is_what_reconstruction_measures():
    vae = load_pipeline("shapes-sd15").vae
    images = _set("stripes")[:6]
    back = round_trip(vae, images, batch=4)
    assert [im.size for im in back] == [im.size for im in images]
    x = np.stack([np.asarray(im.convert("RGB"), dtype=np.float64) for im in images])
    mae = np.abs(np.stack([np.asarray(b, dtype=np.float64) for b in back]) - x).mean()
    assert reconstruction(vae, images, batch=5).mae == pytest.approx(mae)
    assert mae < 8  # a style the decoder was trained on comes back close
