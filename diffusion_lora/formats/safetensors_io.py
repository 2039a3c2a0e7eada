"""The one reader and writer of adapter files.

A safetensors file is ``u64 little-endian N`` + ``N`` bytes of UTF-8 JSON header + the tensor data.
This module validates the whole header itself before safetensors sees the file, so hostile or broken
input ends in a :class:`FormatError` that says what is wrong, never in a crash, a hang or a huge
allocation. Pickle checkpoints (``torch.save``) are refused with :class:`UnsafeFileError` unless the
caller passes ``allow_pickle=True``.

Writing is atomic: a temp file in the target's folder, fsync, ``os.replace``, fsync of the folder.
"""

from __future__ import annotations

import codecs
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import safetensors.torch
import torch
from safetensors import SafetensorError

from diffusion_lora.errors import FormatError, UnsafeFileError
from diffusion_lora.formats.atomic import atomic_write_bytes
from diffusion_lora.formats.hashes import addnet_hash_of_bytes, legacy_hash_of_bytes
from diffusion_lora.formats.regular_file import reading

logger = logging.getLogger(__name__)

DEFAULT_MAX_HEADER_BYTES = 100 * 2**20
# The most tensors a file may hold. The largest real adapters (every layer and norm of SDXL with both
# text encoders, ComfyUI's trainer writing up/down/alpha/diff_b per layer) hold about 5,000; a header
# that lists 1.5 M tiny entries fits in 100 MB and would take a minute and gigabytes to parse.
MAX_TENSORS = 50_000
FLOAT_DTYPES: Mapping[str, torch.dtype] = {
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}
# Every dtype name safetensors writes; the ones outside FLOAT_DTYPES are known but refused.
SAFETENSORS_DTYPES = frozenset(FLOAT_DTYPES) | {
    "BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64", "C64",
    "F8_E5M2", "F8_E4M3", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2",
}  # fmt: skip
PICKLE_SUFFIXES = frozenset({".ckpt", ".pt", ".pth", ".bin"})
_SNIFF_BYTES = 64
_JSON_WHITESPACE = b" \t\n\r"
_U64_MAX = 2**64 - 1


@dataclass(frozen=True)
class TensorInfo:
    """One tensor entry of a validated header; ``data_offsets`` are relative to the data section."""

    dtype: str
    shape: tuple[int, ...]
    data_offsets: tuple[int, int]


@dataclass(frozen=True)
class AdapterHeader:
    """A validated safetensors header: metadata, tensor entries (in header order), data start in bytes."""

    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]
    data_start: int


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
        header = _inspect_open_file(f, path, max_header_bytes, allow_pickle=allow_pickle)
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
    header = _inspect(path, max_header_bytes, allow_pickle=False)
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


# --- reading: header validation ---------------------------------------------------------------


def _inspect(path: Path, max_header_bytes: int, *, allow_pickle: bool) -> AdapterHeader | None:
    """Validated header of a safetensors file, or None for a pickle checkpoint that may be loaded."""
    with reading(path) as f:
        return _inspect_open_file(f, path, max_header_bytes, allow_pickle=allow_pickle)


def _inspect_open_file(
    f: BinaryIO, path: Path, max_header_bytes: int, *, allow_pickle: bool
) -> AdapterHeader | None:
    # Safetensors first: a header length whose low byte is 0x80 looks like pickle's PROTO opcode.
    size = os.fstat(f.fileno()).st_size
    if size == 0:
        raise FormatError(f"{path}: file is empty (0 bytes); the download or save was interrupted")
    head = f.read(_SNIFF_BYTES)
    header_len = int.from_bytes(head[:8], "little") if size >= 8 else None
    if header_len is not None and _fits(header_len, size, max_header_bytes):
        if head[8:].lstrip(_JSON_WHITESPACE)[:1] in (b"{", b""):
            f.seek(8)
            return _parse_header(_read_exact(f, header_len, path), path, size - 8 - header_len)
    kind = _sniff(head)
    pickle_like = kind in ("zip", "pickle") or (kind is None and path.suffix.lower() in PICKLE_SUFFIXES)
    if pickle_like and allow_pickle:
        return None
    if kind in ("zip", "pickle"):
        raise UnsafeFileError(_pickle_refusal(path, kind))
    raise FormatError(_not_safetensors_message(path, head, header_len, size, max_header_bytes, kind))


def _fits(header_len: int, size: int, max_header_bytes: int) -> bool:
    return header_len <= max_header_bytes and 8 + header_len <= size


def _read_exact(f: BinaryIO, n: int, path: Path) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise FormatError(f"{path}: file shrank while being read; try again")
    return data


def _sniff(head: bytes) -> str | None:
    """Name of a well-known non-safetensors content in the first bytes of a file, if any."""
    text = head.lstrip(b"\xef\xbb\xbf" + _JSON_WHITESPACE)
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    if text.startswith(b"version https://git-lfs"):
        return "git-lfs"
    if text.startswith(b"<"):
        return "html"
    if text.startswith(b"{"):
        return "json"
    return None


def _pickle_refusal(path: Path, kind: str) -> str:
    container = "a zip-format torch.save checkpoint" if kind == "zip" else "a pickle checkpoint"
    return (
        f"{path}: is {container}, not safetensors. Loading pickle can execute arbitrary code, so it is "
        "refused. If you trust the file, convert it once to safetensors (diffusion-lora convert), or "
        "read it with read_adapter_file(path, allow_pickle=True), which uses "
        "torch.load(weights_only=True)."
    )


def _not_safetensors_message(
    path: Path, head: bytes, header_len: int | None, size: int, max_header_bytes: int, kind: str | None
) -> str:
    if kind == "git-lfs":
        return (
            f"{path}: is a git-lfs pointer, not the adapter itself; run `git lfs pull` in the "
            "repository or download the file directly (e.g. with huggingface_hub)"
        )
    if kind == "html":
        return (
            f"{path}: is an HTML page (a login, error or web page saved instead of the file); download "
            "the raw file (on Hugging Face use a /resolve/ URL, not /blob/)"
        )
    if kind == "json":
        return f"{path}: is a JSON document (perhaps an error response from a download), not safetensors"
    if header_len is None:
        return f"{path}: only {size} bytes, too short to be a safetensors file (needs at least 8)"
    if header_len > max_header_bytes:
        # The number is just the file's first 8 bytes read as an integer: saying it would echo them.
        return (
            f"{path}: not a safetensors file or corrupted: its first 8 bytes do not declare a header "
            f"length within the {max_header_bytes}-byte limit ({_content_kind(head)})"
        )
    if 8 + header_len > size:
        return (
            f"{path}: declares a {header_len}-byte header but the file has only {size} bytes; it is "
            f"truncated or not a safetensors file ({_content_kind(head)})"
        )
    return f"{path}: header does not start with '{{'; not a safetensors file ({_content_kind(head)})"


def _content_kind(head: bytes) -> str:
    """What the first bytes look like, described without echoing them (errors never show file contents)."""
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=False)  # a cut last char is fine
    except UnicodeDecodeError:
        return "it starts with binary data"
    return "it starts with text" if all(c.isprintable() or c.isspace() for c in text) else "it starts with binary data"


class _DuplicateKeyError(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKeyError(key)
        result[key] = value
    return result


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")


def _parse_header(raw: bytes, path: Path, data_size: int) -> AdapterHeader:
    # Every tensor entry spells "data_offsets": counting them bounds the work before any parsing.
    entries = raw.count(b'"data_offsets"')
    if entries > MAX_TENSORS:
        raise FormatError(
            f"{path}: the header lists about {entries:,} tensors, more than the {MAX_TENSORS:,} any adapter "
            f"holds; the file is corrupt or hostile"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"{path}: header is not valid UTF-8 (at byte {8 + e.start}); corrupted") from e
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_reject_constant)
    except _DuplicateKeyError as e:
        raise FormatError(f"{path}: header has key {e.args[0]!r} twice; corrupted or forged") from e
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise FormatError(f"{path}: header is not valid JSON ({e}); corrupted") from e
    if not isinstance(obj, dict):
        raise FormatError(f"{path}: header is {_json_type(obj)}, not a JSON object; corrupted")
    metadata = _parse_metadata(obj.pop("__metadata__", None), path)
    tensors = {key: _parse_tensor_entry(key, entry, path) for key, entry in obj.items()}
    _check_layout(tensors, data_size, path)
    return AdapterHeader(metadata, tensors, 8 + len(raw))


def _parse_metadata(value: object, path: Path) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise FormatError(f"{path}: __metadata__ is {_json_type(value)}, not an object of strings")
    for key, item in value.items():
        if not isinstance(item, str):
            raise FormatError(f"{path}: __metadata__ key {key!r} is {_json_type(item)}, not a string")
    return value


def _parse_tensor_entry(key: str, entry: object, path: Path) -> TensorInfo:
    where = f"{path}: tensor {key!r}"
    if not isinstance(entry, dict):
        raise FormatError(f"{where}: entry is {_json_type(entry)}, not an object")
    dtype = entry.get("dtype")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise FormatError(f"{where}: unknown dtype {dtype!r}")
    if dtype not in FLOAT_DTYPES:
        raise FormatError(
            f"{where}: dtype {dtype} is not floating point; adapter weights must be "
            f"{', '.join(FLOAT_DTYPES)}"
        )
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(_is_u64(d) for d in shape):
        raise FormatError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_u64(o) for o in offsets)):
        raise FormatError(f"{where}: data_offsets {offsets!r} is not [begin, end]")
    begin, end = offsets
    numel = 1
    for d in shape:  # mirrors safetensors' checked u64 product, and torch's int64 sizes
        numel *= d
        if numel > _U64_MAX or d >= 2**63:
            raise FormatError(f"{where}: shape {shape} is too large")
    if numel == 0:
        raise FormatError(f"{where}: shape {shape} holds no numbers; an adapter tensor is never empty")
    expected = numel * FLOAT_DTYPES[dtype].itemsize
    if end < begin or end - begin != expected:
        raise FormatError(
            f"{where}: data_offsets [{begin}, {end}] span {end - begin} bytes but {dtype} {shape} "
            f"needs {expected}"
        )
    return TensorInfo(dtype, tuple(shape), (begin, end))


def _is_u64(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _U64_MAX


def _json_type(value: object) -> str:
    """The JSON kind of a parsed value, with its article: "an array", "null", ..."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number"}
    return "null" if value is None else names.get(type(value), "a number")


def _check_layout(tensors: Mapping[str, TensorInfo], data_size: int, path: Path) -> None:
    """Tensor data must tile the data section exactly: from 0, no overlap, no gap, to its end."""
    position, previous = 0, None
    for key, info in sorted(tensors.items(), key=lambda kv: kv[1].data_offsets):
        begin, end = info.data_offsets
        if begin < position:
            raise FormatError(f"{path}: tensor {key!r} data [{begin}, {end}] overlaps tensor {previous!r}")
        if begin > position:
            raise FormatError(
                f"{path}: {begin - position} unused bytes before tensor {key!r} (a gap in data_offsets)"
            )
        position, previous = end, key
    if position > data_size:
        raise FormatError(
            f"{path}: truncated: the header describes {position} bytes of tensor data but the file "
            f"holds {data_size}; download or save it again"
        )
    if position < data_size:
        raise FormatError(f"{path}: {data_size - position} bytes of trailing garbage after the last tensor")


# --- reading: tensors -------------------------------------------------------------------------


def _load_safetensors(f: BinaryIO, path: Path, header: AdapterHeader) -> dict[str, torch.Tensor]:
    """The tensors of a validated header, read from the same open file (offsets are already checked).

    safetensors stores little-endian numbers, as every platform torch ships for is.
    """
    f.seek(header.data_start)
    data = bytearray(_read_exact(f, os.fstat(f.fileno()).st_size - header.data_start, path))
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
