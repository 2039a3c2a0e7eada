"""Build adapter files the way ComfyUI's LoRA trainer writes them (``comfy_extras/nodes_train.py``).

For every Linear/Conv2d/GroupNorm/LayerNorm of the model (ComfyUI patches every layer with a weight):
a weight of 2 or more dims gets a LoRA — ``lora_up.weight`` [out, rank] and ``lora_down.weight``
[rank, in·kh·kw] (flattened for convs) and a 0-d ``alpha`` (1.0) —, a 1-d weight (norms) a ``diff``,
and every bias a ``diff_b``; all in bfloat16 under ``diffusion_model.<original SGM path>``.
"""

from __future__ import annotations

import torch

from diffusion_lora.formats.sgm_blocks import UNetLayout, sgm_path

_LAYERS = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm)
_RESNET_NORMS = {"norm1": "in_layers.0", "norm2": "out_layers.0"}


def original_name(path: str, layout: UNetLayout) -> str | None:
    """The LDM/SGM checkpoint path of a diffusers UNet layer, norms included."""
    if path == "conv_norm_out":
        return "out.0"
    head, _, last = path.rpartition(".")
    if ".resnets." in f".{path}" and last in _RESNET_NORMS:
        conv1 = sgm_path(f"{head}.conv1", layout)
        return None if conv1 is None else conv1.removesuffix("in_layers.2") + _RESNET_NORMS[last]
    return sgm_path(path, layout)


def comfyui_trainer_tensors(unet: torch.nn.Module, rank: int, seed: int, std: float = 0.05) -> dict[str, torch.Tensor]:
    """Tensors of a ComfyUI-trained LoRA for ``unet`` with random values (std ``std``)."""
    layout = UNetLayout.from_config(unet.config)
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * std).to(torch.bfloat16)

    tensors: dict[str, torch.Tensor] = {}
    for path, module in unet.named_modules():
        if not isinstance(module, _LAYERS):
            continue
        name = original_name(path, layout)
        assert name is not None, f"no original name for {path}"
        name = "diffusion_model." + name
        weight = module.weight
        if weight.dim() >= 2:
            tensors[f"{name}.lora_up.weight"] = rand(weight.shape[0], rank)
            tensors[f"{name}.lora_down.weight"] = rand(rank, weight[0].numel())
            tensors[f"{name}.alpha"] = torch.tensor(1.0, dtype=torch.bfloat16)
        else:
            tensors[f"{name}.diff"] = rand(*weight.shape)
        if module.bias is not None:
            tensors[f"{name}.diff_b"] = rand(*module.bias.shape)
    return tensors
