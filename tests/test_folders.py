"""Loading adapters from folders: diffusers `save_lora_weights` output and PEFT `save_pretrained` output."""

from __future__ import annotations

import pytest
import torch

import diffusion_lora as dl

from .helpers import peft_folder, run, trained_adapter


def test_diffusers_lora_folder(make_pipe, tmp_path):
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    pipe = make_pipe("tiny-sd15")
    trained_adapter(pipe, "default", seed=50, rank=4)
    expected = run(pipe)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet, adapter_name="default"))
    type(pipe).save_lora_weights(tmp_path / "folder", unet_lora_layers=layers)
    fresh = make_pipe("tiny-sd15")
    assert dl.load_lora(fresh, tmp_path / "folder") == "folder"
    assert torch.equal(run(fresh), expected)


def test_peft_save_pretrained_folder(make_pipe, tmp_path):
    pipe = make_pipe("tiny-sd15")
    peft_model, _ = peft_folder(pipe, tmp_path)
    g = torch.Generator().manual_seed(52)
    assert (tmp_path / "peft" / "adapter_config.json").is_file()
    sample = torch.randn(1, 4, 8, 8, generator=g)
    context = torch.randn(1, 7, pipe.unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        expected = peft_model(sample, 10, encoder_hidden_states=context).sample
        dl.load_lora(pipe, tmp_path / "peft", name="p")
        got = pipe.unet(sample, 10, encoder_hidden_states=context).sample
    assert torch.equal(got, expected)
    (info,) = dl.list_loras(pipe)
    assert (info.rank, info.alpha) == (4, 6.0)


def test_folder_without_single_adapter_file_is_an_error(tmp_path, make_pipe):
    (tmp_path / "a.safetensors").write_bytes(b"")
    (tmp_path / "b.safetensors").write_bytes(b"")
    with pytest.raises(dl.FormatError, match="expected one adapter"):
        dl.load_lora(make_pipe("tiny-sd15"), tmp_path)


def _legacy_processor_key(key: str) -> str:
    """unet.…attn1.to_q.lora_A.weight → unet.…attn1.processor.to_q_lora.down.weight (diffusers ≤ 0.20)."""
    module, _, role = key.rpartition(".lora_")
    attn, _, proj = module.rpartition(".to_")
    proj = "out" if proj == "out.0" else proj
    return f"{attn}.processor.to_{proj}_lora.{'down' if role.startswith('A') else 'up'}.weight"


@pytest.mark.parametrize("style", ["processor", "lora_linear_layer"])
def test_legacy_diffusers_keys(make_pipe, tmp_path, style):
    from safetensors.torch import load_file, save_file

    pipe = make_pipe("tiny-sd15")
    trained_adapter(pipe, "x", seed=52, rank=4)  # alpha = rank: legacy files had no alpha
    expected = run(pipe)
    tensors = load_file(str(dl.save_lora(pipe, "x", tmp_path / "x.safetensors")))
    if style == "processor":
        legacy = {_legacy_processor_key(k): v for k, v in tensors.items()}
    else:
        legacy = {k.replace(".lora_A.", ".lora_linear_layer.down.").replace(".lora_B.", ".lora_linear_layer.up."): v
                  for k, v in tensors.items()}
    save_file(legacy, str(tmp_path / "legacy.safetensors"))
    fresh = make_pipe("tiny-sd15")
    dl.load_lora(fresh, tmp_path / "legacy.safetensors")
    assert torch.equal(run(fresh), expected)
