"""`inspect` and `convert`: reports checked against independent computations; exact conversions."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import diffusion_lora as dl
from diffusion_lora.cli import main
from diffusion_lora.formats.safetensors_io import read_metadata
from diffusion_lora.models.reference import reference_keys
from diffusion_lora.tools.convert import convert_file
from diffusion_lora.tools.inspect import inspect_file

from .helpers import run, trained_adapter


@pytest.fixture(scope="module")
def sdxl_file(tmp_path_factory):

    pipe = dl.build_tiny_pipeline("tiny-sdxl")
    trained_adapter(pipe, "s", seed=70, rank=4, alpha=2, text_encoder=True)
    root = tmp_path_factory.mktemp("tools")
    return dl.save_lora(pipe, "s", root / "s.safetensors", format="kohya", trigger_words=["zxq"]), run(pipe)


def test_inspect_report(sdxl_file, capsys):
    path, _ = sdxl_file
    report = inspect_file(path)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert report.hashes["addnet"] == hashlib.sha256(raw[8 + n:]).hexdigest()
    assert report.hashes["autov2"] == hashlib.sha256(raw).hexdigest()[:10]
    assert report.hashes["addnet_stored_matches"] is True
    assert (report.format, report.family, report.ranks, report.alphas) == ("kohya", "sdxl", {4: 152}, {2.0: 152})
    assert report.targets["to_out.0"] == 34 and report.targets["q_proj"] == 4
    assert report.trigger_words == ["zxq"]
    assert main(["inspect", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["modules"] == 152


def test_inspect_flags_a_stale_stored_hash(sdxl_file, tmp_path):
    path, _ = sdxl_file
    tensors, meta = load_file(str(path)), read_metadata(path)
    meta["sshs_model_hash"] = "0" * 64
    save_file(tensors, str(tmp_path / "stale.safetensors"), metadata=meta)
    assert inspect_file(tmp_path / "stale.safetensors").hashes["addnet_stored_matches"] is False


@pytest.mark.parametrize("chain", [("diffusers", "kohya"), ("comfyui", "diffusers"), ("kohya", "comfyui")])
def test_convert_with_tiny_model_is_exact(sdxl_file, tmp_path, make_pipe, chain):
    path, expected = sdxl_file
    current = path
    for i, fmt in enumerate(chain):
        out = tmp_path / f"{i}-{fmt}.safetensors"
        assert main(["convert", str(current), str(out), "--to", fmt, "--model", "tiny-sdxl"]) == 0
        current = out
    fresh = make_pipe("tiny-sdxl")
    dl.load_lora(fresh, current)
    torch.testing.assert_close(run(fresh), expected, rtol=0, atol=1e-6)
    meta = read_metadata(current)
    assert meta["ss_output_name"] == "s" and meta["modelspec.trigger_phrase"] == "zxq"


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_convert_real_size_names_without_a_model(tmp_path, family):
    """Real-model module names resolve through the meta-device reference model; tensors pass unchanged."""
    keys = reference_keys(family)
    g = torch.Generator().manual_seed(71)
    paths = [p for p in keys.module_paths["unet"] if p.endswith(("attn1.to_q", "attn2.to_out.0"))][:12]
    paths += [p for p in keys.module_paths["text_encoder"] if p.endswith("q_proj")][:3]
    tensors = {}
    for p in paths:
        component = "text_encoder" if "layers" in p else "unet"
        out_f, in_f = keys.shape(component, p)[:2]  # real sizes: the tools check them
        tensors[f"{component}.{p}.lora_A.weight"] = torch.randn(4, in_f, generator=g)
        tensors[f"{component}.{p}.lora_B.weight"] = torch.randn(out_f, 4, generator=g)
    src = tmp_path / "real.safetensors"
    save_file(tensors, str(src), metadata={"ss_base_model_version": keys.family.kohya_base_model_version})
    current = src
    for i, fmt in enumerate(("kohya", "comfyui", "diffusers")):
        out = tmp_path / f"{i}.safetensors"
        assert main(["convert", str(current), str(out), "--to", fmt]) == 0
        current = out
    back = load_file(str(current))
    assert back.keys() == tensors.keys()
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
    kohya_keys = set(load_file(str(tmp_path / "0.safetensors")))
    if family == "sdxl":
        assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q") for k in kohya_keys)


def test_convert_with_model_and_family_errors(sdxl_file, tmp_path, make_pipe):
    path, _ = sdxl_file
    out = tmp_path / "out.safetensors"
    with pytest.raises(dl.DiffusionLoraError, match="match no module"):
        convert_file(path, out, "diffusers", family="sd1")
    assert not out.exists()
    assert convert_file(path, out, "diffusers", pipe=make_pipe("tiny-sdxl")) == out
    with pytest.raises(dl.ConfigError, match="--to"):
        convert_file(path, tmp_path / "x.safetensors", "a1111")


def test_reference_keys_know_real_kohya_names():
    names = reference_keys("sdxl").kohya.modules
    assert names["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"] == (
        "unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")
    assert names["lora_te2_text_model_encoder_layers_31_self_attn_out_proj"][0] == "text_encoder_2"
    sd15 = reference_keys("sd1").kohya.modules
    assert sd15["lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_out_0"] == (
        "unet", "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_out.0")


def test_inspect_lycoris_file(tmp_path):
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    g = torch.Generator().manual_seed(72)
    tensors = {f"{name}.hada_w1_a": torch.randn(8, 2, generator=g), f"{name}.hada_w1_b": torch.randn(2, 8, generator=g),
               f"{name}.hada_w2_a": torch.randn(8, 2, generator=g), f"{name}.hada_w2_b": torch.randn(2, 8, generator=g),
               f"{name}.alpha": torch.tensor(1.0)}
    save_file(tensors, str(tmp_path / "loha.safetensors"))
    report = inspect_file(tmp_path / "loha.safetensors")
    assert (report.format, report.algorithm, report.modules, report.ranks) == ("lycoris", "loha", 1, {2: 1})
    assert report.targets == {"to_q": 1}


def test_bake_and_extract_commands(tmp_path, make_pipe):
    """bake → extract round trip through the CLI recovers the adapter's effect."""
    pipe = make_pipe("tiny-sd15")
    pipe.save_pretrained(tmp_path / "base")
    trained_adapter(pipe, "s", seed=73, rank=2, alpha=2)
    expected = run(pipe)
    lora = dl.save_lora(pipe, "s", tmp_path / "s.safetensors")
    assert main(["bake", "--model", str(tmp_path / "base"), "--lora", f"{lora}:1.0", "--out",
                 str(tmp_path / "baked")]) == 0
    baked = dl.load_pipeline(tmp_path / "baked")
    baked.set_progress_bar_config(disable=True)
    torch.testing.assert_close(run(baked), expected, rtol=0, atol=1e-4 * float(expected.abs().max()))
    out = tmp_path / "extracted.safetensors"
    assert main(["extract", "--base", str(tmp_path / "base"), "--tuned", str(tmp_path / "baked"), "--rank", "2",
                 "-o", str(out)]) == 0
    fresh = dl.load_pipeline(tmp_path / "base")
    fresh.set_progress_bar_config(disable=True)
    dl.load_lora(fresh, out)
    torch.testing.assert_close(run(fresh), expected, rtol=0, atol=1e-3 * float(expected.abs().max()))


def test_merge_and_resize_commands(tmp_path, make_pipe, capsys):
    """merge A:0.7 B:0.5 (concat) == stacked loading; resize to the full rank is lossless."""
    src = make_pipe("tiny-sd15")
    trained_adapter(src, "a", seed=74, rank=2, alpha=1)
    trained_adapter(src, "b", seed=75, rank=3, alpha=6)
    dl.set_weights(src, {"a": 0.7, "b": 0.5})
    expected = run(src)
    a = dl.save_lora(src, "a", tmp_path / "a.safetensors", format="kohya")
    b = dl.save_lora(src, "b", tmp_path / "b.safetensors")
    merged = tmp_path / "m.safetensors"
    assert main(["merge", f"{a}:0.7", f"{b}:0.5", "-o", str(merged), "--model", "tiny-sd15"]) == 0
    assert "total Frobenius energy retained 1.0000" in capsys.readouterr().out
    fresh = make_pipe("tiny-sd15")
    dl.load_lora(fresh, merged)
    torch.testing.assert_close(run(fresh), expected, rtol=0, atol=1e-5 * float(expected.abs().max()))
    resized = tmp_path / "r.safetensors"
    assert main(["resize", str(merged), "-o", str(resized), "--rank", "5", "--model", "tiny-sd15"]) == 0
    again = make_pipe("tiny-sd15")
    dl.load_lora(again, resized)
    torch.testing.assert_close(run(again), expected, rtol=0, atol=1e-4 * float(expected.abs().max()))
    assert inspect_file(resized).ranks == {5: inspect_file(merged).modules}


FIXTURES = Path(__file__).parent / "fixtures"


def _names(fixture: str, section: str | None = None, column: int = 0) -> list[str]:
    """Module names of a golden key list (one column; only the rows under ``# <section>`` when given)."""
    names, inside = [], section is None
    for line in (FIXTURES / fixture).read_text().splitlines():
        if line.startswith("#"):
            inside = section is None or line.startswith(f"# {section}")
            continue
        if inside and line.strip():
            names.append(line.split()[column])
    return names


def _file(path, names: list[str], diffusers: bool = False, metadata: dict | None = None):
    """A small adapter file with real module ``names`` (rank-1 factors: the names are what matter)."""
    suffixes = ("lora_A.weight", "lora_B.weight") if diffusers else ("lora_down.weight", "lora_up.weight")
    tensors = {}
    for name in names:
        tensors[f"{name}.{suffixes[0]}"] = torch.ones(1, 2)
        tensors[f"{name}.{suffixes[1]}"] = torch.ones(2, 1)
        if not diffusers:
            tensors[f"{name}.alpha"] = torch.tensor(1.0)
    save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize(
    "names, diffusers, metadata, expected",
    [
        (_names("kohya_keys_sd15.txt"), False, None, ()),  # kohya's flattened SD1 names say nothing
        (_names("kohya_keys_sd15.txt", column=1), True, None, ("sd1", "sd2")),  # SD1 and SD2 share every name
        (_names("kohya_keys_sdxl.txt"), False, None, ("sdxl",)),
        (_names("kohya_keys_sdxl.txt", column=1), True, None, ("sdxl",)),
        (_names("kohya_keys_sdxl.txt"), False, {"ss_base_model_version": "sdxl_base_v1-0"}, ("sdxl",)),
        (_names("kohya_keys_sd15.txt"), False, {"diffusion_lora.family": "sd2"}, ("sd2",)),
        (_names("flux_keys_dev.txt", "kohya"), False, None, ("flux1",)),
        (_names("flux_keys_dev.txt", "ComfyUI"), False, None, ("flux1",)),
    ],
    ids=["sd15-kohya", "sd15-diffusers", "sdxl-kohya", "sdxl-diffusers", "sdxl-ss-metadata", "sd15-our-metadata",
         "flux-kohya", "flux-comfyui"],
)
def test_inspect_shows_the_family_convert_uses(tmp_path, names, diffusers, metadata, expected):
    from diffusion_lora.errors import ConfigError
    from diffusion_lora.formats.adapter_files import header_of
    from diffusion_lora.tools.files import file_family

    path = _file(tmp_path / "real_names.safetensors", names, diffusers, metadata)
    report = inspect_file(path)
    assert report.family == (" or ".join(expected) or None)
    if len(expected) == 1:  # convert, merge and resize act on that family
        assert file_family(path, *header_of(path)) == expected[0]
    else:  # and refuse to guess between the same candidates inspect shows
        with pytest.raises(ConfigError, match=f"candidates: {', '.join(expected) or 'none'}"):
            file_family(path, *header_of(path))
