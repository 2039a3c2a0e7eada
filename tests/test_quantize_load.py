"""Quantized loading: ``load_pipeline(quantize=...)`` on every tiny model, diffusers' quantization configs
for folders, the dtype cast around quantized components, and the errors (unknown mode, missing library,
an already quantized model, bake/extract on a quantized base)."""

from __future__ import annotations

import functools
import importlib.util
import json

import pytest
import torch

import diffusion_lora as dl
from diffusion_lora.cli import main
from diffusion_lora.errors import ConfigError
from diffusion_lora.models.denoiser_load import quantized_components

from . import helpers
from .conftest import ALL_TINY

# Output error of two denoising steps vs the float model (‖Δ‖/‖ref‖ of the latents), measured on every tiny
# model (bench/bench_quantize.py; random weights), worst tiny model: nf4 0.117, int8 0.0051, fp8 0.034 (tiny-sd2,
# tiny-chroma, tiny-sd2); the bounds leave margin for other platforms' kernels. Per-layer weight error: nf4
# ≈ 0.09-0.10 (4-bit NormalFloat on random normal weights), int8 ≈ 0.005.
OUTPUT_BOUND = {"nf4": 0.2, "int8": 0.02, "fp8": 0.08}
WEIGHT_BOUND = {"nf4": 0.13, "int8": 0.01, "fp8": 0.05}


def _denoiser(pipe) -> tuple[str, torch.nn.Module]:
    for slot in ("transformer", "unet"):
        module = getattr(pipe, slot, None)
        if isinstance(module, torch.nn.Module):
            return slot, module
    raise AssertionError("no denoiser")


@functools.lru_cache(maxsize=None)
def _float(kind: str):
    pipe = dl.build_tiny_pipeline(kind)
    pipe.set_progress_bar_config(disable=True)
    return pipe, helpers.run(pipe)


@functools.lru_cache(maxsize=None)
def _quantized(kind: str, mode: str):
    pipe = dl.load_pipeline(kind, quantize=mode)
    pipe.set_progress_bar_config(disable=True)
    return pipe, helpers.run(pipe)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _library_weight_check(mode: str):
    """(predicate on a layer: is it the library's own quantized layer for ``mode``, dequantize by the library)."""
    if mode == "nf4":
        import bitsandbytes as bnb
        import bitsandbytes.functional as F

        def is_quantized(m):
            return (isinstance(m, bnb.nn.Linear4bit) and isinstance(m.weight, bnb.nn.Params4bit)
                    and m.weight.quant_state.quant_type == "nf4")

        return is_quantized, lambda m: F.dequantize_4bit(m.weight.data, m.weight.quant_state)
    from torchao.utils import TorchAOBaseTensor

    return (lambda m: isinstance(m.weight, TorchAOBaseTensor)), (lambda m: m.weight.dequantize())


@pytest.mark.parametrize("mode", ["nf4", "int8"])
@pytest.mark.parametrize("kind", ALL_TINY)
def test_quantized_tiny_model_loads_and_generates(kind, mode):
    base, ref = _float(kind)
    pipe, out = _quantized(kind, mode)
    slot, denoiser = _denoiser(pipe)
    _, float_denoiser = _denoiser(base)
    is_quantized, dequantize = _library_weight_check(mode)
    float_linears = {n: m for n, m in float_denoiser.named_modules() if type(m) is torch.nn.Linear}
    expected = {n for n in float_linears if n not in ("proj_out", "conv_out")}
    layers = dict(denoiser.named_modules())
    quantized = {n for n in float_linears if is_quantized(layers[n])}
    assert quantized == expected  # every linear but the top-level output projection, with the library's type
    for name in sorted(quantized)[:: max(1, len(quantized) // 8)]:  # a sample of layers, dequantized by the library
        assert _rel(dequantize(layers[name]), float_linears[name].weight) < WEIGHT_BOUND[mode], name
    assert set(quantized_components(pipe)) == {slot}  # text encoders and VAE stay as they were
    assert out.dtype == ref.dtype == torch.float32 and out.device.type == "cpu" and torch.isfinite(out).all()
    err = _rel(out, ref)
    assert 0 < err < OUTPUT_BOUND[mode], err


def test_fp8_weight_only_runs_on_cpu():
    from torchao.quantization import Float8Tensor

    base, ref = _float("tiny-flux")
    pipe, out = _quantized("tiny-flux", "fp8")
    layer = pipe.transformer.transformer_blocks[0].attn.to_q
    assert isinstance(layer.weight, Float8Tensor)
    original = base.transformer.transformer_blocks[0].attn.to_q.weight
    assert _rel(layer.weight.dequantize(), original) < WEIGHT_BOUND["fp8"]
    assert 0 < _rel(out, ref) < OUTPUT_BOUND["fp8"]


def _torchao_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer as plain tensors (a torchao weight as its int8/fp8 data and scales)."""
    out = {}
    for name, tensor in module.state_dict().items():
        if type(tensor).__module__.startswith("torchao"):
            for attr in tensor.tensor_data_names:
                out[f"{name}.{attr}"] = getattr(tensor, attr)
        else:
            out[name] = tensor
    return out


@pytest.mark.parametrize("kind", ["tiny-flux", "tiny-sdxl"])
def test_torchao_through_diffusers_equals_in_place(kind, tmp_path):
    """A folder goes through diffusers' TorchAoConfig; a tiny model is quantized in place: same weights, same
    output, and the adapter engine works on the diffusers-loaded one (PEFT's torchao layer, exact unfuse)."""
    _float(kind)[0].save_pretrained(tmp_path)
    loaded = dl.load_pipeline(tmp_path, quantize="int8", exact=True)  # exact: float weights off the memory map
    loaded.set_progress_bar_config(disable=True)
    slot, denoiser = _denoiser(loaded)
    assert type(denoiser.hf_quantizer).__name__ == "TorchAoHfQuantizer"  # quantized by diffusers while loading
    in_place, in_place_out = _quantized(kind, "int8")
    a, b = _torchao_state(denoiser), _torchao_state(_denoiser(in_place)[1])
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    assert torch.equal(helpers.run(loaded), in_place_out)

    helpers.trained_adapter(loaded, "mine", seed=1)
    lora_layer = next(m for m in denoiser.modules() if type(m).__name__ == "TorchaoLoraLinear")
    assert lora_layer.get_apply_tensor_subclass is not None
    unfused = helpers.run(loaded)
    weights = _torchao_state(denoiser)
    dl.fuse(loaded)
    assert not torch.equal(helpers.run(loaded), unfused)  # re-quantized W + ΔW
    dl.unfuse(loaded)
    after = _torchao_state(denoiser)
    assert all(torch.equal(weights[k], after[k]) for k in weights)
    assert torch.equal(helpers.run(loaded), unfused)


def test_quantized_folder_casts_only_the_float_components(tmp_path):
    """torch_dtype with a diffusers-quantized denoiser: diffusers refuses to cast a quantized model, so the
    denoiser gets the dtype at load and only the other components are cast."""
    _float("tiny-flux")[0].save_pretrained(tmp_path)
    pipe = dl.load_pipeline(tmp_path, quantize="int8", torch_dtype=torch.bfloat16)
    assert pipe.transformer.is_quantized
    assert pipe.transformer.x_embedder.weight.dtype == torch.bfloat16  # a float layer of the quantized model
    assert pipe.transformer.transformer_blocks[0].attn.to_q.weight.dtype == torch.bfloat16  # its compute dtype
    assert pipe.vae.dtype == pipe.text_encoder.dtype == torch.bfloat16


@pytest.fixture(scope="module")
def prequantized(tmp_path_factory):
    """A diffusers folder saved with a torchao-int8 denoiser (its config.json has a quantization_config)."""
    src, out = tmp_path_factory.mktemp("float"), tmp_path_factory.mktemp("q") / "saved"
    _float("tiny-flux")[0].save_pretrained(src)
    dl.load_pipeline(src, quantize="int8").save_pretrained(out)
    assert "quantization_config" in json.loads((out / "transformer" / "config.json").read_text())
    return out


def test_already_quantized_folder(prequantized):
    with pytest.raises(ConfigError, match=r"already quantized \(torchao Int8WeightOnlyConfig\); drop quantize"):
        dl.load_pipeline(prequantized, quantize="nf4")
    pipe = dl.load_pipeline(prequantized)  # without quantize it loads as saved
    assert quantized_components(pipe) == {"transformer": "torchao"}


def test_bake_and_extract_refuse_a_quantized_base(prequantized, tmp_path):
    from diffusion_lora.tools.bake import bake
    from diffusion_lora.tools.extract import extract_file

    lora = tmp_path / "a.safetensors"
    pipe = dl.build_tiny_pipeline("tiny-flux")
    helpers.trained_adapter(pipe, "a", seed=2)
    dl.save_lora(pipe, "a", lora)
    with pytest.raises(ConfigError, match=r"holds quantized weights \(transformer: torchao\); bake needs the full"):
        bake(prequantized, [(lora, 1.0)], tmp_path / "baked")
    assert not (tmp_path / "baked").exists()
    with pytest.raises(ConfigError, match="extract needs the full-precision model"):
        extract_file("tiny-flux", prequantized, tmp_path / "x.safetensors", rank=2)
    assert not (tmp_path / "x.safetensors").exists()


def test_unknown_mode_and_missing_library(monkeypatch, capsys, tmp_path):
    with pytest.raises(ConfigError, match=r"quantize: 'int4' is not a quantization; expected one of nf4, int8, fp8"):
        dl.load_pipeline("tiny-flux", quantize="int4")
    assert main(["generate", "--model", "tiny-flux", "--quantize", "q4", "--prompt", "x", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --quantize: 'q4' is not a quantization; expected one of nf4, int8, fp8 (or none)"]

    real = importlib.util.find_spec  # bitsandbytes hidden: a package cannot be uninstalled for one test
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ConfigError, match=r"quantize = nf4 needs bitsandbytes.*pip install 'diffusion-lora\[quant\]'"):
        dl.load_pipeline("tiny-flux", quantize="nf4")
    assert main(["generate", "--model", "tiny-flux", "--quantize", "nf4", "--prompt", "x", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --quantize = nf4 needs bitsandbytes, which is not installed")
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_cli_generate_quantized(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["generate", "--model", "tiny-sd15", "--quantize", "int8", "--prompt", "a red circle", "--steps", "2",
                 "--height", "32", "--width", "32", "--out", str(out)])
    assert code == 0
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 1 and capsys.readouterr().out.strip().endswith(pngs[0].name)


def test_nf4_folder_on_cpu_is_quantized_in_place(tmp_path):
    """diffusers' BitsAndBytesConfig refuses to run without a GPU, so on the CPU a folder's denoiser is loaded
    in float and swapped to bitsandbytes nf4 layers: same layers and weights as the tiny model quantized in place."""
    import bitsandbytes as bnb

    _float("tiny-flux")[0].save_pretrained(tmp_path)
    pipe = dl.load_pipeline(tmp_path, quantize="nf4", exact=True)
    assert getattr(pipe.transformer, "hf_quantizer", None) is None and pipe.transformer.is_loaded_in_4bit
    layer = pipe.transformer.transformer_blocks[0].attn.to_q
    ref = _quantized("tiny-flux", "nf4")[0].transformer.transformer_blocks[0].attn.to_q
    assert isinstance(layer, bnb.nn.Linear4bit) and torch.equal(layer.weight.data, ref.weight.data)
