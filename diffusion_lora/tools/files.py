"""The file tools' inputs and outputs: adapter files read and checked against one model's layers,
and adapter files written with fresh sharing metadata and hashes (atomically, through ``formats``)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..errors import ConfigError, FamilyMismatchError, KeyMappingError
from ..families import get_family
from ..formats.adapter_data import AdapterData
from ..formats.adapter_files import ReadAdapter, header_of, read_adapter, resolve_adapter_path
from ..formats.checks import check_against_keys
from ..formats.codec import encode
from ..formats.file_family import family_of
from ..formats.file_variant import variant_of_files
from ..formats.kohya import kohya_metadata
from ..formats.model_keys import ModelKeys
from ..formats.safetensors_io import write_adapter_file_with_hashes
from .base_keys import keys_for_files, misfit_hint


def file_family(path: str | os.PathLike, metadata: Mapping[str, str], keys: Sequence[str]) -> str:
    """The one family a file is for (see ``formats.file_family``); ConfigError naming the candidates if unclear."""
    found = family_of(metadata, keys)
    if found.one is not None:
        return found.one
    raise ConfigError(
        f"{path}: cannot tell which model family this adapter is for (candidates: "
        f"{', '.join(found.names) or 'none'}); pass --family or --model"
    )


def read_checked(
    path: str | os.PathLike,
    keys: ModelKeys,
    *,
    base: str | None = None,
    hint: bool = True,
    allow_pickle: bool = False,
    unresolved_error: type[KeyMappingError] = KeyMappingError,
) -> ReadAdapter:
    """Read ``path`` for ``keys``: every key must resolve (else ``unresolved_error``), every module must fit
    the model's layer shapes (KeyMappingError) and hold finite numbers (FormatError).

    With ``hint``, a misfit's message says which model the shapes came from (``base``: the recorded base
    model the keys were built from; None: the family's reference model), see ``base_keys.misfit_hint``.
    """
    read = read_adapter(path, keys, allow_pickle=allow_pickle)
    extra = misfit_hint(read.data.metadata, base) if hint else ""
    if read.unresolved:
        raise unresolved_error(
            f"{read.path}: {len(read.unresolved)} key(s) match no module of the {keys.family.title} model "
            f"(e.g. {', '.join(read.unresolved[:5])}); nothing was written{extra}"
        )
    try:
        check_against_keys(read.data, keys, str(read.path))
    except KeyMappingError as exc:
        raise type(exc)(f"{exc}{extra}") from None
    return read


def read_inputs(
    paths: Sequence[str | os.PathLike], family: str | None, keys: ModelKeys | None, *, allow_pickle: bool = False
) -> tuple[list[ReadAdapter], ModelKeys]:
    """Read every file for one model; KeyMappingError naming the file on another family, unresolved keys
    or shapes that do not fit; FormatError on NaN/Inf. Pickles only with ``allow_pickle``.

    Without ``keys`` the model is the base the files record when it resolves (see ``tools.base_keys``),
    else the family's reference model; a misfit then says which base the file records.
    """
    families: list[str | None] = []
    metadatas: list[dict[str, str]] = []
    headers: list[tuple[dict[str, str], list[str]]] = []
    for p in paths:
        weight_file, _ = resolve_adapter_path(p)
        metadata, names = header_of(weight_file, allow_pickle=allow_pickle)
        metadatas.append(metadata)
        headers.append((metadata, list(names)))
        try:
            families.append(file_family(weight_file, metadata, names))
        except ConfigError:
            if keys is None and family is None and not families:
                raise
            families.append(None)
    given = keys is not None
    base = None
    if keys is None:
        found = get_family(family or families[0])
        variant = variant_of_files(found, headers)  # SD3.5 Large/Medium: their own layout
        keys, base = keys_for_files(metadatas, found.name, variant.name)
    target = keys.family.name
    for p, found in zip(paths, families):
        if found is not None and found != target:
            raise FamilyMismatchError(
                f"{p}: this adapter is for {found}, the merge is for {target}; nothing was written"
            )
    reads = [read_checked(p, keys, base=base, hint=not given, allow_pickle=allow_pickle) for p in paths]
    return reads, keys


def write_output(path: Path, keys: ModelKeys, data: AdapterData, to: str, extra: Mapping[str, str]) -> None:
    """Encode ``data`` as ``to`` with fresh ``ss_network_*`` entries and hashes, and write it atomically."""
    tensors, encoded = encode(keys, data, to)
    metadata = {**extra, **kohya_metadata(data), **encoded, "diffusion_lora.family": keys.family.name}
    write_adapter_file_with_hashes(path, tensors, metadata)
