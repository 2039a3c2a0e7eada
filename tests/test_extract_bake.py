"""extract (tuned − base → LoRA by SVD) and bake (LoRAs fused into a plain diffusers folder)."""

from __future__ import annotations

import json

import pytest
import torch

import diffusion_lora as dl
from diffusion_lora.adapters.layers import plain_modules
from diffusion_lora.formats.safetensors_io import read_metadata
from diffusion_lora.tools.extract import extract_file, extract_lora

from .helpers import assert_near, run

RANK = 2


def _tiny(kind: str = "tiny-sd15"):
    pipe = dl.build_tiny_pipeline(kind, seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _plant(pipe, skip_suffix: str = "to_v") -> dict[str, torch.Tensor]:
    """Add a random rank-2 delta to every UNet attention projection except those ending in skip_suffix."""
    g = torch.Generator().manual_seed(1)
    planted = {}
    with torch.no_grad():
        for path, module in plain_modules(pipe.unet):
            if not isinstance(module, torch.nn.Linear) or not path.endswith(("to_q", "to_k", "to_out.0")):
                continue
            out_f, in_f = module.weight.shape
            delta = torch.randn(out_f, RANK, generator=g) @ torch.randn(RANK, in_f, generator=g) * 0.05
            module.weight += delta
            planted[f"unet.{path}"] = delta
    return planted


@pytest.fixture(scope="module")
def planted():
    base, tuned = _tiny(), _tiny()
    return base, tuned, _plant(tuned)


def test_extract_recovers_a_planted_low_rank_delta(planted):
    base, tuned, deltas = planted
    data, skipped = extract_lora(base, tuned, rank=RANK)
    assert set(data.modules) == set(deltas)
    for key, delta in deltas.items():
        m = data.modules[key]
        assert m.rank == RANK and m.scale() == 1.0
        torch.testing.assert_close(m.up @ m.down, delta, rtol=0, atol=1e-5)
    # Every to_v has no delta: skipped and listed, nothing else is.
    assert skipped and all(k.endswith("to_v") for k in skipped)
    assert len(skipped) + len(deltas) == len(
        [p for p, _ in plain_modules(base.unet) if p.endswith(("to_q", "to_k", "to_v", "to_out.0"))]
    )


def test_extracted_file_reproduces_the_tuned_pipeline(planted, tmp_path):
    base, tuned, deltas = planted
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")
    out = tmp_path / "extracted.safetensors"
    report = extract_file(tmp_path / "base", tmp_path / "tuned", out, rank=RANK)
    assert report.out == out and set(report.modules) == set(deltas)
    assert all(e == pytest.approx(1.0, abs=1e-6) for e in report.energy.values())
    meta = read_metadata(out)
    assert meta["diffusion_lora.family"] == "sd1"
    assert json.loads(meta["diffusion_lora.extract"])["rank"] == RANK
    expected = run(tuned)
    fresh = _tiny()
    assert not torch.allclose(run(fresh), expected, atol=1e-3)
    dl.load_lora(fresh, out)
    assert_near(run(fresh), expected, rel=1e-4)


def test_extract_rank_is_clamped_and_energy_reported(planted):
    base, tuned, deltas = planted
    data, _ = extract_lora(base, tuned, rank=1)
    assert all(m.rank == 1 for m in data.modules.values())
    key = next(iter(deltas))
    assert (data.modules[key].up @ data.modules[key].down - deltas[key]).norm() > 1e-4


def test_extract_refuses_another_family(planted):
    base, _, _ = planted
    with pytest.raises(dl.FamilyMismatchError):
        extract_lora(base, _tiny("tiny-sdxl"), rank=RANK)


@pytest.fixture(scope="module")
def baked(tmp_path_factory):
    """tiny-sd15 saved as a folder, one adapter file, the fused pipeline's outputs and a baked folder."""
    from diffusion_lora.tools.bake import bake

    from .helpers import trained_adapter

    root = tmp_path_factory.mktemp("bake")
    model = root / "model"
    _tiny().save_pretrained(model)
    pipe = dl.load_pipeline(model, exact=True)
    pipe.set_progress_bar_config(disable=True)
    trained_adapter(pipe, "style", seed=3, rank=4)
    lora = root / "style.safetensors"
    dl.save_lora(pipe, "style", lora)
    dl.remove_lora(pipe, "style")
    dl.load_lora(pipe, lora, weight=0.7)
    dl.fuse(pipe)
    expected = run(pipe)
    out = root / "baked"
    report = bake(str(model), [(str(lora), 0.7)], str(out), single_file=str(root / "baked.safetensors"))
    return out, lora, expected, report


def test_bake_gives_a_plain_folder_equal_to_the_fused_pipeline(baked):
    out, lora, expected, report = baked
    assert report.out_dir == out and report.layers_fused > 0
    baked_pipe = dl.load_pipeline(out, exact=True)
    baked_pipe.set_progress_bar_config(disable=True)
    for comp in baked_pipe.components.values():
        if isinstance(comp, torch.nn.Module):
            assert not [k for k in comp.state_dict() if "lora_" in k or "base_layer" in k]
    actual = run(baked_pipe)
    assert not torch.allclose(run(_tiny()), expected, atol=1e-3)  # the LoRA really changes outputs
    assert_near(actual, expected, rel=1e-5)
    info = json.loads((out / "bake_info.json").read_text())
    from diffusion_lora.formats.hashes import file_sha256

    assert info["loras"] == [{"path": str(lora), "sha256": file_sha256(lora), "weight": 0.7}]


def test_baked_folder_loads_with_plain_diffusers(baked):
    from diffusers import DiffusionPipeline

    out = baked[0]
    pipe = DiffusionPipeline.from_pretrained(out)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert not hasattr(pipe.unet, "peft_config") or not pipe.unet.peft_config


def test_bake_single_file_holds_every_component(baked):
    from safetensors.torch import load_file

    out = baked[0]
    tensors = load_file(str(out.parent / "baked.safetensors"))
    plain = dl.load_pipeline(out)
    assert {k.split(".", 1)[0] for k in tensors} == {"unet", "text_encoder", "vae"}
    for key, value in plain.unet.state_dict().items():
        assert torch.equal(tensors[f"unet.{key}"], value), key


def test_bake_failure_leaves_nothing(baked, tmp_path):
    from diffusion_lora.tools.bake import bake

    model = baked[0].parent / "model"
    out = tmp_path / "never"
    with pytest.raises(dl.DiffusionLoraError):
        bake(str(model), [(str(tmp_path / "missing.safetensors"), 1.0)], str(out))
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_bake_failure_on_a_corrupt_lora_leaves_nothing(baked, tmp_path):
    from diffusion_lora.tools.bake import bake

    model = baked[0].parent / "model"
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    out = tmp_path / "never"
    with pytest.raises(dl.FormatError):
        bake(str(model), [(str(bad), 1.0)], str(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors"]


def test_extract_conv_layers_when_named(planted):
    base, _, _ = planted
    tuned = _tiny()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        conv = tuned.unet.conv_in
        o, i, kh, kw = conv.weight.shape
        delta = (torch.randn(o, 1, generator=g) @ torch.randn(1, i * kh * kw, generator=g)).reshape(o, i, kh, kw)
        conv.weight += delta
    data, skipped = extract_lora(base, tuned, rank=1, targets=["conv_in", "to_q"])
    m = data.modules["unet.conv_in"]
    assert m.down.shape == (1, i, kh, kw) and m.up.shape == (o, 1, 1, 1)
    rebuilt = (m.up.flatten(1) @ m.down.flatten(1)).reshape(delta.shape)
    torch.testing.assert_close(rebuilt, delta, rtol=0, atol=1e-5)
    assert skipped and all(k.endswith("to_q") for k in skipped)
