"""Each compat function against the installed library: real PEFT layers, a real Accelerator, tiny pipelines.

CI runs this file on the newest versions and (``.ci/floors``) on the lowest versions pyproject allows, so
both spellings of every internal are exercised.
"""

from __future__ import annotations

import math

import peft
import pytest
import torch
from packaging.version import Version
from peft import LoraConfig
from peft.tuners.lora import LoraLayer

import diffusion_lora as dl
from diffusion_lora.compat import accelerate as compat_accelerate
from diffusion_lora.compat import diffusers as compat_diffusers
from diffusion_lora.compat import peft as compat_peft


def _linear(seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(6, 5)


def _delta(layer: LoraLayer, name: str, x: torch.Tensor) -> torch.Tensor:
    """scaling · B(A(x)) from the layer's tensors, computed here (not by PEFT)."""
    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    out = x @ a.T @ b.T
    if layer.lora_B[name].bias is not None:
        out = out + layer.lora_B[name].bias
    return layer.scaling[name] * out


def test_layer_spelling_is_detected_by_the_peft_version_it_changed_in():
    # PEFT 0.19 moved LoRA layers from one keyword per config field to ``config=``.
    assert compat_peft.layers_take_config() == (Version(peft.__version__) >= Version("0.19"))


def test_a_peft_older_than_the_floor_is_refused_with_what_to_do(monkeypatch):
    # The old spelling is detected, not run: no CI job installs a PEFT below pyproject's floor.
    monkeypatch.setattr(compat_peft, "layers_take_config", lambda: False)
    with pytest.raises(dl.DiffusionLoraError, match=r"older than the 0\.19 .*pip install -U 'peft>=0\.19'"):
        compat_peft.new_layer(LoraConfig(r=2, lora_alpha=2), "x", torch.nn.Linear(3, 3), rank=2, alpha=2, path="m")


@pytest.mark.parametrize("module", [torch.nn.Linear(6, 5), torch.nn.Conv2d(3, 4, 3)], ids=["linear", "conv"])
def test_new_layer_carries_every_config_field(module):
    cfg = LoraConfig(r=4, lora_alpha=8, use_rslora=True, use_dora=True, init_lora_weights=False)
    layer = compat_peft.new_layer(cfg, "x", module, rank=4, alpha=8, path="m")
    assert isinstance(layer, LoraLayer) and layer.get_base_layer() is module
    assert layer.r["x"] == 4
    assert layer.scaling["x"] == pytest.approx(8 / math.sqrt(4))  # rsLoRA: alpha/√rank, not alpha/rank
    assert "x" in layer.lora_magnitude_vector  # DoRA
    assert layer.lora_B["x"].weight.abs().sum() > 0  # init_lora_weights=False: B is not zeros


def test_new_layer_with_lora_bias_gives_b_a_bias():
    cfg = LoraConfig(r=2, lora_alpha=2, lora_bias=True)
    layer = compat_peft.new_layer(cfg, "x", _linear(), rank=2, alpha=2, path="m")
    assert layer.lora_B["x"].bias is not None


def test_add_to_layer_adds_an_adapter_with_its_own_fields():
    layer = compat_peft.new_layer(LoraConfig(r=4, lora_alpha=4, use_dora=True), "x", _linear(), rank=4, alpha=4,
                                  path="m")
    compat_peft.add_to_layer(layer, LoraConfig(r=2, lora_alpha=6), "y", rank=2, alpha=6, path="m")
    assert set(layer.lora_A) == {"x", "y"}
    assert layer.r["y"] == 2 and layer.scaling["y"] == pytest.approx(3.0)
    assert "x" in layer.lora_magnitude_vector and "y" not in layer.lora_magnitude_vector


def test_set_active_adapters_changes_the_forward_and_not_requires_grad():
    cfg = LoraConfig(r=2, lora_alpha=2, init_lora_weights=False)
    layer = compat_peft.new_layer(cfg, "x", _linear(), rank=2, alpha=2, path="m")
    compat_peft.add_to_layer(layer, cfg, "y", rank=2, alpha=2, path="m")
    for p in layer.lora_A["x"].parameters():
        p.requires_grad_(True)
    for p in layer.lora_A["y"].parameters():
        p.requires_grad_(False)
    compat_peft.set_active_adapters(layer, ["y"])
    assert layer.active_adapters == ["y"]
    assert all(p.requires_grad for p in layer.lora_A["x"].parameters())
    assert not any(p.requires_grad for p in layer.lora_A["y"].parameters())
    x = torch.randn(3, 6)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.get_base_layer()(x) + _delta(layer, "y", x))
        compat_peft.set_active_adapters(layer, ["x", "y"])
        both = layer.get_base_layer()(x) + _delta(layer, "x", x) + _delta(layer, "y", x)
        torch.testing.assert_close(layer(x), both)


def test_forget_merges_lets_the_layer_run_unmerged_again():
    layer = compat_peft.new_layer(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False), "x", _linear(), rank=2,
                                  alpha=2, path="m")
    base = layer.get_base_layer()
    original = base.weight.detach().clone()
    layer.merge(adapter_names=["x"])
    assert layer.merged
    with torch.no_grad():
        base.weight.copy_(original)  # restored by hand, as adapters/fusing.py does
    compat_peft.forget_merges(layer)
    assert not layer.merged
    x = torch.randn(3, 6)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), base(x) + _delta(layer, "x", x))


def test_mark_peft_loaded_is_the_flag_diffusers_reads(make_pipe):
    unet = make_pipe("tiny-sd15").unet
    with pytest.raises(ValueError, match="No adapter loaded"):
        unet.disable_adapters()
    layer = compat_peft.new_layer(LoraConfig(r=2, lora_alpha=2), "x", unet.conv_in, rank=2, alpha=2, path="conv_in")
    unet.conv_in = layer
    unet.peft_config = {"x": LoraConfig(r=2, lora_alpha=2)}
    compat_peft.mark_peft_loaded(unet, True)
    unet.disable_adapters()  # diffusers accepts the model as carrying adapters now
    assert layer.disable_adapters
    compat_peft.mark_peft_loaded(unet, False)
    with pytest.raises(ValueError, match="No adapter loaded"):
        unet.enable_adapters()


def test_reset_accelerator_state_allows_another_precision():
    from accelerate import Accelerator

    compat_accelerate.reset_accelerator_state()
    Accelerator(cpu=True, mixed_precision="no")
    with pytest.raises(ValueError):  # what the reset is for: accelerate refuses a second precision
        Accelerator(cpu=True, mixed_precision="bf16")
    compat_accelerate.reset_accelerator_state()
    assert Accelerator(cpu=True, mixed_precision="bf16").mixed_precision == "bf16"
    compat_accelerate.reset_accelerator_state()


def _packed_by_hand(latents: torch.Tensor) -> torch.Tensor:
    b, c, h, w = latents.shape
    out = torch.empty(b, (h // 2) * (w // 2), 4 * c)
    for i in range(h // 2):
        for j in range(w // 2):
            for ch in range(c):
                for dy in range(2):
                    for dx in range(2):
                        out[:, i * (w // 2) + j, ch * 4 + dy * 2 + dx] = latents[:, ch, 2 * i + dy, 2 * j + dx]
    return out


@pytest.mark.parametrize("source", ["pipeline", "torch"])
def test_flux_packing_and_ids(make_pipe, source):
    pipe = make_pipe("tiny-flux") if source == "pipeline" else object()  # object(): the pure-torch path
    latents = torch.randn(2, 3, 6, 4)
    torch.testing.assert_close(compat_diffusers.pack_flux_latents(pipe, latents), _packed_by_hand(latents),
                               rtol=0, atol=0)
    ids = compat_diffusers.flux_latent_ids(pipe, 2, 3, 2, torch.device("cpu"), torch.float32)
    expected = torch.tensor([[0, r, c] for r in range(3) for c in range(2)], dtype=torch.float32)
    torch.testing.assert_close(ids, expected, rtol=0, atol=0)


def test_floor_pins_are_pyprojects_lower_bounds():
    """ci/floors.txt (what the floor stage of CI installs) pins exactly pyproject's lower bounds (of the
    dependencies and of the [quant] extra)."""
    import tomllib
    from pathlib import Path

    from packaging.requirements import Requirement

    root = Path(__file__).resolve().parent.parent
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    # the required dependencies and the [quant] extra, which CI installs in both stages
    deps = [Requirement(d) for d in [*project["dependencies"], *project["optional-dependencies"]["quant"]]]
    lower = {r.name: Version(s.version) for r in deps for s in r.specifier if s.operator == ">="}
    pins = {}
    for line in (root / "ci" / "floors.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier
            pins[req.name] = Version(spec.version)
    assert pins == lower
