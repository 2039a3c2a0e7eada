"""Hashes of adapter files as the tools of the field show them.

* :func:`addnet_hash` — the kohya / sd-webui-additional-networks "model hash": SHA-256 of the tensor
  data section only (everything after the 8-byte header length and the JSON header). Editing the
  metadata does not change it, which is why kohya stores it in the metadata as ``sshs_model_hash``.
* :func:`legacy_hash` — the old webui hash kohya stores as ``sshs_legacy_hash``: SHA-256 of the 64 KiB
  at offset 1 MiB, first 8 hex digits.
* :func:`file_sha256` / :func:`autov2_hash` — SHA-256 of the whole file; AutoV2 (Civitai, A1111) is its
  first 10 hex digits.

Only hashlib and file reads: no torch, no safetensors. Files are streamed in 1 MiB chunks.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from diffusion_lora.errors import FormatError
from diffusion_lora.formats.regular_file import reading

CHUNK_BYTES = 1 << 20
_HASHING = " the file to hash it"
_LEGACY_OFFSET = 0x100000
_LEGACY_LENGTH = 0x10000


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 hex digest (64 lowercase hex digits) of the whole file."""
    with reading(path, doing=_HASHING) as f:
        return _sha256_of_chunks(_chunks(f))


def autov2_hash(path: str | os.PathLike[str]) -> str:
    """The AutoV2 hash Civitai and A1111 show: the first 10 hex digits of :func:`file_sha256`."""
    return file_sha256(path)[:10]


def addnet_hash(path: str | os.PathLike[str]) -> str:
    """SHA-256 hex digest of a safetensors file's data section (bytes after length prefix and header).

    Raises FormatError naming the path when the file is too short to hold the header it declares.
    """
    path = Path(path)
    with reading(path, doing=_HASHING) as f:
        size = os.fstat(f.fileno()).st_size
        header_len = int.from_bytes(_read_prefix(f, path), "little")
        if 8 + header_len > size:
            raise FormatError(
                f"{path}: declares a {header_len}-byte header but the file has {size} bytes; "
                "it is truncated or not a safetensors file, so it has no data section to hash"
            )
        f.seek(8 + header_len)
        return _sha256_of_chunks(_chunks(f))


def legacy_hash(path: str | os.PathLike[str]) -> str:
    """kohya's ``sshs_legacy_hash``: first 8 hex digits of SHA-256 of the 64 KiB at offset 1 MiB.

    A file shorter than 1 MiB hashes to SHA-256 of no bytes, as in kohya and the old webui.
    """
    with reading(path, doing=_HASHING) as f:
        f.seek(_LEGACY_OFFSET)
        return hashlib.sha256(f.read(_LEGACY_LENGTH)).hexdigest()[:8]


def addnet_hash_of_bytes(data: bytes) -> str:
    """:func:`addnet_hash` of a serialized safetensors file held in memory."""
    if len(data) < 8:
        raise FormatError(f"{len(data)} bytes are too few to be a safetensors file (needs at least 8)")
    header_len = int.from_bytes(data[:8], "little")
    if 8 + header_len > len(data):
        raise FormatError(f"declares a {header_len}-byte header but only {len(data)} bytes were given")
    return hashlib.sha256(memoryview(data)[8 + header_len :]).hexdigest()


def legacy_hash_of_bytes(data: bytes) -> str:
    """:func:`legacy_hash` of a serialized safetensors file held in memory."""
    return hashlib.sha256(memoryview(data)[_LEGACY_OFFSET : _LEGACY_OFFSET + _LEGACY_LENGTH]).hexdigest()[:8]


def _read_prefix(f: BinaryIO, path: Path) -> bytes:
    prefix = f.read(8)
    if len(prefix) < 8:
        raise FormatError(
            f"{path}: {len(prefix)} bytes are too few to be a safetensors file (needs at least 8)"
        )
    return prefix


def _chunks(f: BinaryIO) -> Iterator[bytes]:
    while chunk := f.read(CHUNK_BYTES):
        yield chunk


def _sha256_of_chunks(chunks: Iterator[bytes]) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()
