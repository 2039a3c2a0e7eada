"""``extract``: a LoRA that approximates the difference between a fine-tuned model and its base.

For each targeted layer, ΔW = W_tuned − W_base (float32) is factored by a truncated SVD,
ΔW ≈ U_r S_r Vh_r, and stored as ``up = U_r·√S_r`` [out, r], ``down = √S_r·Vh_r`` [r, in] with
``alpha = r`` (scale 1), so loading the adapter at weight 1 adds the best rank-r approximation of ΔW.
Layers whose ΔW is negligible (‖ΔW‖_F ≤ threshold·‖W_base‖_F) are skipped and reported.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..adapters import dequantized_weight, logical_shape, pipeline_keys, plain_modules, resolve_targets
from ..errors import ConfigError, FamilyMismatchError
from ..families import Family, detect_family
from ..formats.adapter_data import AdapterData, ModuleLora
from ..formats.adapter_files import safetensors_path
from ..formats.codec import encode
from ..formats.safetensors_io import write_adapter_file_with_hashes
from ..models import load_pipeline
from ..models.denoiser_load import require_float_weights
from ..models.invoke import pipeline_name
from .svd import factor


@dataclass
class ExtractReport:
    """What :func:`extract_file` wrote: the file, the modules extracted and skipped, and per module the
    fraction of ‖ΔW‖²_F the rank-r approximation keeps (1.0 = exact)."""

    out: Path
    modules: list[str]
    skipped: list[str]
    energy: dict[str, float] = field(default_factory=dict)


def module_lora(delta: torch.Tensor, rank: int) -> tuple[ModuleLora, float]:
    """The rank-``rank`` ModuleLora (scale 1) of a Linear [out, in] or Conv2d [out, in, kh, kw] delta."""
    factors = factor(delta.reshape(delta.shape[0], -1).float(), tuple(delta.shape[1:]), rank)
    up, down = factors.cast(torch.float32)
    return ModuleLora(down=down, up=up, alpha=float(down.shape[0])), factors.fraction


def _component_targets(family: Family, targets: str | Sequence[str], text_encoder: bool) -> dict[str, Any]:
    """component → (suffixes, linear_only): presets are Linear-only; explicit lists may name convs."""
    if isinstance(targets, str):
        plan = {family.denoiser: (family.targets(targets), True)}
    else:
        if not targets:
            raise ConfigError("targets: empty list; pass a preset such as 'attn' or module names")
        plan = {family.denoiser: (tuple(targets), False)}
    if text_encoder:
        for comp in family.lora_text_encoders:
            plan[comp] = (family.text_encoder_targets, True)
    return plan


def _extract(
    base_pipe: Any, tuned_pipe: Any, rank: int, targets: str | Sequence[str], text_encoder: bool, threshold: float
) -> tuple[AdapterData, list[str], dict[str, float]]:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ConfigError(f"rank: must be a positive integer, got {rank!r}")
    if threshold < 0:
        raise ConfigError(f"threshold: must be ≥ 0, got {threshold!r}")
    family, tuned_family = detect_family(base_pipe), detect_family(tuned_pipe)
    if family.name != tuned_family.name:
        raise FamilyMismatchError(
            f"base is {family.title} but tuned is {tuned_family.title}; extract needs two models of one family"
        )
    modules: dict[str, ModuleLora] = {}
    skipped: list[str] = []
    energy: dict[str, float] = {}
    for comp, (suffixes, linear_only) in _component_targets(family, targets, text_encoder).items():
        base_model, tuned_model = getattr(base_pipe, comp), getattr(tuned_pipe, comp)
        paths = resolve_targets(base_model, suffixes, component=comp, linear_only=linear_only)
        tuned_layers = dict(plain_modules(tuned_model))
        base_layers = dict(plain_modules(base_model))
        for path in paths:
            key = f"{comp}.{path}"
            # a quantized layer (either model) counts with the float weight it computes with
            w_base = dequantized_weight(base_layers[path]).float()
            tuned = tuned_layers.get(path)
            if tuned is None or logical_shape(tuned) != tuple(w_base.shape):
                found = "missing" if tuned is None else logical_shape(tuned)
                raise FamilyMismatchError(
                    f"{key}: base has shape {tuple(w_base.shape)} but tuned has {found}; "
                    "the two models must have the same architecture"
                )
            delta = dequantized_weight(tuned).float().cpu() - w_base.cpu()
            if float(delta.norm()) <= threshold * float(w_base.norm()):
                skipped.append(key)
                continue
            modules[key], energy[key] = module_lora(delta, rank)
    return AdapterData(modules=modules), skipped, energy


def extract_lora(
    base_pipe: Any,
    tuned_pipe: Any,
    *,
    rank: int,
    targets: str | list[str] = "attn",
    text_encoder: bool = False,
    threshold: float = 1e-6,
) -> tuple[AdapterData, list[str]]:
    """The rank-``rank`` LoRA of ``tuned_pipe − base_pipe`` over the targeted layers, and the skipped keys.

    Keys are ``"<component>.<module path>"``. Raises FamilyMismatchError when the pipelines differ
    in family or layer shapes, ConfigError for a bad rank, threshold or target.
    """
    data, skipped, _ = _extract(base_pipe, tuned_pipe, rank, targets, text_encoder, threshold)
    return data, skipped


def extract_file(
    base: str | os.PathLike,
    tuned: str | os.PathLike,
    out: str | os.PathLike,
    *,
    rank: int,
    targets: str | list[str] = "attn",
    text_encoder: bool = False,
    threshold: float = 1e-6,
    to: str = "diffusers",
) -> ExtractReport:
    """Load ``base`` and ``tuned`` (see ``load_pipeline``), extract, and write ``out`` atomically in ``to``."""
    path = safetensors_path(out)
    base_pipe, tuned_pipe = load_pipeline(base), load_pipeline(tuned)
    require_float_weights(base_pipe, base, "extract")
    require_float_weights(tuned_pipe, tuned, "extract")
    data, skipped, energy = _extract(base_pipe, tuned_pipe, rank, targets, text_encoder, threshold)
    if not data.modules:
        raise ConfigError(
            f"{tuned}: no targeted layer differs from {base} by more than threshold={threshold}; nothing to extract"
        )
    keys = pipeline_keys(base_pipe)
    tensors, metadata = encode(keys, data, to)
    provenance = {"base": os.fspath(base), "tuned": os.fspath(tuned), "rank": rank,
                  "targets": targets, "threshold": threshold}  # fmt: skip
    metadata["diffusion_lora.extract"] = json.dumps(provenance)
    metadata["diffusion_lora.family"] = keys.family.name
    # The base the delta was taken from: what the file tools resolve the file's layer shapes against.
    metadata["diffusion_lora.base_model"] = str(pipeline_name(base_pipe) or os.fspath(base))
    write_adapter_file_with_hashes(path, tensors, metadata)
    return ExtractReport(out=path, modules=list(data.modules), skipped=skipped, energy=energy)
