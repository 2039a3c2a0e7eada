"""``convert``: rewrite an adapter file in another key format, exactly, without loading a base model.

Key resolution uses the real module list of the file's family (a meta-device reference model, see
``models.reference``) or of a pipeline the caller passes. Every module must resolve: a file that
would lose modules in conversion is an error, and the output path is untouched on any failure.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import ConfigError, FamilyMismatchError, KeyMappingError, UnsafeFileError
from ..families import FAMILIES, family_of_kohya_version
from ..formats.adapter_data import AdapterData
from ..formats.detect import FileFormat
from ..formats.family_guess import guess_families
from ..formats.metadata import ModelFacts, sharing_metadata, trigger_words_of
from ..formats.model_keys import ModelKeys
from ..formats.safetensors_io import read_adapter_file, read_header, write_adapter_file_with_hashes

# Header entries that describe one format's layout; recomputed rather than copied.
_FORMAT_KEYS = ("lora_adapter_metadata", "ss_network_dim", "ss_network_alpha", "ss_network_module", "format")


def file_family(path: str | os.PathLike, metadata: dict[str, str], keys: list[str]) -> str:
    """The family a file belongs to: from its metadata, else from its key names; ConfigError if unclear."""
    if metadata.get("diffusion_lora.family") in FAMILIES:
        return metadata["diffusion_lora.family"]
    kohya_family = family_of_kohya_version(metadata.get("ss_base_model_version", ""))
    if kohya_family is not None:
        return kohya_family.name
    dotted = [k.rsplit(".lora", 1)[0] for k in keys if k.split(".")[0] in {"unet", "transformer", "text_encoder_2"}]
    guess = guess_families(dotted, extra_keys=keys)
    if len(guess) == 1:
        return next(iter(guess))
    raise ConfigError(
        f"{path}: cannot tell which model family this adapter is for (candidates: "
        f"{', '.join(sorted(guess)) or 'none'}); pass --family or --model"
    )


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


def family_of_file(path: str | os.PathLike, *, allow_pickle: bool = False) -> str:
    """:func:`file_family` from the file's header alone (a pickle, when allowed, is read whole)."""
    return file_family(path, *header_of(path, allow_pickle=allow_pickle))


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
    from ..adapters.files import model_keys_of, read_adapter, resolve_adapter_path
    from ..adapters.state import state_of
    from ..adapters.validate import check_against_keys
    from ..formats.codec import encode
    from .base_keys import keys_for_files, misfit_hint

    out = Path(dst)
    if out.suffix != ".safetensors":
        raise ConfigError(f"{out}: adapter files must end in .safetensors")
    try:
        target = FileFormat(to)
    except ValueError:
        raise ConfigError(f"--to {to!r}: choose one of {', '.join(f.value for f in FileFormat)}") from None
    base = None
    given = pipe is not None or keys is not None
    if pipe is not None:
        keys = model_keys_of(state_of(pipe))
    elif keys is None:
        weight_file, _ = resolve_adapter_path(src)
        metadata, names = header_of(weight_file, allow_pickle=allow_pickle)
        keys, base = keys_for_files([metadata], family or file_family(weight_file, metadata, names))
    read = read_adapter(src, keys, allow_pickle=allow_pickle)
    hint = "" if given else misfit_hint(read.data.metadata, base)
    if read.unresolved:
        shown = ", ".join(read.unresolved[:5])
        error = KeyMappingError if family or given else FamilyMismatchError
        raise error(
            f"{read.path}: {len(read.unresolved)} key(s) match no module of the {keys.family.title} model "
            f"(e.g. {shown}); nothing was written{hint}"
        )
    try:
        check_against_keys(read.data, keys, str(read.path))
    except KeyMappingError as exc:
        raise type(exc)(f"{exc}{hint}") from None
    tensors, metadata = encode(keys, read.data, target)
    metadata.update(_carried_metadata(read.data, keys, target, out.stem))
    write_adapter_file_with_hashes(out, tensors, metadata)
    return out


def _carried_metadata(data: AdapterData, keys: ModelKeys, target: FileFormat, stem: str) -> dict[str, str]:
    """The source's metadata minus layout-specific entries, with sharing metadata recomputed."""
    source = data.metadata
    family = keys.family
    kept = {k: v for k, v in source.items() if k not in _FORMAT_KEYS and not k.startswith("sshs_")}
    name = source.get("ss_output_name") or source.get("diffusion_lora.name") or stem
    sharing = sharing_metadata(
        data, ModelFacts.of(family, target.value), name=name, trigger_words=trigger_words_of(source), inherited=source
    )
    return {**kept, **sharing, "diffusion_lora.family": family.name}
