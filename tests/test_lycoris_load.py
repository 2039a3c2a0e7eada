"""LyCORIS files through load_lora, against the lycoris-lora package's own forward as the oracle."""

from __future__ import annotations

import pytest
import torch
from lycoris.kohya import create_network

import diffusion_lora as dl

from .helpers import assert_same_state, model_state

PRESET = """
enable_conv = true
unet_target_module = ["Transformer2DModel"]
unet_target_name = []
text_encoder_target_module = ["CLIPAttention"]
"""


def _lycoris_file(tmp_path, make_pipe, algo_args):
    pipe = make_pipe("tiny-sd15")
    preset = tmp_path / "preset.toml"
    preset.write_text(PRESET)
    torch.manual_seed(0)
    network = create_network(1.0, 4, 3, None, pipe.text_encoder, pipe.unet, conv_dim=4, conv_alpha=2,
                             preset=str(preset), **algo_args)
    network.apply_to(pipe.text_encoder, pipe.unet, apply_text_encoder=True, apply_unet=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in network.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    path = tmp_path / "lyco.safetensors"
    network.save_weights(str(path), torch.float32, {})
    return pipe, path, len(network.loras)


def _outputs(pipe):
    g = torch.Generator().manual_seed(2)
    sample = torch.randn(1, 4, 8, 8, generator=g)
    ids = torch.randint(0, 200, (1, 12), generator=g)
    with torch.no_grad():
        context = pipe.text_encoder(ids)[0]
        return context, pipe.unet(sample, 10, encoder_hidden_states=context).sample


@pytest.mark.parametrize(
    "algo_args",
    [{"algo": "loha"}, {"algo": "loha", "use_tucker": True}, {"algo": "lokr", "decompose_both": True},
     {"algo": "lokr", "factor": 4}, {"algo": "full"}],
    ids=["loha", "loha-tucker", "lokr", "lokr-factor", "full-with-bias"],
)
def test_lycoris_file_loads_exactly(tmp_path, make_pipe, algo_args):
    lyco_pipe, path, count = _lycoris_file(tmp_path, make_pipe, algo_args)
    expected_context, expected = _outputs(lyco_pipe)
    pipe = make_pipe("tiny-sd15")
    base_context, base = _outputs(pipe)
    dl.load_lora(pipe, path)
    context, out = _outputs(pipe)
    assert dl.list_loras(pipe)[0].modules == count
    assert not torch.allclose(out, base)
    torch.testing.assert_close(context, expected_context, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_bias_delta_fuses_and_saves(tmp_path, make_pipe):
    """A LyCORIS full file (with diff_b) fuses exactly, round-trips in diffusers format, and is
    refused, with nothing written, by formats that cannot carry a bias."""
    _, path, _ = _lycoris_file(tmp_path, make_pipe, {"algo": "full"})
    pipe = make_pipe("tiny-sd15")
    before = model_state(pipe)
    name = dl.load_lora(pipe, path)
    _, unfused = _outputs(pipe)
    dl.fuse(pipe)
    _, fused = _outputs(pipe)
    torch.testing.assert_close(fused, unfused, rtol=1e-4, atol=1e-4 * float(unfused.abs().max()))
    dl.unfuse(pipe)
    saved = dl.save_lora(pipe, name, tmp_path / "full.safetensors")
    fresh = make_pipe("tiny-sd15")
    dl.load_lora(fresh, saved)
    assert torch.equal(_outputs(fresh)[1], unfused)
    with pytest.raises(dl.FormatError, match="diffusers format"):
        dl.save_lora(pipe, name, tmp_path / "k.safetensors", format="kohya")
    assert not (tmp_path / "k.safetensors").exists()
    dl.remove_lora(pipe, name)
    assert_same_state(model_state(pipe), before)
