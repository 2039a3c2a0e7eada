"""convert / merge / resize on bad files: our error, nothing written, existing outputs untouched."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import diffusion_lora as dl
from diffusion_lora.adapters.keys import model_keys_of
from diffusion_lora.adapters.state import state_of
from diffusion_lora.cli import main
from diffusion_lora.formats.adapter_data import MAX_DELTA_ELEMENTS
from diffusion_lora.formats.safetensors_io import read_metadata
from diffusion_lora.tools.convert import convert_file
from diffusion_lora.tools.merge import merge_files
from diffusion_lora.tools.resize import resize_file

from .helpers import trained_adapter


@pytest.fixture(scope="module")
def setup(tmp_path_factory):

    pipe = dl.build_tiny_pipeline("tiny-sd15")
    trained_adapter(pipe, "good", seed=90, rank=4)
    root = tmp_path_factory.mktemp("faults")
    good = dl.save_lora(pipe, "good", root / "good.safetensors")
    return root, good, model_keys_of(state_of(pipe))


def _broken(root, good, case):
    tensors, meta = load_file(str(good)), read_metadata(good)
    key = next(k for k in sorted(tensors) if "lora_B" in k)
    if case == "nan":
        tensors[key] = tensors[key].clone()
        tensors[key][0, 0] = float("nan")
    elif case == "shape":
        tensors[key] = torch.zeros(tensors[key].shape[0] + 5, tensors[key].shape[1])
    elif case == "rank":
        a = key.replace("lora_B", "lora_A")
        tensors[a] = torch.zeros(300, tensors[a].shape[1])
        tensors[key] = torch.zeros(tensors[key].shape[0], 300)
    path = root / f"{case}.safetensors"
    save_file(tensors, str(path), metadata=meta)
    return path


TOOLS = {
    "convert": lambda src, out, keys: convert_file(src, out, "kohya", pipe=_pipe()),
    "merge": lambda src, out, keys: merge_files([(src, 1.0)], out, keys=keys),
    "merge-svd": lambda src, out, keys: merge_files([(src, 0.5)], out, method="svd", rank=2, keys=keys),
    "resize": lambda src, out, keys: resize_file(src, out, rank=2, keys=keys),
}


@pytest.mark.parametrize("case,error,words", [
    ("nan", dl.FormatError, "NaN"),
    ("shape", dl.KeyMappingError, "lora_B"),
    ("rank", dl.KeyMappingError, "rank 300"),
])
@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_bad_input_is_refused_and_the_existing_output_is_kept(setup, tmp_path, tool, case, error, words):
    root, good, keys = setup
    bad = _broken(root, good, case)
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"previous contents")
    with pytest.raises(error) as err:
        TOOLS[tool](bad, out, keys)
    assert words.lower() in str(err.value).lower()
    assert str(bad) in str(err.value)
    assert out.read_bytes() == b"previous contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]  # no temp file left


_PIPE = []


def _pipe():
    if not _PIPE:

        _PIPE.append(dl.build_tiny_pipeline("tiny-sd15"))
    return _PIPE[0]


def test_factors_that_multiply_out_to_an_absurd_delta_are_refused_before_allocating(tmp_path):
    # A LoKr file of a few KB whose Kronecker product would be 2^15 × 2^15 = 4 GiB of float32.
    w1 = torch.ones(256, 256)
    w2a, w2b = torch.ones(128, 1), torch.ones(1, 128)
    path = tmp_path / "bomb.safetensors"
    prefix = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{prefix}.lokr_w1": w1, f"{prefix}.lokr_w2_a": w2a, f"{prefix}.lokr_w2_b": w2b,
               f"{prefix}.alpha": torch.tensor(1.0)}, str(path))
    assert 256 * 128 * 256 * 128 > MAX_DELTA_ELEMENTS
    pipe = _pipe()
    with pytest.raises(dl.FormatError, match="larger than any layer"):
        dl.load_lora(pipe, path)
    assert dl.list_loras(pipe) == []


def test_cli_merge_and_resize_read_pickles_only_when_allowed(setup, tmp_path, capsys):
    root, good, _ = setup
    pickled = tmp_path / "good.ckpt"
    torch.save(load_file(str(good)), pickled)
    out = tmp_path / "merged.safetensors"
    assert main(["merge", str(pickled), "-o", str(out), "--model", "tiny-sd15"]) != 0
    assert "pickle" in capsys.readouterr().err.lower() and not out.exists()
    assert main(["merge", str(pickled), "-o", str(out), "--model", "tiny-sd15", "--allow-pickle"]) == 0
    assert out.exists()
    small = tmp_path / "small.safetensors"
    assert main(["resize", str(pickled), "-o", str(small), "--rank", "2", "--model", "tiny-sd15"]) != 0
    assert not small.exists()
    args = ["resize", str(pickled), "-o", str(small), "--rank", "2", "--model", "tiny-sd15"]
    assert main([*args, "--allow-pickle"]) == 0
    assert small.exists()
