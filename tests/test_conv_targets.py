"""LoRA on convolutions (kohya's LoCon): the ``all`` preset and Conv2d names in a target list, for adding,
training, saving (diffusers and kohya files that plain diffusers loads) and the memory estimate.

Oracles: the set of layers comes from walking a fresh UNet's modules; a saved file must reproduce the
adapter's output in plain ``pipe.load_lora_weights``; the estimate's LoRA bytes equal the parameters PEFT
created.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import diffusion_lora as dl
from diffusion_lora.training.config import load_config
from diffusion_lora.training.memory import estimate_memory

from .helpers import assert_near, run, trained_adapter
from .test_train import config, make_dataset


def fresh() -> object:
    pipe = dl.build_tiny_pipeline("tiny-sd15")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def adapted(model: torch.nn.Module, name: str) -> set[str]:
    """Paths of the layers of ``model`` that carry adapter ``name``."""
    return {path for path, m in model.named_modules() if name in getattr(m, "lora_A", {})}


def layers_of(model: torch.nn.Module, kinds: tuple[type, ...]) -> set[str]:
    return {path for path, m in model.named_modules() if type(m) in kinds}


def test_all_preset_adapts_every_linear_and_conv_of_the_unet():
    reference = fresh().unet
    expected = layers_of(reference, (torch.nn.Linear, torch.nn.Conv2d))
    convs = layers_of(reference, (torch.nn.Conv2d,))
    assert convs and convs < expected
    pipe = fresh()
    dl.add_lora(pipe, "locon", rank=2, targets="all")
    assert adapted(pipe.unet, "locon") == expected
    pipe_linear = fresh()
    dl.add_lora(pipe_linear, "lin", rank=2, targets="all-linear")
    assert adapted(pipe_linear.unet, "lin") == layers_of(reference, (torch.nn.Linear,))


def test_a_target_list_may_name_convolutions():
    reference = fresh().unet
    expected = {p for p in layers_of(reference, (torch.nn.Conv2d,)) if p.endswith((".conv1", ".conv2"))}
    expected |= {p for p in layers_of(reference, (torch.nn.Linear,)) if p.endswith(".to_q")}
    assert any(p.endswith(".conv1") for p in expected)
    pipe = fresh()
    dl.add_lora(pipe, "named", rank=2, targets=["to_q", "conv1", "conv2"])
    assert adapted(pipe.unet, "named") == expected


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_conv_adapter_file_loads_in_plain_diffusers(fmt: str, tmp_path: Path):
    """Rank 6 on every layer: more than conv_out's 4 output channels (redundant, as LoRA on every conv
    writes it), which plain diffusers and our loader both accept."""
    pipe = fresh()
    base = run(pipe)
    assert pipe.unet.conv_out.out_channels < 6
    trained_adapter(pipe, "locon", seed=11, rank=6, alpha=2, targets="all")
    expected = run(pipe)
    assert not torch.equal(expected, base)
    data = dl.adapter_data(pipe, "locon")
    conv_keys = [k for k, m in data.modules.items() if m.down.dim() == 4]
    assert conv_keys and all(data.modules[k].up.dim() == 4 for k in conv_keys)
    assert data.modules["unet.conv_out"].rank == 6
    path = dl.save_lora(pipe, "locon", tmp_path / f"locon-{fmt}.safetensors", format=fmt)
    plain = fresh()
    plain.load_lora_weights(str(path))
    assert_near(run(plain), expected)
    ours = fresh()
    dl.load_lora(ours, path, name="again")
    assert_near(run(ours), expected)


def test_training_all_preset_updates_convolutions_and_saves_them(tmp_path: Path):
    data = make_dataset(tmp_path / "data", n=4)
    cfg = config(data, tmp_path / "out", lora={"rank": 2, "targets": "all"}, train={"steps": 4})
    result = dl.train(cfg, progress=False)
    plain = fresh()
    plain.load_lora_weights(str(result.adapter))
    loaded = adapted(plain.unet, "default_0")
    assert {p for p in loaded if p.endswith(".conv1")} == {
        p for p in layers_of(fresh().unet, (torch.nn.Conv2d,)) if p.endswith(".conv1")
    }
    moved = [p for p in loaded if p.endswith(".conv1")
             and plain.unet.get_submodule(p).lora_B["default_0"].weight.abs().sum() > 0]
    assert moved, "no conv LoRA learned anything in 4 steps"


def test_estimate_counts_conv_lora_parameters(tmp_path: Path):
    path = tmp_path / "train.toml"
    path.write_text(f'[model]\nname = "shapes-sd15"\n[data]\npath = "{tmp_path / "data"}"\nresolution = 64\n'
                    f'[lora]\nrank = 4\ntargets = "all"\n[output]\ndir = "{tmp_path / "out"}"\n')
    estimate = estimate_memory(load_config(path))
    pipe = dl.load_pipeline("shapes-sd15")
    dl.add_lora(pipe, "locon", rank=4, targets="all")
    created = sum(p.numel() for n, p in pipe.unet.named_parameters() if "lora_" in n)
    assert estimate.part("LoRA weights") == 4 * created
