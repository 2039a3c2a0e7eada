"""Training frees the text encoders once every caption and sample prompt is encoded.

The reference for "nothing changed" is the same run with the encoders kept: bit-identical losses,
adapter tensors and sample images.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import diffusion_lora as dl
from diffusion_lora.errors import ConfigError, DiffusionLoraError
from diffusion_lora.families import detect_family
from diffusion_lora.training.outputs import sample_image
from diffusion_lora.training.text_encoders import free_text_encoders

from .test_train import config, make_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), n=2)


def _sample_config(tmp_path, kind):
    values = config(tmp_path, tmp_path / "o", model=kind, data={"resolution": 32, "min_bucket": 32},
                    sample={"prompts": ["a red circle"], "steps": 2})
    return dl.training.load_config(values)


def test_freed_encoders_answer_recorded_prompts_with_the_same_images(make_pipe, tiny_kind, tmp_path):
    pipe = make_pipe(tiny_kind)
    if not callable(getattr(pipe, "encode_prompt", None)):
        pytest.skip(f"{tiny_kind} encodes prompts in its blocks; the trainer keeps its encoders")
    cfg = _sample_config(tmp_path, tiny_kind)
    before = sample_image(pipe, cfg, "a red circle", 3)
    device, dtype = pipe.device, pipe.dtype
    seen = []
    freed = free_text_encoders(pipe, detect_family(pipe), seen.append, {"b", "a"},
                               [lambda: sample_image(pipe, cfg, "a red circle", 0)])
    assert seen == ["a", "b"]
    family = detect_family(pipe)
    assert freed == tuple(c for c in family.text_encoders if getattr(pipe, c, None) is not None)
    for name in freed:
        assert sum(p.numel() for p in getattr(pipe, name).parameters()) == 0
    assert (pipe.device, pipe.dtype) == (device, dtype)
    after = sample_image(pipe, cfg, "a red circle", 3)  # another seed: only the encoding was recorded
    assert list(after.getdata()) == list(before.getdata())
    with pytest.raises(DiffusionLoraError, match="cache.text_encoders"):
        sample_image(pipe, cfg, "a blue circle", 0)


def test_training_with_freed_encoders_is_bit_identical_to_keeping_them(dataset, tmp_path):
    runs = {}
    for mode in ("keep", "free"):
        cfg = config(dataset, tmp_path / mode, model="tiny-flux", train={"steps": 3, "batch_size": 1},
                     data={"resolution": 32, "min_bucket": 32}, cache={"text_encoders": mode},
                     sample={"every": 2, "prompts": ["a red circle", "a blue circle"], "steps": 2, "seeds": [0, 1]})
        runs[mode] = dl.train(cfg, progress=False)
    keep, free = runs["keep"], runs["free"]
    assert keep.freed_text_encoders == () and free.freed_text_encoders == ("text_encoder", "text_encoder_2")
    assert keep.losses == free.losses
    a, b = load_file(str(keep.adapter)), load_file(str(free.adapter))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for step in ("step_000002.png", "step_000003.png"):
        grid_keep = Image.open(tmp_path / "keep" / "samples" / step)
        assert list(grid_keep.getdata()) == list(Image.open(tmp_path / "free" / "samples" / step).getdata())


def test_auto_frees_by_default_and_keeps_when_captions_change(dataset, tmp_path):
    auto = dl.train(config(dataset, tmp_path / "a", train={"steps": 1, "batch_size": 1}), progress=False)
    assert auto.freed_text_encoders == ("text_encoder",)
    shuffled = dl.train(config(dataset, tmp_path / "s", train={"steps": 1, "batch_size": 1},
                               data={"shuffle_captions": True}), progress=False)
    assert shuffled.freed_text_encoders == ()
    trained = dl.train(config(dataset, tmp_path / "t", train={"steps": 1, "batch_size": 1},
                              lora={"text_encoder": True}), progress=False)
    assert trained.freed_text_encoders == ()


def test_free_refuses_when_the_encoders_are_still_needed(dataset, tmp_path):
    cfg = config(dataset, tmp_path / "o", train={"steps": 1}, data={"shuffle_captions": True},
                 cache={"text_encoders": "free"})
    with pytest.raises(ConfigError, match="shuffle_captions"):
        dl.train(cfg, progress=False)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").rglob("*.safetensors"))
