"""Files ComfyUI's own LoRA trainer writes (issue 12, item 3.2): LoRA ``lora_up``/``lora_down``/``alpha``
plus a ``diff_b`` for every bias and a ``diff`` for every norm weight, read against reference math
(W + alpha/rank · up @ down, b + diff_b), written back as ComfyUI files, and through every tool."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import diffusion_lora as dl
from diffusion_lora.adapters.keys import model_keys_of
from diffusion_lora.adapters.layers import base_module
from diffusion_lora.adapters.state import state_of
from diffusion_lora.tools.convert import convert_file
from diffusion_lora.tools.inspect import format_report, inspect_file
from diffusion_lora.tools.merge import merge_files
from diffusion_lora.tools.resize import resize_file

from .comfyui_trainer import comfyui_trainer_tensors, original_name
from .helpers import assert_near, run

RANK = 2
_LORA_LAYERS = (torch.nn.Linear, torch.nn.Conv2d)


@pytest.fixture
def trained(make_pipe, tmp_path):
    """(the tiny-sd15 pipeline the file is for, path of a ComfyUI-trained file, its tensors)."""
    pipe = make_pipe("tiny-sd15")
    tensors = comfyui_trainer_tensors(pipe.unet, rank=RANK, seed=91)
    path = tmp_path / "ComfyUI_trained_lora_16_steps_00001_.safetensors"
    save_file(tensors, str(path))
    return pipe, path, tensors


def _lora_only(tensors):
    """The file without what a PEFT adapter cannot hold: the diff/diff_b of norm layers."""
    lora_names = {k.rsplit(".", 2)[0] for k in tensors if k.endswith(".lora_up.weight")}
    return {k: v for k, v in tensors.items() if k.rsplit(".", 1)[0] in lora_names or k.rsplit(".", 2)[0] in lora_names}


def _reference(pipe, tensors) -> None:
    """Apply the file to ``pipe``'s UNet by hand, the way ComfyUI does, skipping norm layers."""
    from diffusion_lora.formats.sgm_blocks import UNetLayout

    layout = UNetLayout.from_config(pipe.unet.config)
    with torch.no_grad():
        for path, module in pipe.unet.named_modules():
            if not isinstance(module, _LORA_LAYERS):
                continue
            name = "diffusion_model." + original_name(path, layout)
            up, down = tensors[f"{name}.lora_up.weight"].double(), tensors[f"{name}.lora_down.weight"].double()
            alpha = float(tensors[f"{name}.alpha"])
            delta = (alpha / down.shape[0]) * (up @ down)
            module.weight += delta.reshape(module.weight.shape).to(module.weight.dtype)
            if module.bias is not None:
                module.bias += tensors[f"{name}.diff_b"].to(module.bias.dtype)


def test_the_test_file_is_named_the_way_comfyui_names_it(trained):
    _, _, tensors = trained
    for key in ("diffusion_model.input_blocks.1.1.proj_in.diff_b",
                "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.lora_up.weight",
                "diffusion_model.input_blocks.1.0.in_layers.0.diff", "diffusion_model.out.2.lora_down.weight",
                "diffusion_model.time_embed.0.alpha", "diffusion_model.input_blocks.0.0.diff_b"):  # fmt: skip
        assert key in tensors, key
    assert tensors["diffusion_model.out.2.lora_down.weight"].dim() == 2  # conv LoRA stored flattened


def test_strict_load_refuses_the_norm_deltas_by_name(trained):
    pipe, path, _ = trained
    before = run(pipe)
    with pytest.raises(dl.KeyMappingError, match=r"in_layers\.0\.diff.*diff/diff_b.*strict=False") as info:
        dl.load_lora(pipe, path)
    assert "diffusion_model." in str(info.value)  # the file's own key names
    assert dl.list_loras(pipe) == []
    assert torch.equal(run(pipe), before)


def test_load_equals_reference_math(trained, make_pipe):
    pipe, path, tensors = trained
    report = dl.load_lora(pipe, path, strict=False)
    layers = [m for m in make_pipe("tiny-sd15").unet.modules() if isinstance(m, _LORA_LAYERS)]
    assert report.loaded == len(layers)
    norm_keys = {
        k for k in tensors if k.endswith((".diff", ".diff_b")) and k.rsplit(".", 1)[0] + ".alpha" not in tensors
    }
    assert norm_keys and set(report.skipped) == norm_keys  # everything dropped is named, nothing else is
    reference = make_pipe("tiny-sd15")
    _reference(reference, tensors)
    assert_near(run(pipe), run(reference), rel=1e-5)
    dl.fuse(pipe)
    for path, module in reference.unet.named_modules():
        if isinstance(module, _LORA_LAYERS):
            fused = base_module(pipe.unet.get_submodule(path))
            torch.testing.assert_close(fused.weight, module.weight, rtol=1e-5, atol=1e-6, msg=path)
            if module.bias is not None:
                torch.testing.assert_close(fused.bias, module.bias, rtol=1e-5, atol=1e-6, msg=path)


def test_written_back_as_comfyui_with_diff_b(trained, make_pipe, tmp_path):
    pipe, path, tensors = trained
    dl.load_lora(pipe, path, name="c", strict=False)
    out = load_file(str(dl.save_lora(pipe, "c", tmp_path / "back.safetensors", format="comfyui")))
    kept = _lora_only(tensors)
    assert out.keys() == kept.keys()
    for key, value in kept.items():
        if key.endswith(".weight"):  # conv factors come back 4-d: the same numbers
            assert torch.equal(out[key].flatten(1).to(value.dtype), value.flatten(1)), key
        else:
            torch.testing.assert_close(out[key].float(), value.float(), rtol=0, atol=0, msg=key)
    fresh = make_pipe("tiny-sd15")
    dl.load_lora(fresh, tmp_path / "back.safetensors")
    assert_near(run(fresh), run(pipe), rel=1e-6)


@pytest.mark.parametrize("to", ["comfyui", "diffusers"])
def test_convert_keeps_bias_deltas(trained, make_pipe, tmp_path, to):
    pipe, _, tensors = trained
    src = tmp_path / "lora_only.safetensors"
    save_file(_lora_only(tensors), str(src))
    out = convert_file(src, tmp_path / f"out-{to}.safetensors", to, pipe=make_pipe("tiny-sd15"))
    reference = make_pipe("tiny-sd15")
    _reference(reference, tensors)
    fresh = make_pipe("tiny-sd15")
    dl.load_lora(fresh, out)
    assert_near(run(fresh), run(reference), rel=1e-5)


def test_convert_to_kohya_and_whole_trainer_file_are_clear_refusals(trained, make_pipe, tmp_path):
    _, path, tensors = trained
    src = tmp_path / "lora_only.safetensors"
    save_file(_lora_only(tensors), str(src))
    with pytest.raises(dl.FormatError, match="change a layer.s bias.*diffusers format.*comfyui"):
        convert_file(src, tmp_path / "k.safetensors", "kohya", pipe=make_pipe("tiny-sd15"))
    with pytest.raises(dl.KeyMappingError, match=r"in_layers\.0\.diff"):
        convert_file(path, tmp_path / "c.safetensors", "comfyui", pipe=make_pipe("tiny-sd15"))
    assert not (tmp_path / "k.safetensors").exists() and not (tmp_path / "c.safetensors").exists()


def test_merge_and_resize_keep_bias_deltas(trained, make_pipe, tmp_path):
    pipe, _, tensors = trained
    src = tmp_path / "lora_only.safetensors"
    save_file(_lora_only(tensors), str(src))
    reference = make_pipe("tiny-sd15")
    _reference(reference, tensors)
    expected = run(reference)
    keys = model_keys_of(state_of(pipe))
    merged = tmp_path / "merged.safetensors"
    merge_files([(src, 0.5), (src, 0.5)], merged, keys=keys, to="comfyui")  # concat: exact
    assert any(k.endswith(".diff_b") for k in load_file(str(merged)))
    resized = tmp_path / "resized.safetensors"
    resize_file(src, resized, rank=RANK, keys=keys)
    # concat is exact; resize re-factors by SVD and stores the factors in the file's bfloat16 (2⁻⁸)
    for out, rel in ((merged, 1e-5), (resized, 1e-3)):
        fresh = make_pipe("tiny-sd15")
        dl.load_lora(fresh, out)
        assert_near(run(fresh), expected, rel=rel)


def test_inspect_shows_bias_and_norm_deltas(trained):
    _, path, tensors = trained
    report = inspect_file(path)
    assert report.format == "comfyui"
    assert report.bias_deltas == sum(k.endswith(".diff_b") for k in tensors)
    assert report.ranks == {RANK: sum(k.endswith(".lora_up.weight") for k in tensors)}
    text = format_report(report)
    assert f"{report.bias_deltas} diff_b" in text


def _flux_trainer_tensors(pipe, rank: int, seed: int) -> tuple[dict[str, torch.Tensor], dict[str, list]]:
    """A ComfyUI-trained Flux LoRA: BFL layer names, a LoRA and a diff_b per (fused) Linear layer, plus a
    norm ``diff``; and per BFL name its diffusers (module path, output rows)."""
    from diffusion_lora.formats.flux_names import bfl_table

    keys = model_keys_of(state_of(pipe))
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    layout: dict[str, list] = {}
    for bfl, targets in bfl_table(keys.flux_dims).items():
        shapes = [keys.shape("transformer", path) for path, _ in targets]
        if any(s is None for s in shapes):
            continue
        rows = sum(s.stop - s.start if s.stop is not None else shape[0] for (_, s), shape in zip(targets, shapes))
        name = f"diffusion_model.{bfl}"
        tensors[f"{name}.lora_up.weight"] = (torch.randn(rows, rank, generator=g) * 0.05).to(torch.bfloat16)
        tensors[f"{name}.lora_down.weight"] = (torch.randn(rank, shapes[0][1], generator=g) * 0.05).to(torch.bfloat16)
        tensors[f"{name}.alpha"] = torch.tensor(1.0, dtype=torch.bfloat16)
        tensors[f"{name}.diff_b"] = (torch.randn(rows, generator=g) * 0.05).to(torch.bfloat16)
        layout[name] = list(targets)
    tensors["diffusion_model.double_blocks.0.img_attn.norm.query_norm.diff"] = torch.ones(4, dtype=torch.bfloat16)
    return tensors, layout


def test_flux_comfyui_trainer_file_equals_reference_math_and_writes_back(make_pipe, tmp_path):
    pipe = make_pipe("tiny-flux")
    tensors, layout = _flux_trainer_tensors(pipe, rank=RANK, seed=92)
    path = tmp_path / "flux_trained.safetensors"
    save_file(tensors, str(path))
    report = dl.load_lora(pipe, path, name="f", strict=False)
    assert report.skipped == ("diffusion_model.double_blocks.0.img_attn.norm.query_norm.diff",)
    reference = make_pipe("tiny-flux")
    with torch.no_grad():
        for name, targets in layout.items():
            up, down = tensors[f"{name}.lora_up.weight"].double(), tensors[f"{name}.lora_down.weight"].double()
            delta, diff_b = (float(tensors[f"{name}.alpha"]) / RANK) * (up @ down), tensors[f"{name}.diff_b"].double()
            offset = {}
            for path, rows in targets:  # a diffusers layer's rows are its slices of the BFL rows, in order
                layer = reference.transformer.get_submodule(path)
                n = delta[rows].shape[0]
                start = offset.get(path, 0)
                layer.weight[start : start + n] += delta[rows].to(layer.weight.dtype)
                layer.bias[start : start + n] += diff_b[rows].to(layer.bias.dtype)
                offset[path] = start + n
    assert_near(run(pipe), run(reference), rel=1e-5)
    back = load_file(str(dl.save_lora(pipe, "f", tmp_path / "back.safetensors", format="comfyui")))
    kept = {k: v for k, v in tensors.items() if not k.endswith(".diff")}
    assert back.keys() == kept.keys()
    for key, value in kept.items():
        torch.testing.assert_close(back[key].float(), value.float(), rtol=0, atol=0, msg=key)


def test_sdxl_unet_and_clip_comfyui_keys_with_diff_b_equal_reference_math(make_pipe, tmp_path):
    """SDXL: SGM UNet names plus ``text_encoders.clip_l/clip_g.transformer.text_model.…`` keys, all with
    diff_b, against W + alpha/rank · up @ down and b + diff_b, and written back key for key."""
    pipe = make_pipe("tiny-sdxl")
    tensors = _lora_only(comfyui_trainer_tensors(pipe.unet, rank=RANK, seed=93))
    g = torch.Generator().manual_seed(94)
    clip: dict[str, tuple[str, str]] = {}  # file module name → (component, module path)
    for role, component in (("clip_l", "text_encoder"), ("clip_g", "text_encoder_2")):
        encoder = getattr(pipe, component)
        for path, module in encoder.named_modules():
            if path.endswith(("self_attn.q_proj", "mlp.fc2")):
                name = f"text_encoders.{role}.transformer.text_model.{path.removeprefix('text_model.')}"
                clip[name] = (component, path)
                tensors[f"{name}.lora_up.weight"] = torch.randn(module.out_features, RANK, generator=g) * 0.05
                tensors[f"{name}.lora_down.weight"] = torch.randn(RANK, module.in_features, generator=g) * 0.05
                tensors[f"{name}.alpha"] = torch.tensor(3.0)
                tensors[f"{name}.diff_b"] = torch.randn(module.out_features, generator=g) * 0.05
    path = tmp_path / "sdxl_comfy.safetensors"
    save_file(tensors, str(path))
    dl.load_lora(pipe, path, name="x")
    reference = make_pipe("tiny-sdxl")
    _reference(reference, {k: v for k, v in tensors.items() if k.startswith("diffusion_model.")})
    with torch.no_grad():
        for name, (component, module_path) in clip.items():
            layer = getattr(reference, component).get_submodule(module_path)
            layer.weight += (3.0 / RANK) * tensors[f"{name}.lora_up.weight"] @ tensors[f"{name}.lora_down.weight"]
            layer.bias += tensors[f"{name}.diff_b"]
    assert_near(run(pipe), run(reference), rel=1e-5)
    back = load_file(str(dl.save_lora(pipe, "x", tmp_path / "back.safetensors", format="comfyui")))
    assert back.keys() == tensors.keys()
    for key, value in tensors.items():  # the pipeline holds float32; conv factors come back 4-d
        got = back[key].float()
        torch.testing.assert_close(got.reshape(value.shape), value.float(), rtol=1e-6, atol=1e-7, msg=key)


def test_kohya_named_lora_with_diff_b_reads_as_lora_not_lycoris(trained, make_pipe, tmp_path):
    """The same file under kohya names (``lora_unet_input_blocks_…``): LoRA + diff_b is a LoRA with bias
    deltas, not a LyCORIS 'full' module; norm deltas are still refused by name."""
    pipe, _, tensors = trained
    kohya = {}
    for key, value in tensors.items():
        module, _, suffix = key.removeprefix("diffusion_model.").partition(".lora_")
        module, suffix = (module, "lora_" + suffix) if suffix else key.removeprefix("diffusion_model.").rsplit(".", 1)
        kohya[f"lora_unet_{module.replace('.', '_')}.{suffix}"] = value
    assert "lora_unet_input_blocks_1_1_proj_in.diff_b" in kohya
    path = tmp_path / "kohya_named.safetensors"
    save_file(kohya, str(path))
    assert inspect_file(path).format == "kohya"
    with pytest.raises(dl.KeyMappingError, match=r"lora_unet_input_blocks_1_0_in_layers_0\.diff"):
        dl.load_lora(make_pipe("tiny-sd15"), path)
    dl.load_lora(pipe, path, strict=False)
    reference = make_pipe("tiny-sd15")
    _reference(reference, tensors)
    assert_near(run(pipe), run(reference), rel=1e-5)
