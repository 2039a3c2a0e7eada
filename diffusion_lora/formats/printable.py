"""Text from files and prompts made safe to print: control characters become visible escapes.

A metadata value, key, trigger word or file name may hold ESC sequences (which retitle or repaint
a terminal), ``\\r``/``\\n`` (which forge report lines) or lone surrogates (which make ``print`` fail).
:func:`printable` turns each into the escape Python would write for it (``\\x1b``, ``\\n``, ``\\udcff``).
"""

from __future__ import annotations

import re

# C0 and C1 controls, DEL, line/paragraph separators, bidi overrides and isolates, lone surrogates.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_UNSAFE_KEEP_NEWLINES = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def _escape(match: re.Match[str]) -> str:
    return match.group().encode("unicode_escape").decode("ascii")


def printable(text: object, *, keep_newlines: bool = False) -> str:
    """``str(text)`` with every control character, bidi override and lone surrogate escaped.

    With ``keep_newlines`` a plain ``\\n`` stays a line break (for messages built as several lines
    whose parts were escaped already); ``\\r`` is escaped either way.
    """
    pattern = _UNSAFE_KEEP_NEWLINES if keep_newlines else _UNSAFE
    return pattern.sub(_escape, str(text))
