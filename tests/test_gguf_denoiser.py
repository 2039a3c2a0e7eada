"""A GGUF (or .safetensors) file as the denoiser: ``load_pipeline(base, denoiser=FILE)`` and ``--denoiser``.

The GGUF files are written here from a tiny model's denoiser with the ``gguf`` package (tests/gguf_files.py);
their weights are checked against the gguf package's own dequantization of the file."""

from __future__ import annotations

import functools

import pytest
import safetensors.torch
import torch

import diffusion_lora as dl
from diffusion_lora.adapters.quantized import dequantized_weight
from diffusion_lora.cli import main
from diffusion_lora.errors import AdapterStateError, ConfigError, ModelLoadError
from diffusion_lora.models.tiny import missing_classes

from . import helpers
from .gguf_files import read_gguf_weights, write_gguf

# Output error of two denoising steps vs the float model, measured on every tiny model (bench/bench_quantize.py):
# Q8_0 ≤ 0.0052 (tiny-sd2), Q4_0 ≤ 0.091 (tiny-sd2); tiny-flux: Q8_0 0.0028, Q4_0 0.048.
OUTPUT_BOUND = {"Q8_0": 0.02, "Q4_0": 0.2}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@functools.lru_cache(maxsize=None)
def _float(kind: str):
    pipe = dl.build_tiny_pipeline(kind)
    pipe.set_progress_bar_config(disable=True)
    return pipe, helpers.run(pipe)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    flux = _float("tiny-flux")[0].transformer
    return {q: write_gguf(flux, folder / f"tiny-flux-{q}.gguf", q) for q in ("Q8_0", "Q4_0")}


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_gguf_denoiser_loads_and_generates(files, qtype):
    import gguf

    base, ref = _float("tiny-flux")
    pipe = dl.load_pipeline("tiny-flux", denoiser=files[qtype])
    pipe.set_progress_bar_config(disable=True)
    layer = pipe.transformer.transformer_blocks[0].attn.to_q
    assert type(layer.weight).__name__ == "GGUFParameter"
    assert layer.weight.quant_type == getattr(gguf.GGMLQuantizationType, qtype)
    reference = read_gguf_weights(files[qtype])  # the gguf package's own dequantization of the file
    state = pipe.transformer.state_dict()
    for key in ("transformer_blocks.0.attn.to_q.weight", "single_transformer_blocks.1.proj_mlp.weight"):
        ours = dequantized_weight(pipe.transformer.get_submodule(key.rsplit(".", 1)[0]))
        # diffusers multiplies the fp16 block scale in fp16, gguf in float32: the exact product rounded to fp16
        assert torch.equal(ours, reference[key].to(ours.dtype))
    assert torch.equal(state["x_embedder.bias"], reference["x_embedder.bias"])
    assert pipe.text_encoder is not base.text_encoder and pipe.vae.dtype == torch.float32
    out = helpers.run(pipe)
    assert 0 < _rel(out, ref) < OUTPUT_BOUND[qtype]


def test_gguf_denoiser_with_a_folder_base(files, tmp_path):
    """A diffusers folder base: the GGUF denoiser is handed to from_pretrained (the base's own is not loaded)."""
    _float("tiny-flux")[0].save_pretrained(tmp_path)
    pipe = dl.load_pipeline(tmp_path, denoiser=files["Q8_0"], exact=True)
    again = dl.load_pipeline("tiny-flux", denoiser=files["Q8_0"])
    assert type(pipe.transformer.transformer_blocks[0].attn.to_q.weight).__name__ == "GGUFParameter"
    assert torch.equal(helpers.run(pipe), helpers.run(again))


def test_lora_on_gguf_denoiser(files, tmp_path):
    """A LoRA loads on the GGUF denoiser; its output is the LoRA on the float base within the Q8_0 error, and
    fuse is refused (PEFT cannot merge into GGUF blocks), leaving the pipeline as it was."""
    base = dl.build_tiny_pipeline("tiny-flux")
    base.set_progress_bar_config(disable=True)
    helpers.trained_adapter(base, "style", seed=3)
    lora = tmp_path / "style.safetensors"
    dl.save_lora(base, "style", lora)
    with_lora_float = helpers.run(base)

    pipe = dl.load_pipeline("tiny-flux", denoiser=files["Q8_0"])
    pipe.set_progress_bar_config(disable=True)
    without = helpers.run(pipe)
    dl.load_lora(pipe, lora, name="style")
    with_lora = helpers.run(pipe)
    assert _rel(with_lora, without) > 0.05  # the LoRA acts
    assert _rel(with_lora, with_lora_float) < OUTPUT_BOUND["Q8_0"]
    with pytest.raises(AdapterStateError, match="GGUF"):
        dl.fuse(pipe)
    assert torch.equal(helpers.run(pipe), with_lora)


def test_quantize_with_gguf_denoiser_is_refused(files):
    with pytest.raises(ConfigError, match=r"already quantized \(GGUF Q8_0\); drop quantize \(--quantize\)"):
        dl.load_pipeline("tiny-flux", denoiser=files["Q8_0"], quantize="int8")


def test_bad_denoiser_files(files, tmp_path):
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(files["Q8_0"].read_bytes()[:5000])
    with pytest.raises(ModelLoadError, match=r"truncated\.gguf: not a readable GGUF file"):
        dl.load_pipeline("tiny-flux", denoiser=truncated)
    text = tmp_path / "notes.gguf"
    text.write_text("not a model")
    with pytest.raises(ModelLoadError, match=r"notes\.gguf: not a GGUF file"):
        dl.load_pipeline("tiny-flux", denoiser=text)
    with pytest.raises(ModelLoadError, match=r"Q8_0\.gguf: a GGUF file holds only the denoiser.*--denoiser FILE"):
        dl.load_pipeline(files["Q8_0"])  # given as the model
    with pytest.raises(ModelLoadError, match="missing.gguf: no such file"):
        dl.load_pipeline("tiny-flux", denoiser=tmp_path / "missing.gguf")
    # Flux's transformer weights for an SDXL base, and for a Flux.2 base (same kind of model, other layout)
    for kind, cls in (("tiny-sdxl", "UNet2DConditionModel"), ("tiny-flux2", "Flux2Transformer2DModel")):
        with pytest.raises(ModelLoadError, match=rf"tiny-flux-Q8_0\.gguf: could not load this GGUF Q8_0 file as "
                                                 rf"the base's {cls}"):
            dl.load_pipeline(kind, denoiser=files["Q8_0"])


def test_safetensors_denoiser(tmp_path):
    """A .safetensors file with the denoiser's keys replaces the base's weights (and can be quantized)."""
    source = dl.build_tiny_pipeline("tiny-flux").transformer
    tensors = {k: v * 1.5 for k, v in source.state_dict().items()}  # other weights than the base's
    path = tmp_path / "denoiser.safetensors"
    safetensors.torch.save_file(tensors, path)
    pipe = dl.load_pipeline("tiny-flux", denoiser=path)
    loaded = pipe.transformer.state_dict()
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    quantized = dl.load_pipeline("tiny-flux", denoiser=path, quantize="int8")
    weight = quantized.transformer.transformer_blocks[0].attn.to_q.weight
    assert _rel(weight.dequantize(), tensors["transformer_blocks.0.attn.to_q.weight"]) < 0.01


def test_cli_generate_with_gguf_denoiser(files, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["generate", "--model", "tiny-flux", "--denoiser", str(files["Q4_0"]), "--prompt", "a red circle",
            "--steps", "2", "--height", "32", "--width", "32", "--out", str(out)]
    assert main(args) == 0
    assert len(list(out.glob("*.png"))) == 1
    capsys.readouterr()
    assert main([*args, "--quantize", "nf4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: quantize: the denoiser file ") and "(GGUF Q4_0)" in err[0]


@pytest.mark.skipif(bool(missing_classes("tiny-flux3")), reason="this diffusers has no Flux.3")
def test_gguf_whose_model_dtype_is_not_float_is_refused(tmp_path):
    """diffusers reports a GGUF Flux.3 transformer's dtype as uint8 (its first weight is GGUF blocks) and the
    Flux.3 pipeline casts its latents to that dtype: refused at load with a message, not a crash mid-generation."""
    path = write_gguf(dl.build_tiny_pipeline("tiny-flux3").transformer, tmp_path / "flux3.gguf", "Q8_0")
    with pytest.raises(ModelLoadError, match=r"flux3\.gguf: diffusers reports this GGUF Q8_0's .* as torch\.uint8"):
        dl.load_pipeline("tiny-flux3", denoiser=path)
