"""save_lora/load_lora in every wired format: round trips, plain-diffusers oracle, metadata and hashes."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

import diffusion_lora as dl
from diffusion_lora.formats.detect import FileFormat, detect_format
from diffusion_lora.formats.safetensors_io import read_metadata

from .helpers import run, trained_adapter

UNET_KINDS = ("tiny-sd15", "tiny-sdxl")


@pytest.mark.parametrize("kind", UNET_KINDS)
@pytest.mark.parametrize("fmt", ["kohya", "comfyui"])
@pytest.mark.parametrize("variant", [{}, {"use_dora": True}, {"use_rslora": True}])
def test_round_trip(make_pipe, tmp_path, kind, fmt, variant):
    pipe = make_pipe(kind)
    trained_adapter(pipe, "style", seed=60, rank=4, alpha=3, text_encoder=True, **variant)
    expected = run(pipe)
    path = dl.save_lora(pipe, "style", tmp_path / "style.safetensors", format=fmt)
    assert detect_format(load_file(str(path))) is FileFormat(fmt)
    fresh = make_pipe(kind)
    dl.load_lora(fresh, path)
    torch.testing.assert_close(run(fresh), expected, rtol=0, atol=1e-6)


def test_kohya_names_are_what_a1111_expects(make_pipe, tmp_path):
    pipe = make_pipe("tiny-sdxl")
    trained_adapter(pipe, "s", seed=61, rank=4, text_encoder=True)
    keys = set(load_file(str(dl.save_lora(pipe, "s", tmp_path / "s.safetensors", format="kohya"))))
    assert "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k.alpha" in keys
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in keys
    assert "lora_te2_text_model_encoder_layers_1_self_attn_out_proj.lora_down.weight" in keys
    comfy = set(load_file(str(dl.save_lora(pipe, "s", tmp_path / "c.safetensors", format="comfyui"))))
    assert "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.lora_down.weight" in comfy
    assert "text_encoders.clip_g.transformer.text_model.encoder.layers.0.self_attn.q_proj.alpha" in comfy


@pytest.mark.parametrize("kind", UNET_KINDS)
def test_our_kohya_file_in_plain_diffusers(make_pipe, tmp_path, kind):
    pipe = make_pipe(kind)
    trained_adapter(pipe, "style", seed=62, rank=4, alpha=2, text_encoder=True)
    expected = run(pipe)
    path = dl.save_lora(pipe, "style", tmp_path / "style.safetensors", format="kohya")
    plain = make_pipe(kind)
    plain.load_lora_weights(str(path), adapter_name="style")
    torch.testing.assert_close(run(plain), expected, rtol=0, atol=1e-5)


def test_comfyui_lora_a_b_spelling_and_text_encoder_names(make_pipe, tmp_path):
    pipe = make_pipe("tiny-sd15")
    trained_adapter(pipe, "s", seed=63, rank=4, alpha=2, text_encoder=True)
    expected = run(pipe)
    tensors = load_file(str(dl.save_lora(pipe, "s", tmp_path / "c.safetensors", format="comfyui")))
    ab = {k.replace(".lora_down.weight", ".lora_A.weight").replace(".lora_up.weight", ".lora_B.weight"): v
          for k, v in tensors.items()}
    save_file(ab, str(tmp_path / "ab.safetensors"))
    fresh = make_pipe("tiny-sd15")
    dl.load_lora(fresh, tmp_path / "ab.safetensors")
    torch.testing.assert_close(run(fresh), expected, rtol=0, atol=1e-6)


def test_kohya_file_of_another_family_says_so(make_pipe, tmp_path):
    xl = make_pipe("tiny-sdxl")
    trained_adapter(xl, "s", seed=64, rank=4, text_encoder=True)
    path = dl.save_lora(xl, "s", tmp_path / "xl_kohya.safetensors", format="kohya")
    sd15 = make_pipe("tiny-sd15")
    before = run(sd15)
    with pytest.raises(dl.FamilyMismatchError, match="sdxl"):
        dl.load_lora(sd15, path)
    assert torch.equal(run(sd15), before)
    assert dl.list_loras(sd15) == []


def _data_section_sha256(path) -> str:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return hashlib.sha256(raw[8 + n:]).hexdigest()


@pytest.mark.parametrize("fmt", ["diffusers", "kohya", "comfyui"])
def test_sharing_metadata_and_hashes(make_pipe, tmp_path, fmt):
    pipe = make_pipe("tiny-sdxl")
    trained_adapter(pipe, "mystyle", seed=65, rank=4, alpha=2)
    path = dl.save_lora(pipe, "mystyle", tmp_path / "m.safetensors", format=fmt, trigger_words=["zxq", "blue"])
    meta = read_metadata(path)
    assert meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "2.0")
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["ss_output_name"] == "mystyle"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.trigger_phrase"] == "zxq, blue"
    assert meta["modelspec.resolution"] == "1024x1024"
    digest = _data_section_sha256(path)
    assert meta["sshs_model_hash"] == digest
    assert meta["modelspec.hash_sha256"] == "0x" + digest
    assert json.loads(meta["diffusion_lora.trigger_words"]) == ["zxq", "blue"]


def test_unknown_format_name_is_an_error(make_pipe, tmp_path):
    pipe = make_pipe("tiny-sd15")
    dl.add_lora(pipe, "s", rank=2)
    with pytest.raises(dl.ConfigError, match="kohya"):
        dl.save_lora(pipe, "s", tmp_path / "s.safetensors", format="a1111")
    assert not (tmp_path / "s.safetensors").exists()


def test_mixed_format_keys_are_rejected_with_examples(make_pipe, tmp_path):
    pipe = make_pipe("tiny-sd15")
    trained_adapter(pipe, "s", seed=66, rank=2)
    tensors = load_file(str(dl.save_lora(pipe, "s", tmp_path / "s.safetensors")))
    tensors["something_else.weight"] = torch.zeros(2)
    save_file(tensors, str(tmp_path / "mixed.safetensors"))
    with pytest.raises(dl.FormatError, match="something_else.weight"):
        dl.load_lora(make_pipe("tiny-sd15"), tmp_path / "mixed.safetensors")


def test_kohya_locon_conv_and_tucker_against_reference_math(make_pipe, tmp_path):
    """LoCon: 3×3 conv LoRA (plain and Tucker lora_mid) on resnet convs, vs W += scale·ΔW by hand."""
    pipe = make_pipe("tiny-sd15")
    reference = make_pipe("tiny-sd15")
    g = torch.Generator().manual_seed(90)
    tensors = {}
    convs = [p for p, m in pipe.unet.named_modules() if isinstance(m, torch.nn.Conv2d) and p.endswith("conv1")][:4]
    for i, path in enumerate(convs):
        layer = pipe.unet.get_submodule(path)
        out_c, in_c, kh, kw = layer.weight.shape
        rank, alpha = 3, 1.5
        name = "lora_unet_" + path.replace(".", "_")
        up = torch.randn(out_c, rank, 1, 1, generator=g) * 0.1
        if i % 2:  # Tucker: down 1×1 [rank, in], mid kh×kw [rank, rank], up [out, rank]
            down = torch.randn(rank, in_c, 1, 1, generator=g) * 0.1
            mid = torch.randn(rank, rank, kh, kw, generator=g) * 0.1
            tensors[f"{name}.lora_mid.weight"] = mid
            delta = torch.einsum("or,rskl,si->oikl", up[:, :, 0, 0], mid, down[:, :, 0, 0])
        else:
            down = torch.randn(rank, in_c, kh, kw, generator=g) * 0.1
            delta = (up.flatten(1) @ down.flatten(1)).reshape(layer.weight.shape)
        tensors[f"{name}.lora_down.weight"] = down
        tensors[f"{name}.lora_up.weight"] = up
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
        with torch.no_grad():
            reference.unet.get_submodule(path).weight += alpha / rank * delta
    save_file(tensors, str(tmp_path / "locon.safetensors"))
    dl.load_lora(pipe, tmp_path / "locon.safetensors")
    assert dl.list_loras(pipe)[0].modules == len(convs)
    expected = run(reference)
    torch.testing.assert_close(run(pipe), expected, rtol=0, atol=1e-5 * float(expected.abs().max()))
