"""The one reader and writer of adapter files.

Every read validates the whole header first (:mod:`.safetensors_header`), so hostile or broken input
ends in a :class:`FormatError` that says what is wrong, never in a crash, a hang or a huge allocation.
Pickle checkpoints (``torch.save``) are refused with :class:`UnsafeFileError` unless the caller passes
``allow_pickle=True``.

Writing is atomic: a temp file in the target's folder, fsync, ``os.replace``, fsync of the folder.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

import safetensors.torch
import torch
from safetensors import SafetensorError

from diffusion_lora.errors import FormatError
from diffusion_lora.formats.atomic import atomic_write_bytes
from diffusion_lora.formats.hashes import addnet_hash_of_bytes, legacy_hash_of_bytes
from diffusion_lora.formats.regular_file import reading
from diffusion_lora.formats.safetensors_header import (
    DEFAULT_MAX_HEADER_BYTES,
    FLOAT_DTYPES,
    AdapterHeader,
    inspect_open_file,
    read_exact,
)

logger = logging.getLogger(__name__)


def read_adapter_file(
    path: str | os.PathLike[str],
    *,
    allow_pickle: bool = False,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read an adapter file into CPU tensors and its ``__metadata__`` (``{}`` for pickle checkpoints).

    Every tensor is floating point (float16, bfloat16, float32 or float64). Values are not checked for
    NaN/Inf here; see :func:`find_non_finite`. Raises FormatError (naming the path, and the key where
    one is at fault) for anything that is not a well-formed adapter file, and UnsafeFileError for a
    pickle checkpoint unless ``allow_pickle`` is true, in which case it is read with
    ``torch.load(weights_only=True)``.
    """
    path = Path(path)
    # One open file for the header and the data: a writer that renames a new file into place
    # meanwhile (atomic saves do) cannot hand us one file's header and another's tensors.
    with reading(path) as f:
        header = inspect_open_file(f, path, max_header_bytes, allow_pickle=allow_pickle)
        if header is None:
            return _load_pickle(f, path), {}
        return _load_safetensors(f, path, header), dict(header.metadata)


def read_header(
    path: str | os.PathLike[str], *, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
) -> AdapterHeader:
    """The validated header of a safetensors adapter file, without reading any tensor data.

    Raises FormatError as :func:`read_adapter_file` does, and UnsafeFileError for pickle checkpoints.
    """
    path = Path(path)
    with reading(path) as f:
        header = inspect_open_file(f, path, max_header_bytes, allow_pickle=False)
    assert header is not None  # allow_pickle=False never yields a pickle checkpoint
    return header


def read_metadata(
    path: str | os.PathLike[str], *, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors adapter file; the header is validated as in a full read."""
    return dict(read_header(path, max_header_bytes=max_header_bytes).metadata)


def find_non_finite(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Keys (in mapping order) of the tensors that contain at least one NaN or ±Inf."""
    return [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def write_adapter_file(
    path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> None:
    """Atomically write ``tensors`` (made contiguous, on CPU) and ``metadata`` as a safetensors file.

    Either the complete new file is at ``path`` or, on any failure, the previous file (if any) is left
    untouched and no temp file remains. The serialized file is held in memory while it is written.
    Raises FormatError naming the path (and the key at fault) for a non-tensor or non-float value, a
    non-str metadata value, or an OS error such as a full disk or a missing folder.
    """
    path = Path(path)
    data = _serialize(_prepare_tensors(tensors, path), _check_metadata(metadata, path), path)
    atomic_write_bytes(path, data, what="adapter file")


def write_adapter_file_with_hashes(
    path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> dict[str, str]:
    """Like :func:`write_adapter_file`, adding kohya's ``sshs_model_hash`` and ``sshs_legacy_hash``.

    The hashes are computed as kohya does, on a serialization that keeps only the ``ss_*`` metadata;
    ``sshs_model_hash`` equals :func:`~diffusion_lora.formats.hashes.addnet_hash` of the written file.
    Existing ``sshs_*`` values are replaced, since they describe other tensors; with ModelSpec keys
    present, ``modelspec.hash_sha256`` is set to the same data hash. Holds the serialized
    file in memory (twice, briefly). Returns the metadata written.
    """
    path = Path(path)
    prepared = _prepare_tensors(tensors, path)
    meta = _check_metadata(metadata, path)
    training_only = _serialize(prepared, {k: v for k, v in meta.items() if k.startswith("ss_")}, path)
    meta["sshs_model_hash"] = addnet_hash_of_bytes(training_only)
    meta["sshs_legacy_hash"] = legacy_hash_of_bytes(training_only)
    if "modelspec.sai_model_spec" in meta:  # ModelSpec's hash is of the tensor data too, 0x-prefixed
        meta["modelspec.hash_sha256"] = "0x" + meta["sshs_model_hash"]
    del training_only
    atomic_write_bytes(path, _serialize(prepared, meta, path), what="adapter file")
    return meta


def data_section_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """The :func:`~diffusion_lora.formats.hashes.addnet_hash` a file holding ``tensors`` will have.

    Computed by serializing with safetensors (in memory), so it follows safetensors' own data order
    whatever the metadata.
    """
    label = Path("<tensors>")
    return addnet_hash_of_bytes(_serialize(_prepare_tensors(tensors, label), None, label))


# --- reading: tensors -------------------------------------------------------------------------


def _load_safetensors(f: BinaryIO, path: Path, header: AdapterHeader) -> dict[str, torch.Tensor]:
    """The tensors of a validated header, read from the same open file (offsets are already checked).

    safetensors stores little-endian numbers, as every platform torch ships for is.
    """
    f.seek(header.data_start)
    data = bytearray(read_exact(f, os.fstat(f.fileno()).st_size - header.data_start, path))
    tensors = {}
    for key, info in header.tensors.items():
        begin, end = info.data_offsets
        dtype = FLOAT_DTYPES[info.dtype]
        flat = torch.frombuffer(data, dtype=dtype, offset=begin, count=(end - begin) // dtype.itemsize) \
            if end > begin else torch.empty(0, dtype=dtype)
        tensors[key] = flat.reshape(info.shape).clone()  # own memory: the buffer is freed on return
    return tensors


def _load_pickle(f: BinaryIO, path: Path) -> dict[str, torch.Tensor]:
    try:
        # The open file, not the path: torch.load hands paths ending in .safetensors to safetensors.
        f.seek(0)
        obj = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types on bad input: UnpicklingError, EOFError, ...
        raise FormatError(f"{path}: not a readable torch checkpoint: {e}") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise FormatError(f"{path}: checkpoint holds a {type(obj).__name__}, not a dict of tensors")
    return _prepare_tensors(obj, path)


# --- writing ----------------------------------------------------------------------------------


def _check_float(key: str, dtype: torch.dtype, path: Path) -> None:
    if dtype not in FLOAT_DTYPES.values():
        raise FormatError(
            f"{path}: tensor {key!r} has dtype {dtype}; adapter weights must be float16, bfloat16, "
            "float32 or float64 (cast it first)"
        )


def _prepare_tensors(tensors: Mapping[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU float tensors, no two sharing storage (safetensors refuses that)."""
    if not isinstance(tensors, Mapping):
        raise FormatError(f"{path}: tensors must be a mapping of str to tensor, not {type(tensors).__name__}")
    prepared: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for key, t in tensors.items():
        if not isinstance(key, str) or key == "__metadata__":
            raise FormatError(f"{path}: tensor key {key!r} is not allowed; keys are str, not '__metadata__'")
        if not isinstance(t, torch.Tensor):
            raise FormatError(f"{path}: tensor {key!r} is a {type(t).__name__}, not a torch.Tensor")
        _check_float(key, t.dtype, path)
        if t.layout != torch.strided or t.is_meta:
            raise FormatError(f"{path}: tensor {key!r} is {t.layout} on {t.device}; it holds no dense data")
        t = t.detach().to("cpu").contiguous()
        if t.nbytes and t.untyped_storage().data_ptr() in storages:
            t = t.clone()  # e.g. tied weights, or a tensor and a view of it
        if t.nbytes:
            storages.add(t.untyped_storage().data_ptr())
        prepared[key] = t
    return prepared


def _check_metadata(metadata: Mapping[str, str], path: Path) -> dict[str, str]:
    if not isinstance(metadata, Mapping):
        raise FormatError(f"{path}: metadata must be a mapping of str to str, not {type(metadata).__name__}")
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise FormatError(
                f"{path}: metadata key {key!r} has a {type(value).__name__} value; keys and values "
                "must be str (json.dumps structured values)"
            )
    return dict(metadata)


def _serialize(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None, path: Path) -> bytes:
    try:
        return safetensors.torch.save(tensors, metadata=metadata)
    except (SafetensorError, RuntimeError, ValueError) as e:
        raise FormatError(f"{path}: could not serialize the tensors: {e}") from e
