"""JSON from untrusted files, parsed so that every failure is a ``ValueError``."""

from __future__ import annotations

import json

__all__ = ["parse_json"]

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
