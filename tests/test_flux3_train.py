"""Training on tiny-flux3 through the one trainer: resume bit-identity, text/latent caches, samples through
the modular pipeline, captions whose text windows differ within a batch, and the refusals."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import diffusion_lora as dl

from .test_train import config, make_dataset

MODEL = "tiny-flux3"
LONG = ", ".join(["a small red circle on a white background"] * 10)  # a 160-token Qwen3-VL window


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = make_dataset(tmp_path_factory.mktemp("flux3data"), n=4)
    (root / "img1.txt").write_text(LONG, encoding="utf-8")  # batches mix 80- and 160-token windows
    return root


def _cfg(data, out, **sections):
    sections.setdefault("train", {})
    sections["train"] = {"steps": 6, "batch_size": 2, **sections["train"]}
    return config(data, out, model=MODEL, **sections)


def test_resume_is_bit_identical(data, tmp_path):
    straight = dl.train(_cfg(data, tmp_path / "a", checkpoint={"every": 3}), progress=False)
    cfg = _cfg(data, tmp_path / "b", checkpoint={"every": 3})
    first = dl.train(cfg, progress=False, max_steps_this_run=3)
    assert first.adapter is None
    resumed = dl.train(cfg, progress=False, resume=True)
    a, b = load_file(str(straight.adapter)), load_file(str(resumed.adapter))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert straight.losses[3:] == resumed.losses
    assert all(k.startswith("transformer.") for k in a)


def test_cached_and_uncached_text_and_latents_give_the_same_losses(data, tmp_path):
    memory = dl.train(_cfg(data, tmp_path / "m"), progress=False)
    off = dl.train(_cfg(data, tmp_path / "o", cache={"latents": "off", "text": "off"}), progress=False)
    disk = dl.train(_cfg(data, tmp_path / "d", cache={"latents": "disk", "text": "disk"}), progress=False)
    assert memory.losses == off.losses == disk.losses
    assert list((tmp_path / "d" / "cache" / "text").glob("*.safetensors"))


def test_samples_are_drawn_through_the_modular_pipeline(data, tmp_path):
    cfg = _cfg(data, tmp_path / "out", train={"steps": 2},
               sample={"every": 2, "prompts": ["a red circle", LONG], "seeds": [0], "steps": 2})
    dl.train(cfg, progress=False)
    (grid,) = (tmp_path / "out" / "samples").glob("*.png")
    assert Image.open(grid).size[0] == 64


def test_text_encoder_lora_is_refused_before_training(data, tmp_path):
    with pytest.raises(dl.ConfigError, match="lora.text_encoder"):
        dl.train(_cfg(data, tmp_path / "t", lora={"text_encoder": True}), progress=False)
    assert not (tmp_path / "t" / "style.safetensors").exists()
