"""JSON from untrusted files, parsed so that every failure is a ``ValueError``."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import DiffusionLoraError, FormatError
from .regular_file import open_regular

__all__ = ["parse_json", "read_json_object"]

_MAX_CHARS = 16 * 2**20


def parse_json(text: str) -> object:
    """``json.loads(text)``; raises ValueError (never RecursionError) for anything it cannot read.

    Python's parser raises RecursionError for deeply nested arrays and a plain ValueError for
    integers of more than 4300 digits; both are just malformed metadata to us.
    """
    if len(text) > _MAX_CHARS:
        raise ValueError(f"{len(text)} characters of JSON, more than the {_MAX_CHARS} accepted")
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def read_json_object(
    path: str | os.PathLike,
    *,
    max_bytes: int,
    error: type[DiffusionLoraError] = FormatError,
    what: str = "JSON file",
    too_big: str = "",
) -> dict:
    """The JSON object in a small regular file; ``error`` naming ``path`` and ``what`` otherwise.

    The size is checked before anything is read (a sparse 64 MiB file costs no memory) and again
    after reading (the file may grow), and a FIFO or device cannot hang the read. ``too_big`` is the
    advice after the size message.
    """
    where = Path(path)
    with open_regular(path, error=error) as f:
        try:
            size = os.fstat(f.fileno()).st_size
            raw = f.read(max_bytes + 1) if size <= max_bytes else b""
        except OSError as exc:
            raise error(f"{where}: not a readable {what} ({exc.strerror or exc})") from None
    if size > max_bytes or len(raw) > max_bytes:
        raise error(
            f"{where}: {max(size, len(raw)):,} bytes, more than the {max_bytes:,} a {what} may have"
            + (f"; {too_big}" if too_big else "")
        )
    try:
        value = parse_json(raw.decode("utf-8"))
    except ValueError as exc:  # UnicodeDecodeError is a ValueError
        raise error(f"{where}: not a readable {what} (not valid JSON: {exc})") from None
    if not isinstance(value, dict):
        raise error(f"{where}: a {what} must hold a JSON object")
    return value
