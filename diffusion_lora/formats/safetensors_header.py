"""Reading and checking a safetensors header without trusting it.

A safetensors file is ``u64 little-endian N`` + ``N`` bytes of UTF-8 JSON header + the tensor data.
The whole header is validated here before safetensors or torch sees the file, so hostile or broken
input ends in a :class:`FormatError` that says what is wrong, never in a crash, a hang or a huge
allocation: the declared length is checked against the file and a cap, entries are counted before the
JSON is parsed, every dtype, shape and offset is checked, and the tensors must tile the data section.
Content that is not safetensors is named (pickle, zip, git-lfs pointer, HTML, JSON) without echoing it;
pickle checkpoints are refused with :class:`UnsafeFileError` unless the caller allows them.
Opening files and reading tensors is :mod:`.safetensors_io`'s job; this module works on an open file.
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from diffusion_lora.errors import FormatError, UnsafeFileError

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


def inspect_open_file(
    f: BinaryIO, path: Path, max_header_bytes: int, *, allow_pickle: bool
) -> AdapterHeader | None:
    """The validated header of open file ``f`` (``path`` only names it in errors), or None for a pickle
    checkpoint when ``allow_pickle`` is true (the caller then loads it from ``f``).

    Raises FormatError saying what the file is and what is wrong with it, and UnsafeFileError for a
    pickle checkpoint that is not allowed.
    """
    # Safetensors first: a header length whose low byte is 0x80 looks like pickle's PROTO opcode.
    size = os.fstat(f.fileno()).st_size
    if size == 0:
        raise FormatError(f"{path}: file is empty (0 bytes); the download or save was interrupted")
    head = f.read(_SNIFF_BYTES)
    header_len = int.from_bytes(head[:8], "little") if size >= 8 else None
    if header_len is not None and _fits(header_len, size, max_header_bytes):
        if head[8:].lstrip(_JSON_WHITESPACE)[:1] in (b"{", b""):
            f.seek(8)
            return _parse_header(read_exact(f, header_len, path), path, size - 8 - header_len)
    kind = _sniff(head)
    pickle_like = kind in ("zip", "pickle") or (kind is None and path.suffix.lower() in PICKLE_SUFFIXES)
    if pickle_like and allow_pickle:
        return None
    if kind in ("zip", "pickle"):
        raise UnsafeFileError(_pickle_refusal(path, kind))
    raise FormatError(_not_safetensors_message(path, head, header_len, size, max_header_bytes, kind))


def _fits(header_len: int, size: int, max_header_bytes: int) -> bool:
    return header_len <= max_header_bytes and 8 + header_len <= size


def read_exact(f: BinaryIO, n: int, path: Path) -> bytes:
    """Exactly ``n`` bytes from ``f``; FormatError naming ``path`` if the file ends first."""
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

