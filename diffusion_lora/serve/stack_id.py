"""The routing key of a request: a canonical id of the set of adapters its stack loads.

Two requests whose stacks name the same adapters, in any order and with any weights, have the same id:
they need the same adapters loaded, so a router that sends equal ids to the same replica (Ray Serve's
model multiplexing) finds them already in that replica's cache. The id is the sorted adapter names,
each percent-encoded (so ``+``, ``/`` and non-ASCII characters cannot clash and the id is a valid HTTP
header value), joined by ``+``: ``<lora:neon:1> <lora:ink:0.5>`` → ``ink+neon``. A stack without
adapters has the empty id (no routing preference).
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import quote, unquote

from ..errors import ConfigError

__all__ = ["STACK_ID_HEADER", "stack_id", "stack_names"]

# Ray Serve's HTTP proxy routes on this header (ray.serve._private.constants.SERVE_MULTIPLEXED_MODEL_ID)
STACK_ID_HEADER = "serve_multiplexed_model_id"


def stack_id(names: Iterable[str]) -> str:
    """The canonical id of the adapter set ``names`` (order and repeats do not matter)."""
    return "+".join(sorted({quote(name, safe="") for name in names}))


def stack_names(key: str) -> list[str]:
    """The adapter names of a :func:`stack_id` (ConfigError when ``key`` is not one)."""
    if not key:
        return []
    try:
        names = [unquote(part, errors="strict") for part in key.split("+")]
    except UnicodeDecodeError:
        names = []
    if not names or any(not name for name in names) or stack_id(names) != key:
        raise ConfigError(f"{STACK_ID_HEADER} {key[:200]!r} is not a canonical adapter-stack id: sorted adapter "
                          "names, each percent-encoded, joined by '+' (diffusion_lora.serve.stack_id)")
    return names
