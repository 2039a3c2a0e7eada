"""``bake``: fuse LoRAs into a model and save it as a plain diffusers pipeline folder.

The fused weights are copied into a freshly loaded, never-adapted copy of the model, so the saved
folder has no PEFT wrappers (no ``base_layer`` / ``lora_`` keys) and loads anywhere diffusers does.
The folder is written under a temporary sibling name and renamed at the end: a failure leaves no
half-written ``out_dir``.

``single_file`` additionally writes every component's state dict to one ``.safetensors`` file with
keys prefixed by component name (``unet.…``, ``text_encoder.…``, ``vae.…``). Those are *diffusers*
module names, not an original-layout (LDM/SGM ``model.diffusion_model.…``) checkpoint: A1111,
Forge or ComfyUI cannot load it as a checkpoint; it is meant for diffusers-based tools and for
inspection.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from ..adapters import check_weight_value, fuse, load_lora, plain_state_dict
from ..errors import AdapterStateError, ConfigError
from ..formats.adapter_files import resolve_adapter_path, safetensors_path
from ..formats.atomic import atomic_write_bytes
from ..formats.hashes import file_sha256
from ..formats.safetensors_io import read_header
from ..models import load_pipeline
from ..models.denoiser_load import require_float_weights

logger = logging.getLogger(__name__)

BAKE_INFO = "bake_info.json"


@dataclass
class BakeReport:
    """What :func:`bake` wrote: the folder, the layers changed, the LoRAs (path, sha256, weight)."""

    out_dir: Path
    layers_fused: int
    loras: list[dict[str, Any]] = field(default_factory=list)
    single_file: Path | None = None


def _torch_components(pipe: Any) -> dict[str, torch.nn.Module]:
    return {n: c for n, c in pipe.components.items() if isinstance(c, torch.nn.Module)}


def _fused_pipeline(model: str, loras: Sequence[tuple[str, float]]) -> tuple[Any, int]:
    pipe = load_pipeline(model)
    require_float_weights(pipe, model, "bake")
    for i, (path, weight) in enumerate(loras):
        load_lora(pipe, path, name=f"bake_{i}", weight=weight)
    return pipe, (fuse(pipe) if loras else 0)


def _plain_copy(model: str, fused: Any) -> Any:
    """A freshly loaded ``model`` holding ``fused``'s weights, without any adapter wrapper."""
    plain = load_pipeline(model)
    fused_parts = _torch_components(fused)
    require_float_weights(fused, model, "bake")  # quantized bytes and scales fit no plain diffusers model
    for name, component in _torch_components(plain).items():
        weights = plain_state_dict(fused_parts[name])
        try:
            component.load_state_dict(weights, strict=True)
        except RuntimeError as exc:
            raise AdapterStateError(f"{name}: fused weights do not fit the plain model: {exc}") from exc
    return plain


def _write_single_file(pipe: Any, path: Path) -> None:
    tensors = {
        f"{name}.{key}": value.detach().to("cpu").contiguous().clone()
        for name, component in _torch_components(pipe).items()
        for key, value in component.state_dict().items()
    }
    metadata = {"format": "pt", "diffusion_lora.layout": "diffusers"}
    atomic_write_bytes(path, safetensors.torch.save(tensors, metadata=metadata), what="single-file model")


def _check_inputs(loras: Sequence[tuple[str, float]], out: Path, single_file: Path | None) -> list[dict[str, Any]]:
    """Check the output paths and every LoRA before anything is loaded; each LoRA's provenance entry.

    A LoRA is whatever ``load_lora`` accepts (a file, or a folder with its ``adapter_config.json``),
    resolved by the same reader; its weight file's header is validated (a FIFO, a device or a pickle
    is refused without being read) before the file is hashed.
    """
    if out.exists():
        raise ConfigError(f"{out}: already exists; choose a new output folder or remove it first")
    if single_file is not None:
        safetensors_path(single_file, "single_file")
    entries = []
    for path, weight in loras:
        check_weight_value(f"weight of LoRA {path}", weight)
        weight_file, _ = resolve_adapter_path(path)
        read_header(weight_file)
        entry = {"path": os.fspath(path), "sha256": file_sha256(weight_file), "weight": weight}
        if weight_file != Path(path):
            entry["file"] = os.fspath(weight_file)
        entries.append(entry)
    return entries


def bake(
    model: str | os.PathLike,
    loras: Sequence[tuple[str | os.PathLike, float]],
    out_dir: str | os.PathLike,
    *,
    single_file: str | os.PathLike | None = None,
) -> BakeReport:
    """Load ``model``, load each LoRA at its weight, fuse, and save a plain diffusers folder at ``out_dir``.

    A LoRA is anything ``load_lora`` reads: a file, or a diffusers/PEFT folder (a PEFT
    ``adapter_model.safetensors`` keeps the ``lora_alpha`` of the ``adapter_config.json`` beside it).

    ``out_dir`` gets ``bake_info.json`` (model, LoRAs with sha256 and weights). With ``single_file``,
    a diffusers-named (not original-layout) ``.safetensors`` of all components is written too.
    On any failure no ``out_dir`` (nor a new ``single_file``) is left behind.
    """
    out = Path(out_dir)
    single = None if single_file is None else Path(single_file)
    info = {"model": os.fspath(model), "loras": _check_inputs(loras, out, single)}
    fused, layers = _fused_pipeline(os.fspath(model), [(os.fspath(p), w) for p, w in loras])
    plain = _plain_copy(os.fspath(model), fused)
    del fused
    tmp = out.parent / f".{out.name}.{secrets.token_hex(6)}.tmp"
    single_existed = single is not None and single.exists()
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        (tmp / BAKE_INFO).write_text(json.dumps(info, indent=2), encoding="utf-8")
        if single is not None:
            _write_single_file(plain, single)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if single is not None and not single_existed and not out.exists():
            single.unlink(missing_ok=True)
        raise
    logger.info("baked %d LoRA(s) into %s (%d layers changed)", len(loras), out, layers)
    return BakeReport(out_dir=out, layers_fused=layers, loras=info["loras"], single_file=single)
