"""Flux adapters through save_lora/load_lora in kohya (BFL names, fused qkv) and ComfyUI spelling."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import diffusion_lora as dl

from .helpers import assert_near, run, trained_adapter


@pytest.mark.parametrize("fmt", ["kohya", "comfyui"])
@pytest.mark.parametrize("variant", [{}, {"use_rslora": True}, {"targets": "attn-ff"}])
def test_flux_round_trip(make_pipe, tmp_path, fmt, variant):
    pipe = make_pipe("tiny-flux")
    trained_adapter(pipe, "f", seed=80, rank=4, alpha=3, text_encoder=True, **variant)
    expected = run(pipe)
    path = dl.save_lora(pipe, "f", tmp_path / "f.safetensors", format=fmt)
    keys = set(load_file(str(path)))
    prefix = "lora_unet_" if fmt == "kohya" else "diffusion_model."
    sep = "_" if fmt == "kohya" else "."
    assert f"{prefix}double_blocks{sep}0{sep}img_attn{sep}qkv.lora_down.weight" in keys
    assert f"{prefix}single_blocks{sep}1{sep}linear1.lora_up.weight" in keys
    assert not any("to_q" in k for k in keys)
    fresh = make_pipe("tiny-flux")
    dl.load_lora(fresh, path)
    assert_near(run(fresh), expected, rel=1e-5)


def test_flux_kohya_file_in_wrong_family(make_pipe, tmp_path):
    pipe = make_pipe("tiny-flux")
    trained_adapter(pipe, "f", seed=81, rank=4)
    path = dl.save_lora(pipe, "f", tmp_path / "f.safetensors", format="kohya")
    with pytest.raises(dl.FamilyMismatchError, match="flux1"):
        dl.load_lora(make_pipe("tiny-sd15"), path)


@pytest.mark.parametrize(("fmt", "qkv"), [
    ("kohya", "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight"),
    ("comfyui", "diffusion_model.joint_blocks.0.x_block.attn.qkv.lora_down.weight"),
])
def test_sd3_kohya_and_comfyui_round_trip_with_mmdit_names(make_pipe, tmp_path, fmt, qkv):
    pipe = make_pipe("tiny-sd3")
    trained_adapter(pipe, "s", seed=82, rank=4, alpha=2, text_encoder=True)
    expected = run(pipe)
    path = dl.save_lora(pipe, "s", tmp_path / "s.safetensors", format=fmt)
    assert qkv in load_file(str(path))  # sd-scripts' / ComfyUI's MMDiT names, fused qkv (tests/test_mmdit_names.py)
    fresh = make_pipe("tiny-sd3")
    dl.load_lora(fresh, path)
    # separately trained q/k/v are written as one block-diagonal rank-12 LoRA: same ΔW, other rounding
    torch.testing.assert_close(run(fresh), expected, rtol=0, atol=1e-5)


def test_flux_diffusion_model_prefix_with_diffusers_names(make_pipe, tmp_path):
    """`diffusion_model.<diffusers path>.lora_A` Flux files (which diffusers 0.42 silently ignores) load."""
    from safetensors.torch import save_file

    pipe = make_pipe("tiny-flux")
    trained_adapter(pipe, "f", seed=83, rank=4)
    expected = run(pipe)
    tensors = load_file(str(dl.save_lora(pipe, "f", tmp_path / "f.safetensors")))
    renamed = {"diffusion_model." + k.removeprefix("transformer."): v for k, v in tensors.items()}
    save_file(renamed, str(tmp_path / "dm.safetensors"))
    fresh = make_pipe("tiny-flux")
    dl.load_lora(fresh, tmp_path / "dm.safetensors")
    torch.testing.assert_close(run(fresh), expected, rtol=0, atol=1e-6)
