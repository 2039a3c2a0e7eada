"""``train --estimate``: bytes per format against real quantized tensors, the estimate's pure properties, one
estimate against a measured CPU peak (bench/memory_probe.py in a subprocess), and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffusion_lora import cli
from diffusion_lora.families import get_family
from diffusion_lora.models.quantize import Quantize
from diffusion_lora.training.config import OptimizerName
from diffusion_lora.training.memory import (
    EstimateSettings,
    estimate_modules,
    optimizer_state_bytes,
    quantized_weight_bytes,
)
from diffusion_lora.training.memory_models import layout_of_reference

ROOT = Path(__file__).resolve().parent.parent


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _nf4_bytes(weight) -> int:  # noqa: ANN001 - a bitsandbytes Params4bit
    qs = weight.quant_state
    total = _tensor_bytes(weight.data) + _tensor_bytes(qs.absmax) + _tensor_bytes(qs.code)
    if qs.nested:
        total += _tensor_bytes(qs.state2.absmax) + _tensor_bytes(qs.state2.code) + _tensor_bytes(qs.offset)
    return total


def _torchao_bytes(weight) -> int:  # noqa: ANN001 - a torchao tensor subclass
    names, _ = weight.__tensor_flatten__()
    return sum(_tensor_bytes(getattr(weight, n)) for n in names)


@pytest.mark.parametrize("mode", [Quantize.NF4, Quantize.INT8, Quantize.FP8])
def test_quantized_bytes_match_the_libraries_tensors(mode: Quantize) -> None:
    """The estimate's bytes per weight equal the bytes of the tensors bitsandbytes / torchao really make
    (per-layer constant tables aside: < 1 % on a 1024 x 768 layer)."""
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("torchao")
    from diffusion_lora.compat import bitsandbytes as compat_bnb
    from diffusion_lora.compat import torchao as compat_torchao

    out_f, in_f = 1024, 768
    model = torch.nn.Sequential(torch.nn.Linear(in_f, out_f, bias=False)).to(torch.bfloat16)
    if mode is Quantize.NF4:
        compat_bnb.quantize_nf4(model, compute_dtype=torch.bfloat16, skip=lambda p: False)
        real = _nf4_bytes(model[0].weight)
    else:
        compat_torchao.quantize(model, mode.value, skip=lambda p: False)
        real = _torchao_bytes(model[0].weight)
    estimated = quantized_weight_bytes(mode, out_f, in_f, 2)
    assert abs(estimated - real) / real < 0.01, (estimated, real)
    assert estimated < quantized_weight_bytes(None, out_f, in_f, 2)


def test_adamw8bit_state_bytes_match_bitsandbytes() -> None:
    """8-bit AdamW's state as estimated equals the bytes bitsandbytes allocates (a 4096+ tensor in 8 bits,
    a small one in 32 bits)."""
    bnb = pytest.importorskip("bitsandbytes")
    params = [torch.nn.Parameter(torch.zeros(16, 3072)), torch.nn.Parameter(torch.zeros(1000))]
    opt = bnb.optim.AdamW8bit(params, lr=1e-3)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    real = sum(_tensor_bytes(v) for p in params for k, v in opt.state[p].items()
               if isinstance(v, torch.Tensor) and k not in ("qmap1", "qmap2", "step"))
    assert optimizer_state_bytes(OptimizerName.ADAMW_8BIT, [p.numel() for p in params]) == real


@pytest.fixture(scope="module")
def flux1():
    family = get_family("flux1")
    return layout_of_reference(family, family.main_variant, "flux1")


def _estimate(model, **kw):  # noqa: ANN001, ANN202
    return estimate_modules(model, EstimateSettings(**{"resolution": 512, **kw}))


def test_weights_shrink_nf4_int8_bf16(flux1) -> None:  # noqa: ANN001
    """On the published Flux.1-dev layout: nf4 < int8 < bf16, near 0.52 / 1.0 / 2 bytes per weight."""
    sizes = {q: _estimate(flux1, quantize=q).part("denoiser weights") for q in (Quantize.NF4, Quantize.INT8, None)}
    n = sum(p.numel() for p in flux1.denoiser.parameters())
    assert sizes[Quantize.NF4] < sizes[Quantize.INT8] < sizes[None] == 2 * n
    assert 0.50 < sizes[Quantize.NF4] / n < 0.54 and 0.99 < sizes[Quantize.INT8] / n < 1.02


def test_activations_linear_in_batch_and_tokens(flux1) -> None:  # noqa: ANN001
    one = _estimate(flux1).part("activations")
    assert _estimate(flux1, batch_size=3).part("activations") == pytest.approx(3 * one)
    # 512 px: 1024 image + 512 text tokens; 1024 px: 4096 + 512
    big = _estimate(flux1, resolution=1024).part("activations")
    assert big / one == pytest.approx((4096 + 512) / (1024 + 512))


@pytest.mark.parametrize("variant", ["flux1", "sdxl", "flux2-klein"])
def test_checkpointing_reduces_activations(variant: str) -> None:
    family = get_family(variant.split("-")[0])
    model = layout_of_reference(family, family.variant(variant), variant)
    off = _estimate(model, resolution=1024)
    on = _estimate(model, resolution=1024, checkpointing=True)
    assert on.part("activations") < off.part("activations") / 3
    assert on.activations_other == pytest.approx(off.part("activations"))
    assert on.part("denoiser weights") == off.part("denoiser weights")


def test_estimate_matches_a_measured_cpu_peak() -> None:
    """One LoRA training step of a real-width Flux.1-dev (1 double + 1 single block, bf16 random weights,
    256 px + 128 text tokens) measured by peak RSS in a subprocess: the weights within 10 %, the step's
    growth (activations, gradients) within 30 % of the estimate."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(ROOT / "bench" / "memory_probe.py"), "--variant", "flux1",
           "--depth", "num_layers=1;num_single_layers=1", "--px", "256", "--txt", "128"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    row = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
    assert abs(row["measured_weights"] - row["estimated_weights"]) / row["estimated_weights"] < 0.10, row
    assert abs(row["measured_step"] - row["estimated_step"]) / row["measured_step"] < 0.30, row


def _config(tmp_path: Path, model: str) -> Path:
    path = tmp_path / "train.toml"
    path.write_text(f'[model]\nname = "{model}"\n[data]\npath = "{tmp_path / "data"}"\nresolution = 64\n'
                    f'[train]\ngradient_checkpointing = true\n[output]\ndir = "{tmp_path / "out"}"\n')
    return path


def test_cli_estimate_prints_parts_and_trains_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["train", str(_config(tmp_path, "tiny-flux")), "--estimate"]) == 0
    out = capsys.readouterr().out
    for part in ("denoiser weights", "LoRA gradients", "optimizer state", "activations", "text encoders", "peak:",
                 "resolution 64 px", "gradient checkpointing on"):
        assert part in out
    assert not (tmp_path / "out").exists()


def test_cli_estimate_unknown_hub_model_is_a_config_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["train", str(_config(tmp_path, "someone/not-a-known-model")), "--estimate"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model.name:") and "without downloading" in err


def test_gpu_script_parses() -> None:
    assert subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu" / "run.sh")]).returncode == 0


def test_embedded_model_weights_equal_its_loaded_parameters(tmp_path: Path) -> None:
    """For a local diffusers folder (the embedded model) the estimate builds its own configs on meta: the
    denoiser's and text encoder's bytes equal those of the loaded modules' parameters (float32)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from diffusion_lora.models.loading import embedded_model_path
    from diffusion_lora.training.config import load_config
    from diffusion_lora.training.memory import estimate_memory

    folder = embedded_model_path("shapes-sd15")
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    text = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")
    est = estimate_memory(load_config(_config(tmp_path, "shapes-sd15")))
    assert est.part("denoiser weights") == 4 * sum(p.numel() for p in unet.parameters())
    setup = {p.name: p.bytes for p in est.setup}
    assert setup["text encoders"] == 4 * sum(p.numel() for p in text.parameters())
    assert est.part("text encoders") == 0  # cached and freed while training
