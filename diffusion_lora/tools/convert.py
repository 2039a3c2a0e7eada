"""``convert``: rewrite an adapter file in another key format, exactly, without loading a base model.

Key resolution uses the real module list of the file's family (a meta-device reference model, see
``models.reference``) or of a pipeline the caller passes. Every module must resolve: a file that
would lose modules in conversion is an error, and the output path is untouched on any failure.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..adapters import pipeline_keys
from ..errors import ConfigError, FamilyMismatchError, KeyMappingError
from ..families import Variant, detect_variant, get_family
from ..formats.adapter_data import AdapterData
from ..formats.adapter_files import header_of, resolve_adapter_path, safetensors_path
from ..formats.codec import encode
from ..formats.detect import FileFormat
from ..formats.file_variant import variant_of_files
from ..formats.metadata import ModelFacts, sharing_metadata, trigger_words_of
from ..formats.model_keys import ModelKeys
from ..formats.safetensors_io import write_adapter_file_with_hashes
from .base_keys import keys_for_files
from .files import file_family, read_checked

# Header entries that describe one format's layout; recomputed rather than copied.
_FORMAT_KEYS = ("lora_adapter_metadata", "ss_network_dim", "ss_network_alpha", "ss_network_module", "format")


def convert_file(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    to: str,
    *,
    family: str | None = None,
    pipe: Any = None,
    keys: ModelKeys | None = None,
    allow_pickle: bool = False,
) -> Path:
    """Write ``src`` to ``dst`` in format ``to``; returns ``dst``. Nothing is written on failure.

    Keys resolve against ``pipe`` or ``keys`` when given, else the base the file records when it
    resolves (see ``tools.base_keys``), else the family's reference model."""
    out = safetensors_path(dst)
    try:
        target = FileFormat(to)
    except ValueError:
        raise ConfigError(f"--to {to!r}: choose one of {', '.join(f.value for f in FileFormat)}") from None
    base = None
    given = pipe is not None or keys is not None
    weight_file, _ = resolve_adapter_path(src)
    metadata, names = header_of(weight_file, allow_pickle=allow_pickle)
    if pipe is not None:
        keys = pipeline_keys(pipe)
        variant = detect_variant(pipe)
    elif keys is None:
        found = get_family(family or file_family(weight_file, metadata, names))
        # SD3.5 Large/Medium names only resolve against their own layout (blocks 24-37, attn2)
        variant = variant_of_files(found, [(metadata, names)])
        keys, base = keys_for_files([metadata], found.name, variant.name)
    else:
        variant = variant_of_files(keys.family, [(metadata, names)])
    error = KeyMappingError if family or given else FamilyMismatchError
    read = read_checked(src, keys, base=base, hint=not given, allow_pickle=allow_pickle, unresolved_error=error)
    tensors, metadata = encode(keys, read.data, target)
    metadata.update(_carried_metadata(read.data, keys, target, out.stem, variant))
    write_adapter_file_with_hashes(out, tensors, metadata)
    return out


def _carried_metadata(
    data: AdapterData, keys: ModelKeys, target: FileFormat, stem: str, variant: Variant
) -> dict[str, str]:
    """The source's metadata minus layout-specific entries, with sharing metadata recomputed."""
    source = data.metadata
    family = keys.family
    kept = {k: v for k, v in source.items() if k not in _FORMAT_KEYS and not k.startswith("sshs_")}
    name = source.get("ss_output_name") or source.get("diffusion_lora.name") or stem
    facts = ModelFacts.of(family, target.value, variant)
    sharing = sharing_metadata(data, facts, name=name, trigger_words=trigger_words_of(source), inherited=source)
    return {**kept, **sharing, "diffusion_lora.family": family.name}
