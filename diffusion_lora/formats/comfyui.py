"""ComfyUI-style keys: ``diffusion_model.<original UNet path>`` and ``text_encoders.<clip>.transformer.…``.

ComfyUI names the denoiser by the original (LDM/SGM) checkpoint paths and each text encoder by its
role (``clip_l``, ``clip_g``, ``t5xxl``), with either ``lora_A``/``lora_B`` or ``lora_down``/``lora_up``
weights and an optional ``.alpha``. Reading renames every key to its kohya spelling, which the kohya
index resolves against the real model (SGM names included); writing uses the SGM paths.

ComfyUI's own LoRA trainer (``comfy_extras/nodes_train.py``) also writes, for every layer it patches,
``<name>.diff_b``: the change of the layer's bias, applied as b + strength · diff_b (no LoRA scale);
and for layers with a 1-d weight (GroupNorm/LayerNorm) ``<name>.diff``, a whole weight delta. Both are
renamed like the LoRA keys; :mod:`.codec` decides which of them an adapter can hold.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch

from ..errors import FormatError
from .adapter_data import AdapterData
from .kohya import kohya_alpha, magnitude_to_dora_scale
from .sgm_blocks import UNetLayout, sgm_path

DENOISER_PREFIX = "diffusion_model."
TEXT_PREFIX = "text_encoders."
_ROLES = (
    (".lora_A.weight", ".lora_down.weight"),
    (".lora_B.weight", ".lora_up.weight"),
    (".lora_down.weight", ".lora_down.weight"),
    (".lora_up.weight", ".lora_up.weight"),
    (".alpha", ".alpha"),
    (".dora_scale", ".dora_scale"),
    (".diff_b", ".diff_b"),
    (".diff", ".diff"),
)
_TEXT = re.compile(r"text_encoders\.([a-z0-9_]+)\.(?:transformer\.)?(.+)")


def _split_role(key: str) -> tuple[str, str] | None:
    for suffix, kohya_suffix in _ROLES:
        if key.endswith(suffix):
            return key[: -len(suffix)], kohya_suffix
    return None


def is_comfyui(keys: Iterable[str]) -> bool:
    """True when every key is a ComfyUI-style LoRA key under ``diffusion_model.``/``text_encoders.``."""
    keys = list(keys)
    return bool(keys) and all(
        k.startswith((DENOISER_PREFIX, TEXT_PREFIX)) and _split_role(k) is not None for k in keys
    )


def comfyui_to_kohya(
    tensors: Mapping[str, torch.Tensor], prefixes: Mapping[str, str], text_encoders: Mapping[str, str], denoiser: str
) -> dict[str, torch.Tensor]:
    """The same tensors under kohya names (``prefixes``: component → kohya prefix; ``text_encoders``:
    ComfyUI encoder name → component). Keys for an encoder the family lacks keep a name that
    resolves to nothing, so the caller reports them."""
    renamed: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        split = _split_role(key)
        if split is None:
            raise FormatError(f"key {key!r} is not a ComfyUI LoRA key")
        module, suffix = split
        if module.startswith(DENOISER_PREFIX):
            name = f"{prefixes[denoiser]}_{module[len(DENOISER_PREFIX):].replace('.', '_')}"
        else:
            m = _TEXT.fullmatch(module)
            if m is None:
                raise FormatError(f"key {key!r}: expected text_encoders.<name>.transformer.<module path>")
            component = text_encoders.get(m.group(1))
            prefix = prefixes.get(component, f"unknown_{m.group(1)}") if component else f"unknown_{m.group(1)}"
            name = f"{prefix}_{m.group(2).replace('.', '_')}"
        if f"{name}{suffix}" in renamed:
            raise FormatError(f"key {key!r} names a module twice (lora_A and lora_down spellings together)")
        renamed[f"{name}{suffix}"] = tensor
    return renamed


def comfyui_names(
    data: AdapterData, denoiser: str, text_encoders: Mapping[str, str], layout: UNetLayout | None
) -> dict[str, str]:
    """Module key (``component.path``) → ComfyUI module name for every module of ``data``.

    UNet modules get their SGM path (``layout`` required); CLIP modules get the transformers-4
    ``text_model.`` path ComfyUI expects. Raises FormatError for a module with no ComfyUI name.
    """
    by_component = {c: n for n, c in text_encoders.items()}
    names: dict[str, str] = {}
    for key in data.modules:
        component, _, path = key.partition(".")
        if component == denoiser:
            original = sgm_path(path, layout) if layout is not None else None
            if original is None:
                raise FormatError(
                    f"{key} has no name in the original checkpoint layout ComfyUI uses; save this adapter "
                    f"in the diffusers or kohya format instead"
                )
            names[key] = DENOISER_PREFIX + original
        elif component in by_component:
            clip_path = path if path.startswith(("text_model.", "text_projection")) else "text_model." + path
            names[key] = f"{TEXT_PREFIX}{by_component[component]}.transformer.{clip_path}"
        else:
            raise FormatError(f"{key}: component {component!r} has no ComfyUI name")
    return names


def write_comfyui(data: AdapterData, names: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """Tensors of a ComfyUI-style file: ``<name>.lora_down.weight``/``.lora_up.weight``/``.alpha``
    (and ``.dora_scale`` in the kohya/LyCORIS convention for DoRA, ``.diff_b`` for a bias change)."""
    tensors: dict[str, torch.Tensor] = {}
    for key, m in data.modules.items():
        name = names[key]
        alpha = kohya_alpha(m, data.use_rslora)
        tensors[f"{name}.lora_down.weight"] = m.down
        tensors[f"{name}.lora_up.weight"] = m.up
        tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=m.down.dtype)
        if m.magnitude is not None:
            tensors[f"{name}.dora_scale"] = magnitude_to_dora_scale(m.magnitude, m.down)
        if m.bias is not None:
            tensors[f"{name}.diff_b"] = m.bias_delta(data.use_rslora)
    return tensors
