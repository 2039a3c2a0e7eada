"""Adapter files and folders on disk: finding the weight file, reading it for a model's keys, naming it,
and the rule for output names. Pure file work: no pipeline (formats are decoded in ``formats.codec``)."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, FormatError, UnsafeFileError
from .adapter_data import AdapterData
from .codec import decode
from .json_text import read_json_object
from .model_keys import ModelKeys
from .peft_format import LORA_ADAPTER_METADATA_KEY, PEFT_MODEL_PREFIX
from .safetensors_io import read_adapter_file, read_header

logger = logging.getLogger(__name__)

# Weight files diffusers and PEFT put in a folder, in the order we look for them.
FOLDER_WEIGHT_NAMES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")
PEFT_WEIGHT_NAME, PEFT_CONFIG_NAME = "adapter_model.safetensors", "adapter_config.json"
SUFFIX = ".safetensors"


def safetensors_path(path: str | os.PathLike, what: str = "adapter files") -> Path:
    """``path`` as a Path when it ends in ``.safetensors``; ConfigError naming it and ``what`` otherwise."""
    out = Path(path)
    if out.suffix != SUFFIX:
        raise ConfigError(f"{out}: {what} must end in {SUFFIX}")
    return out


def resolve_adapter_path(path: str | os.PathLike) -> tuple[Path, dict | None]:
    """The weight file for a file or folder path, plus a PEFT ``adapter_config.json`` if one is beside it."""
    p = Path(path)
    try:
        exists, is_dir = p.exists(), p.is_dir()
    except OSError as exc:  # e.g. a name over 255 bytes
        raise FormatError(f"{p}: cannot be read: {exc.strerror or exc}; check the path of the adapter") from None
    if p.name == PEFT_WEIGHT_NAME and p.is_file() and (p.parent / PEFT_CONFIG_NAME).is_file():
        # PEFT keeps lora_alpha only in adapter_config.json: the file is read as part of its folder.
        folder_file, folder_config = resolve_adapter_path(p.parent)
        if folder_file == p:
            return p, folder_config
    if not exists:
        raise FormatError(f"{p}: no such file or folder; check the path of the adapter")
    config = None
    if is_dir:
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
            config = _read_config(cfg_file)
        return weight_file, config
    return p, None


# PEFT's adapter_config.json is a few kB (a rank_pattern for every layer of a large model stays well
# under 1 MB); a larger one is not read at all, so a huge file cannot fill memory.
MAX_CONFIG_BYTES = 4 * 2**20


def _read_config(cfg_file: Path) -> dict:
    """The JSON object in a PEFT ``adapter_config.json``, read with a size bound; FormatError otherwise."""
    return read_json_object(
        cfg_file, max_bytes=MAX_CONFIG_BYTES, what="adapter_config.json",
        too_big="it is not a PEFT config (remove it, or pass the .safetensors file itself)",
    )


@dataclass
class ReadAdapter:
    """An adapter file read for one model's keys: its data, its format and the keys that fit no module."""

    path: Path
    data: AdapterData
    format: str
    unresolved: list[str] = field(default_factory=list)


def read_adapter(path: str | os.PathLike, keys: ModelKeys, *, allow_pickle: bool = False) -> ReadAdapter:
    """Read and parse an adapter file or folder, in any supported format, for the model of ``keys``."""
    weight_file, config = resolve_adapter_path(path)
    tensors, metadata = read_adapter_file(weight_file, allow_pickle=allow_pickle)
    if config is None:
        _warn_if_alpha_unknown(weight_file, tensors, metadata)
    try:
        decoded = decode(tensors, metadata, keys, peft_config=config, source=str(weight_file))
    except FormatError as exc:
        message = str(exc)
        raise FormatError(message if str(weight_file) in message else f"{weight_file}: {message}") from None
    return ReadAdapter(weight_file, decoded.data, decoded.format, decoded.unresolved)


def _warn_if_alpha_unknown(weight_file: Path, tensors: dict, metadata: dict[str, str]) -> None:
    """Say so when a PEFT ``save_pretrained`` file comes without the config that holds its lora_alpha."""
    if LORA_ADAPTER_METADATA_KEY in metadata or not any(k.startswith(PEFT_MODEL_PREFIX) for k in tensors):
        return
    logger.warning(
        "%s: a PEFT adapter file without its %s, which holds lora_alpha; it is loaded with alpha = rank "
        "(scale 1), as diffusers assumes. If it was trained with another lora_alpha, pass the folder that "
        "holds both files (or put %s beside it)", weight_file, PEFT_CONFIG_NAME, PEFT_CONFIG_NAME,
    )


def default_adapter_name(path: Path) -> str:
    """An adapter name from a file name: its stem with characters PEFT dislikes replaced."""
    stem = path.stem if path.suffix else path.name
    if stem in FOLDER_WEIGHT_NAMES or stem in {n.removesuffix(".safetensors") for n in FOLDER_WEIGHT_NAMES}:
        stem = path.parent.name
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_")
    return name or "lora"


def header_of(path: str | os.PathLike, *, allow_pickle: bool = False) -> tuple[dict[str, str], list[str]]:
    """(metadata, tensor names) from the file's header alone (a pickle, when allowed, is read whole)."""
    try:
        header = read_header(path)
        return dict(header.metadata), list(header.tensors)
    except UnsafeFileError:
        if not allow_pickle:
            raise
        tensors, metadata = read_adapter_file(path, allow_pickle=True)
        return metadata, list(tensors)
