"""CLIP module paths spelled with and without ``text_model.`` (transformers 4 vs 5) in diffusers-format
files: every reader and writer takes both (issue 12, item 3.1)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import diffusion_lora as dl
from diffusion_lora.adapters.keys import model_keys_of
from diffusion_lora.adapters.state import state_of
from diffusion_lora.formats.safetensors_io import read_metadata
from diffusion_lora.tools.convert import convert_file
from diffusion_lora.tools.inspect import inspect_file
from diffusion_lora.tools.merge import merge_files
from diffusion_lora.tools.resize import resize_file

from .helpers import assert_near, run, trained_adapter

WRAP = "text_model."


def _respell(key: str) -> str:
    """The other spelling of a text-encoder key: add ``text_model.`` where the model has none, drop it
    where it has one (transformers 5: CLIPTextModel has none, CLIPTextModelWithProjection keeps it)."""
    component, _, rest = key.partition(".")
    if not component.startswith("text_encoder"):
        return key
    return f"{component}.{rest[len(WRAP):]}" if rest.startswith(WRAP) else f"{component}.{WRAP}{rest}"


@pytest.fixture(params=["tiny-sd15", "tiny-sdxl"])
def respelled(request, make_pipe, tmp_path):
    """(kind, file whose CLIP keys use the other spelling, the source pipeline's output)."""
    kind = request.param
    pipe = make_pipe(kind)
    trained_adapter(pipe, "s", seed=81, rank=2, alpha=3, text_encoder=True)
    path = dl.save_lora(pipe, "s", tmp_path / "ours.safetensors")
    tensors = load_file(str(path))
    other = {_respell(k): v for k, v in tensors.items()}
    assert sum(k != _respell(k) for k in tensors) > 0 and other.keys() != tensors.keys()
    out = tmp_path / "other.safetensors"
    save_file(other, str(out), metadata=read_metadata(path))
    return kind, out, run(pipe)


def _loads_to(make_pipe, kind, path, expected):
    fresh = make_pipe(kind)
    dl.load_lora(fresh, path)
    assert_near(run(fresh), expected, rel=1e-5)


def test_load_reads_the_other_spelling(respelled, make_pipe):
    kind, path, expected = respelled
    _loads_to(make_pipe, kind, path, expected)


@pytest.mark.parametrize("to", ["kohya", "comfyui", "diffusers"])
def test_convert_writes_every_format_from_the_other_spelling(respelled, make_pipe, tmp_path, to):
    kind, path, expected = respelled
    out = convert_file(path, tmp_path / f"c-{to}.safetensors", to, pipe=make_pipe(kind))
    text = [k for k in load_file(str(out)) if "text" in k or "_te" in k]
    assert text, "the text-encoder modules were dropped"
    _loads_to(make_pipe, kind, out, expected)


def test_merge_resize_and_inspect_take_the_other_spelling(respelled, make_pipe, tmp_path):
    kind, path, expected = respelled
    keys = model_keys_of(state_of(make_pipe(kind)))
    merged = tmp_path / "m.safetensors"
    merge_files([(path, 1.0)], merged, keys=keys, to="kohya")
    _loads_to(make_pipe, kind, merged, expected)
    resized = tmp_path / "r.safetensors"
    resize_file(path, resized, rank=2, keys=keys)
    _loads_to(make_pipe, kind, resized, expected)
    assert inspect_file(path).components.keys() >= {"text_encoder", "unet"}


def test_both_spellings_of_one_module_is_ambiguous(make_pipe, tmp_path):
    pipe = make_pipe("tiny-sd15")
    trained_adapter(pipe, "s", seed=82, rank=2, text_encoder=True)
    tensors = load_file(str(dl.save_lora(pipe, "s", tmp_path / "s.safetensors")))
    key = next(k for k in tensors if k.startswith("text_encoder.") and k.endswith("q_proj.lora_A.weight"))
    both = dict(tensors)
    for k in (key, key.replace("lora_A", "lora_B")):
        both[_respell(k)] = tensors[k].clone()
    save_file(both, str(tmp_path / "both.safetensors"))
    with pytest.raises(dl.FormatError, match="with and without 'text_model.'"):
        dl.load_lora(make_pipe("tiny-sd15"), tmp_path / "both.safetensors")


def test_convert_refuses_a_module_the_model_lacks_instead_of_copying_it(make_pipe, tmp_path):
    """Before, ``--to diffusers`` copied an unknown module into the output unchecked."""
    pipe = make_pipe("tiny-sd15")
    trained_adapter(pipe, "s", seed=83, rank=2)
    tensors = load_file(str(dl.save_lora(pipe, "s", tmp_path / "s.safetensors")))
    tensors["unet.no_such.layer.lora_A.weight"] = torch.ones(2, 4)
    tensors["unet.no_such.layer.lora_B.weight"] = torch.ones(4, 2)
    save_file(tensors, str(tmp_path / "extra.safetensors"))
    for to in ("diffusers", "kohya"):
        out = tmp_path / f"out-{to}.safetensors"
        with pytest.raises(dl.KeyMappingError, match="unet.no_such.layer: the model has no Linear/Conv2d layer"):
            convert_file(tmp_path / "extra.safetensors", out, to, pipe=make_pipe("tiny-sd15"))
        assert not out.exists()
