"""Flux.3 LoRA files: diffusers/PEFT, ComfyUI ``diffusion_model.<BFL name>`` (lora_A/B or lora_down/up/alpha)
and kohya-flat ``lora_unet_<BFL name>`` — against diffusers' own converters and loader, and the golden list
of BFL names (tests/fixtures/flux3_bfl_keys.txt)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_flux3_lora_to_diffusers
from diffusers.loaders.single_file_utils import convert_flux3_transformer_checkpoint_to_diffusers, swap_scale_shift
from safetensors.torch import load_file, save_file

import diffusion_lora as dl
from diffusion_lora.adapters import pipeline_keys
from diffusion_lora.formats.codec import decode
from diffusion_lora.formats.flux3_names import bfl_table
from diffusion_lora.models.reference import reference_keys
from diffusion_lora.tools.convert import convert_file

from .helpers import assert_near, run, trained_adapter

FIXTURE = Path(__file__).parent / "fixtures" / "flux3_bfl_keys.txt"
BLOCK_PARTS = ("q_proj", "k_proj", "v_proj", "attn_out", "mlp_in", "mlp_out")


def golden() -> list[str]:
    lines = FIXTURE.read_text(encoding="utf-8").splitlines()
    return [line for line in lines if line and not line.startswith("#")]


def test_golden_bfl_names_are_the_published_layout_by_diffusers_and_by_us():
    keys = golden()
    reference = reference_keys("flux3").module_paths["transformer"]
    # diffusers' checkpoint converter (the oracle) maps every golden name to a layer of the reference model
    theirs = convert_flux3_transformer_checkpoint_to_diffusers({k: torch.zeros(2) for k in keys})
    assert {k.removesuffix(".weight") for k in theirs} == set(reference)
    ours = {bfl: path for path, bfl in bfl_table(reference).items()}
    assert set(ours) == {k.removesuffix(".weight") for k in keys}
    for key in keys:
        (converted,) = convert_flux3_transformer_checkpoint_to_diffusers({key: torch.zeros(2)})
        assert ours[key.removesuffix(".weight")] + ".weight" == converted, key
    # and diffusers' LoRA converter agrees on every block layer (it renames no top-level layer)
    blocks = [k.removesuffix(".weight") for k in keys if k.endswith(tuple(p + ".weight" for p in BLOCK_PARTS))]
    lora = _convert_non_diffusers_flux3_lora_to_diffusers({f"diffusion_model.{b}.lora_A.weight": 0 for b in blocks})
    assert sorted(lora) == sorted(f"transformer.{ours[b]}.lora_A.weight" for b in blocks)


def _bfl_file(pipe, g: torch.Generator, *, blocks_only: bool, down_up: bool = False, alpha: float | None = None):
    """A ComfyUI/ai-toolkit-style Flux.3 LoRA on the tiny model: diffusion_model.<BFL>.lora_A/B (or down/up)."""
    table = bfl_table([n for n, m in pipe.transformer.named_modules() if isinstance(m, torch.nn.Linear)])
    tensors = {}
    for path, bfl in table.items():
        if blocks_only and not bfl.endswith(BLOCK_PARTS):
            continue
        layer = pipe.transformer.get_submodule(path)
        a, b = ("lora_down", "lora_up") if down_up else ("lora_A", "lora_B")
        tensors[f"diffusion_model.{bfl}.{a}.weight"] = torch.randn(3, layer.in_features, generator=g) * 0.2
        tensors[f"diffusion_model.{bfl}.{b}.weight"] = torch.randn(layer.out_features, 3, generator=g) * 0.2
        if alpha is not None:
            tensors[f"diffusion_model.{bfl}.alpha"] = torch.tensor(alpha)
    return tensors


def test_bfl_named_file_loads_as_plain_diffusers_loads_it(make_pipe, tmp_path):
    ours, theirs = make_pipe("tiny-flux3"), make_pipe("tiny-flux3")
    tensors = _bfl_file(ours, torch.Generator().manual_seed(5), blocks_only=True)
    path = tmp_path / "bfl.safetensors"
    save_file(tensors, str(path))
    base = run(ours)
    theirs.load_lora_weights(str(path), adapter_name="x")
    dl.load_lora(ours, path)
    expected = run(theirs)
    assert not torch.equal(expected, base)
    assert_near(run(ours), expected, rel=1e-5)
    # every block layer of every mode got its LoRA (image_cond's too, though text-to-image never runs it)
    assert "x" in theirs.transformer.mode_blocks["image_cond"][1].ff.linear_out.lora_A
    assert len(ours.transformer.mode_blocks["image_cond"][1].ff.linear_out.lora_A) == 1


@pytest.mark.parametrize(("down_up", "alpha"), [(False, None), (True, 1.5)])
def test_top_level_names_and_the_swapped_adaln_halves(make_pipe, down_up, alpha):
    """Every BFL name, including the top-level ones diffusers' LoRA converter leaves alone; the final
    adaLN layer's ΔW equals what diffusers' checkpoint converter makes of BFL's weight + ΔW."""
    pipe = make_pipe("tiny-flux3")
    tensors = _bfl_file(pipe, torch.Generator().manual_seed(6), blocks_only=False, down_up=down_up, alpha=alpha)
    decoded = decode(tensors, {}, pipeline_keys(pipe), source="bfl")
    assert decoded.unresolved == []
    table = bfl_table(decoded.data.modules and [k.partition(".")[2] for k in decoded.data.modules])
    assert len(table) == len(tensors) // (3 if alpha else 2)
    scale = (alpha or 3) / 3
    bfl = "final_layer.image.adaLN_modulation.1"
    prefix = f"diffusion_model.{bfl}."
    a = tensors[prefix + ("lora_down.weight" if down_up else "lora_A.weight")]
    b = tensors[prefix + ("lora_up.weight" if down_up else "lora_B.weight")]
    weight = pipe.transformer.norm_out.linear.weight.detach()
    converted = convert_flux3_transformer_checkpoint_to_diffusers(
        {f"{bfl}.weight": swap_scale_shift(weight, dim=0) + scale * b @ a}
    )["norm_out.linear.weight"]
    m = decoded.data.modules["transformer.norm_out.linear"]
    torch.testing.assert_close(weight + m.scale(False) * m.up @ m.down, converted, rtol=0, atol=1e-6)


@pytest.mark.parametrize("fmt", ["kohya", "comfyui"])
@pytest.mark.parametrize("variant", [{}, {"use_dora": True}, {"use_rslora": True}, {"targets": "all-linear"}])
def test_round_trip_in_bfl_names(make_pipe, tmp_path, fmt, variant):
    pipe = make_pipe("tiny-flux3")
    trained_adapter(pipe, "f", seed=81, rank=4, alpha=3, **{"targets": "attn-ff", **variant})
    expected = run(pipe)
    path = dl.save_lora(pipe, "f", tmp_path / "f.safetensors", format=fmt)
    keys = set(load_file(str(path)))
    if fmt == "kohya":  # kohya-flat BFL names: no public producer yet, written for our own round trip
        assert "lora_unet_content_mode_blocks_image_0_q_proj.lora_down.weight" in keys
        assert "lora_unet_single_blocks_1_mlp_out.alpha" in keys
    else:
        assert "diffusion_model.content_mode_blocks.image_cond.1.attn_out.lora_up.weight" in keys
        assert "diffusion_model.txt_mode_blocks.0.mlp_in.alpha" in keys
    if variant.get("targets") == "all-linear":
        stem = "lora_unet_final_layer_image_adaLN_modulation_1" if fmt == "kohya" else (
            "diffusion_model.final_layer.image.adaLN_modulation.1")
        assert f"{stem}.lora_up.weight" in keys
    assert not any("attn.to_" in k or "attn_to_" in k or "linear_in" in k for k in keys)  # no diffusers names
    fresh = make_pipe("tiny-flux3")
    dl.load_lora(fresh, path)
    assert_near(run(fresh), expected, rel=1e-5)


def test_our_comfyui_file_with_lora_a_b_loads_in_plain_diffusers(make_pipe, tmp_path):
    """The oracle the other way: our BFL names, in the lora_A/B spelling without alpha that diffusers reads."""
    pipe = make_pipe("tiny-flux3")
    trained_adapter(pipe, "f", seed=82, rank=4, alpha=4, targets="attn-ff")  # alpha = rank: scale 1
    expected = run(pipe)
    tensors = load_file(str(dl.save_lora(pipe, "f", tmp_path / "f.safetensors", format="comfyui")))
    spelled = {k.replace(".lora_down.", ".lora_A.").replace(".lora_up.", ".lora_B."): v
               for k, v in tensors.items() if not k.endswith(".alpha")}
    save_file(spelled, str(tmp_path / "ab.safetensors"))
    theirs = make_pipe("tiny-flux3")
    theirs.load_lora_weights(str(tmp_path / "ab.safetensors"), adapter_name="f")
    assert_near(run(theirs), expected, rel=1e-5)


def test_convert_resolves_real_size_files_against_the_reference(tmp_path):
    """A real-size (rank 1) ComfyUI file: its family from its keys, its names from the meta reference."""
    reference = reference_keys("flux3")
    g = torch.Generator().manual_seed(7)
    tensors = {}
    for bfl in ("content_mode_blocks.image.4.q_proj", "txt_mode_blocks.0.mlp_in", "single_blocks.27.mlp_out",
                "final_layer.image.adaLN_modulation.1", "emb_in.image_cond"):
        path = {v: k for k, v in bfl_table(reference.module_paths["transformer"]).items()}[bfl]
        out_f, in_f = reference.shape("transformer", path)[:2]
        tensors[f"diffusion_model.{bfl}.lora_A.weight"] = torch.randn(1, in_f, generator=g)
        tensors[f"diffusion_model.{bfl}.lora_B.weight"] = torch.randn(out_f, 1, generator=g)
    src = tmp_path / "real.safetensors"
    save_file(tensors, str(src))
    diffusers_file = convert_file(src, tmp_path / "d.safetensors", "diffusers")
    converted = load_file(str(diffusers_file))
    assert "transformer.mode_blocks.image.4.attn.to_q.lora_A.weight" in converted
    assert "transformer.single_transformer_blocks.27.ff.linear_out.lora_B.weight" in converted
    assert "transformer.norm_out.linear.lora_B.weight" in converted
    kohya = load_file(str(convert_file(diffusers_file, tmp_path / "k.safetensors", "kohya")))
    back = load_file(str(convert_file(tmp_path / "k.safetensors", tmp_path / "c.safetensors", "comfyui")))
    assert "lora_unet_content_mode_blocks_image_4_q_proj.lora_down.weight" in kohya
    for key, value in tensors.items():
        spelled = key.replace(".lora_A.", ".lora_down.").replace(".lora_B.", ".lora_up.")
        assert torch.equal(back[spelled], value), key  # the adaLN halves swapped and back


def _loha(name: str, out_f: int, in_f: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    t = {f"{name}.hada_w1_a": torch.randn(out_f, 2, generator=g) * 0.3,
         f"{name}.hada_w1_b": torch.randn(2, in_f, generator=g),
         f"{name}.hada_w2_a": torch.randn(out_f, 2, generator=g) * 0.3,
         f"{name}.hada_w2_b": torch.randn(2, in_f, generator=g)}
    t[f"{name}.alpha"] = torch.tensor(2.0)
    return t


def test_lycoris_on_bfl_names_equals_it_on_diffusers_names(make_pipe, tmp_path):
    g = torch.Generator().manual_seed(9)
    bfl = _loha("lora_unet_txt_mode_blocks_1_mlp_out", 32, 96, g)
    flat = {k.replace("txt_mode_blocks_1_mlp_out", "txt_mode_blocks_1_ff_linear_out"): v for k, v in bfl.items()}
    outputs = []
    for name, tensors in (("bfl", bfl), ("flat", flat)):
        save_file(tensors, str(tmp_path / f"{name}.safetensors"))
        pipe = make_pipe("tiny-flux3")
        dl.load_lora(pipe, tmp_path / f"{name}.safetensors")
        outputs.append(run(pipe))
    assert not torch.equal(outputs[0], run(make_pipe("tiny-flux3")))
    assert torch.equal(outputs[0], outputs[1])
    adaln = _loha("lora_unet_final_layer_image_adaLN_modulation_1", 64, 32, g)
    save_file(adaln, str(tmp_path / "adaln.safetensors"))
    pipe = make_pipe("tiny-flux3")
    with pytest.raises(dl.FormatError, match="adaLN"):
        dl.load_lora(pipe, tmp_path / "adaln.safetensors")


def test_a_module_spelled_both_ways_is_refused_by_name(make_pipe, tmp_path):
    pipe = make_pipe("tiny-flux3")
    tensors = _bfl_file(pipe, torch.Generator().manual_seed(10), blocks_only=True)
    for role in ("lora_A", "lora_B"):
        tensors[f"diffusion_model.single_transformer_blocks.0.attn.to_q.{role}.weight"] = tensors[
            f"diffusion_model.single_blocks.0.q_proj.{role}.weight"].clone()
    save_file(tensors, str(tmp_path / "both.safetensors"))
    base = run(pipe)
    with pytest.raises(dl.FormatError, match="single_blocks.0.q_proj"):
        dl.load_lora(pipe, tmp_path / "both.safetensors")
    assert torch.equal(run(pipe), base)
