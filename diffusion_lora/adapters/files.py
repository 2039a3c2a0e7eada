"""Reading adapter files into AdapterData and writing AdapterData out, for the adapter engine."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..errors import FormatError
from ..families import FAMILIES, Family
from ..formats.adapter_data import AdapterData
from ..formats.peft_format import parse_peft
from ..formats.safetensors_io import read_adapter_file

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


def read_adapter(path: str | os.PathLike, family: Family, *, allow_pickle: bool = False) -> tuple[Path, AdapterData]:
    """Read and parse an adapter file or folder for a pipeline of ``family``."""
    weight_file, config = resolve_adapter_path(path)
    tensors, metadata = read_adapter_file(weight_file, allow_pickle=allow_pickle)
    if not tensors:
        raise FormatError(f"{weight_file}: the file holds no tensors; it is not an adapter")
    # Every component name of every family, so another family's keys keep their component and fail
    # to match visibly instead of being taken for bare keys of this family's denoiser.
    components = {c for f in FAMILIES.values() for c in (f.denoiser, *f.text_encoders)}
    try:
        data = parse_peft(tensors, metadata, components, family.denoiser, config)
    except FormatError as exc:
        raise FormatError(f"{weight_file}: {exc}") from None
    return weight_file, data


def default_adapter_name(path: Path) -> str:
    """An adapter name from a file name: its stem with characters PEFT dislikes replaced."""
    stem = path.stem if path.suffix else path.name
    if stem in FOLDER_WEIGHT_NAMES or stem in {n.removesuffix(".safetensors") for n in FOLDER_WEIGHT_NAMES}:
        stem = path.parent.name
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_")
    return name or "lora"
