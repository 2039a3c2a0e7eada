"""Test helpers: deterministic generation and adapters with non-trivial weights."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from PIL import Image

import diffusion_lora as dl
from diffusion_lora.adapters.state import state_of
from diffusion_lora.families import detect_variant
from diffusion_lora.models.invoke import run_pipeline

SIZE = {"StableDiffusionXLPipeline": 64}


def run(pipe: Any, prompt: str = "a small red circle on a white background", seed: int = 0) -> torch.Tensor:
    """Two denoising steps at the tiny size, returning the latents (deterministic for a seed)."""
    size = SIZE.get(type(pipe).__name__, 32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        out = run_pipeline(pipe, prompt, num_inference_steps=2, height=size, width=size, generator=g,
                           output_type="latent", images=input_images(pipe, size))
    return out.images


_SAMPLE_OPTIONS = {"image": "--image", "mask_image": "--mask", "control_image": "--control_image"}


def image_options(pipe: Any, folder: Path, size: int = 32) -> str:
    """The sample-prompt options (`` --image PATH`` ...) giving the pipeline's variant its image inputs, written
    as PNGs into ``folder``; "" for a variant that needs none."""
    parts = []
    for name, image in input_images(pipe, size).items():
        path = Path(folder) / f"input-{name}.png"
        image.save(path)
        parts.append(f" {_SAMPLE_OPTIONS[name]} {path}")
    return "".join(parts)


def cli_image_args(pipe: Any, folder: Path, size: int = 32) -> list[str]:
    """The generate CLI's ``--image``/``--mask``/``--control-image`` arguments for the pipeline's variant."""
    return image_options(pipe, folder, size).replace("--control_image", "--control-image").split()


def paired_data(kind: str, data_dir: Path) -> dict[str, str]:
    """``data`` settings a tiny model's variant needs to train on a plain folder of images: its own images as
    the control images (same stems) when the variant trains from pairs (Kontext, Control)."""
    from diffusion_lora.training.conditioning import conditioner_for

    family, variant = dl.families.tiny_models()[kind]
    if conditioner_for(family, variant).image_condition in ("reference", "control"):
        return {"control_path": str(data_dir)}
    return {}


def input_images(pipe: Any, size: int = 32) -> dict[str, Image.Image]:
    """Fixed images for the image inputs the pipeline's variant needs (Kontext reference, Fill image and
    mask, Control image): a noise picture per input, and a mask whose centre square is to be repainted."""
    out = {}
    for i, name in enumerate(detect_variant(pipe).inputs):
        if name == "mask_image":
            mask = np.zeros((size, size), dtype=np.uint8)
            mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255
            out[name] = Image.fromarray(mask, "L")
        else:
            rng = np.random.default_rng(100 + i)
            out[name] = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")
    return out


def randomize(pipe: Any, name: str, seed: int, std: float = 0.3) -> None:
    """Give adapter ``name`` random up/down weights so it changes outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for site in state_of(pipe).sites():
            layer = site.layer
            if name not in layer.lora_A:
                continue
            for mod in (layer.lora_A[name], layer.lora_B[name]):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * std)
            if name in layer.lora_magnitude_vector:
                mag = layer.lora_magnitude_vector[name].weight
                mag.copy_(mag * (1 + 0.2 * torch.rand(mag.shape, generator=g)))


def trained_adapter(pipe: Any, name: str, seed: int, **kwargs: Any) -> str:
    dl.add_lora(pipe, name, **kwargs)
    randomize(pipe, name, seed)
    return name


def model_state(pipe: Any) -> dict[str, torch.Tensor]:
    """Every tensor of every torch component, keyed component.param (copies)."""
    out = {}
    for cname, comp in pipe.components.items():
        if isinstance(comp, torch.nn.Module):
            for k, v in comp.state_dict().items():
                out[f"{cname}.{k}"] = v.detach().clone()
    return out


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_near(actual: torch.Tensor, expected: torch.Tensor, rel: float = 5e-4) -> None:
    """Equal up to float32 rounding amplified through a sampler: |a-b| ≤ rel·max|b|.

    Fused and unfused forwards round differently per layer (~1e-7 relative); two denoising
    steps through random tiny networks amplify that to ~1e-4 of the output's scale.
    """
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=0, atol=rel * scale)


def peft_folder(pipe: Any, root: Path) -> tuple[Any, Path]:
    """A PEFT ``save_pretrained`` folder (adapter_config.json + adapter_model.safetensors) of a copy of
    the pipeline's UNet, r=4, lora_alpha=6 on to_q/to_v with random lora_B; returns (PEFT model, folder)."""
    config = LoraConfig(r=4, lora_alpha=6, target_modules=["to_q", "to_v"])
    peft_model = get_peft_model(copy.deepcopy(pipe.unet), config)
    g = torch.Generator().manual_seed(51)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    peft_model.save_pretrained(root / "peft")
    return peft_model, root / "peft"


def assert_golden_names(index: Any, fixture: Path, at_least: int) -> None:
    """Every name of a golden key list (``name target…`` rows; ``-``: no module) resolves through ``index``
    to exactly the listed diffusers modules and row slices."""
    lines = [line.split() for line in fixture.read_text().splitlines()]
    lines = [line for line in lines if line and not line[0].startswith("#")]
    assert len(lines) >= at_least
    for name, *expected in lines:
        got = index.resolve(name)
        if expected == ["-"]:
            assert got is None, name
            continue
        assert got is not None, name
        shown = [p if s == slice(None) else f"{p}[{s.start}:{s.stop}]" for p, s in got]
        assert shown == expected, name
