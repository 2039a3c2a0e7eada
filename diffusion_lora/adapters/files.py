"""Reading adapter files into AdapterData and writing AdapterData out, for the adapter engine."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, FormatError, UnsupportedModelError
from ..families import FAMILIES
from ..formats.adapter_data import AdapterData
from ..formats.comfyui import comfyui_names, comfyui_to_kohya, write_comfyui
from ..formats.detect import FileFormat, detect_format
from ..formats.kohya import kohya_metadata, parse_kohya, write_kohya
from ..formats.model_keys import ModelKeys
from ..formats.peft_format import parse_peft, write_peft
from ..formats.safetensors_io import read_adapter_file
from ..formats.sgm_blocks import UNetLayout
from .inject import plain_modules
from .state import AdapterState

# Weight files diffusers and PEFT put in a folder, in the order we look for them.
FOLDER_WEIGHT_NAMES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")


def resolve_adapter_path(path: str | os.PathLike) -> tuple[Path, dict | None]:
    """The weight file for a file or folder path, plus a PEFT ``adapter_config.json`` if one is beside it."""
    p = Path(path)
    if not p.exists():
        raise FormatError(f"{p}: no such file or folder; check the path of the adapter")
    config = None
    if p.is_dir():
        candidates = [p / n for n in FOLDER_WEIGHT_NAMES if (p / n).is_file()]
        if not candidates:
            candidates = sorted(p.glob("*.safetensors"))
        if len(candidates) != 1 and not (candidates and candidates[0].name in FOLDER_WEIGHT_NAMES):
            found = ", ".join(c.name for c in candidates) or "none"
            raise FormatError(
                f"{p}: expected one adapter .safetensors file in this folder (found: {found}); pass the file itself"
            )
        weight_file = candidates[0]
        cfg_file = p / "adapter_config.json"
        if cfg_file.is_file():
            try:
                config = json.loads(cfg_file.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise FormatError(f"{cfg_file}: not a readable adapter_config.json ({exc})") from None
            if not isinstance(config, dict):
                raise FormatError(f"{cfg_file}: adapter_config.json must hold a JSON object")
        return weight_file, config
    return p, None


@dataclass
class ReadAdapter:
    """An adapter file read for one pipeline: its data, its format and the keys that fit no module."""

    path: Path
    data: AdapterData
    format: FileFormat
    unresolved: list[str] = field(default_factory=list)


def model_keys_of(state: AdapterState) -> ModelKeys:
    """The module names of the pipeline's components (collected once; adapters never change them)."""
    if state.model_keys is None:
        family = state.family
        layout = None
        if family.denoiser == "unet":
            try:
                layout = UNetLayout.from_config(state.components["unet"].config)
            except UnsupportedModelError:  # no SGM names for this UNet; diffusers names still work
                layout = None
        paths = {c: tuple(p for p, _ in plain_modules(m)) for c, m in state.components.items()}
        state.model_keys = ModelKeys(family, paths, layout)
    return state.model_keys


def read_adapter(path: str | os.PathLike, keys: ModelKeys, *, allow_pickle: bool = False) -> ReadAdapter:
    """Read and parse an adapter file or folder, in any supported format, for the model of ``keys``."""
    weight_file, config = resolve_adapter_path(path)
    tensors, metadata = read_adapter_file(weight_file, allow_pickle=allow_pickle)
    family = keys.family
    try:
        fmt = detect_format(tensors, str(weight_file))
        if fmt is FileFormat.DIFFUSERS:
            # Every component name of every family, so another family's keys keep their component and
            # fail to match visibly instead of being taken for bare keys of this family's denoiser.
            components = {c for f in FAMILIES.values() for c in (f.denoiser, *f.text_encoders)}
            data = parse_peft(tensors, metadata, components, family.denoiser, config)
            return ReadAdapter(weight_file, data, fmt)
        if fmt is FileFormat.COMFYUI:
            tensors = comfyui_to_kohya(tensors, family.kohya_prefixes, family.comfyui_text_encoders, family.denoiser)
        data, unresolved = parse_kohya(tensors, metadata, keys.kohya, source=str(weight_file))
        data.format = fmt.value
        return ReadAdapter(weight_file, data, fmt, unresolved)
    except FormatError as exc:
        message = str(exc)
        raise FormatError(message if str(weight_file) in message else f"{weight_file}: {message}") from None


def default_adapter_name(path: Path) -> str:
    """An adapter name from a file name: its stem with characters PEFT dislikes replaced."""
    stem = path.stem if path.suffix else path.name
    if stem in FOLDER_WEIGHT_NAMES or stem in {n.removesuffix(".safetensors") for n in FOLDER_WEIGHT_NAMES}:
        stem = path.parent.name
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_")
    return name or "lora"


def encode_adapter(keys: ModelKeys, data: AdapterData, fmt: FileFormat | str) -> tuple[dict, dict[str, str]]:
    """Tensors and format metadata of ``data`` written as ``fmt`` for the model of ``keys``.

    kohya: ``lora_unet_``/``lora_te*_`` names with ``.alpha``, SGM block names for SDXL (what
    A1111/Forge and ComfyUI load natively), DoRA as ``dora_scale``; comfyui: ``diffusion_model.`` /
    ``text_encoders.`` names; diffusers: PEFT keys with ``lora_adapter_metadata``.
    """
    try:
        fmt = FileFormat(fmt)
    except ValueError:
        raise ConfigError(
            f"format {fmt!r} is unknown; choose one of {', '.join(f.value for f in FileFormat)}"
        ) from None
    family = keys.family
    if fmt is FileFormat.DIFFUSERS:
        return write_peft(data)
    if fmt is FileFormat.KOHYA:
        return write_kohya(data, keys.kohya, sgm=family.name == "sdxl")
    names = comfyui_names(data, family.denoiser, family.comfyui_text_encoders, keys.unet_layout)
    return write_comfyui(data, names), kohya_metadata(data)
