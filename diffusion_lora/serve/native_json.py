"""The native JSON API's request and response bodies, as plain dicts (no web framework needed).

Request: ``{"prompt": str, "negative_prompt": str, "loras": [{"name", "weight", "text_encoder_weight"}],
"steps", "guidance", "width", "height", "seed", "count", "sampler", "scheduler"}`` — only ``prompt`` is
required; the prompt may carry ``<lora:NAME:W>`` tags. Response: ``{"images": [base64 PNG], "seeds":
[int], "parameters": [A1111 infotext]}``, one entry per image.
"""

from __future__ import annotations

import base64
from typing import Any

from ..errors import (
    AdapterNotFoundError,
    AdapterStateError,
    ConfigError,
    FormatError,
    KeyMappingError,
    ServerBusyError,
    ServerClosedError,
    UnsupportedModelError,
)
from ..formats.printable import printable
from .jobs import AdapterRef, Job, JobResult

__all__ = ["job_from_json", "result_json", "status_of"]

_JOB_KEYS = ("prompt", "negative_prompt", "loras", "steps", "guidance", "width", "height", "seed", "count",
             "sampler", "scheduler")
_LORA_KEYS = ("name", "weight", "text_encoder_weight")
_MAX_LORAS = 64  # entries read from a body before the limits (max_adapters) name the real bound
_MAX_NAME_CHARS = 1024


def _unknown(keys: object, known: tuple[str, ...], where: str) -> None:
    extra = sorted(str(k) for k in keys if k not in known)  # type: ignore[attr-defined]
    if extra:
        raise ConfigError(f"{where}: unknown key {printable(extra[0][:100])!r}; known: {', '.join(known)}")


def job_from_json(body: Any) -> Job:
    """The :class:`Job` a request body asks for (ConfigError naming the key that is wrong)."""
    if not isinstance(body, dict):
        raise ConfigError("the request body must be a JSON object")
    _unknown(body, _JOB_KEYS, "request")
    if "prompt" not in body:
        raise ConfigError("request: prompt is required")
    loras = body.get("loras") or []
    if not isinstance(loras, list) or len(loras) > _MAX_LORAS:
        raise ConfigError(f"loras must be a list of at most {_MAX_LORAS} objects")
    refs = []
    for i, entry in enumerate(loras):
        if not isinstance(entry, dict):
            raise ConfigError(f"loras[{i}] must be an object with name, weight, text_encoder_weight")
        _unknown(entry, _LORA_KEYS, f"loras[{i}]")
        name = entry.get("name")
        if isinstance(name, str) and len(name) > _MAX_NAME_CHARS:
            raise ConfigError(f"loras[{i}].name is over {_MAX_NAME_CHARS} characters")
        refs.append(AdapterRef(name, entry.get("weight", 1.0), entry.get("text_encoder_weight")))
    fields = {k: v for k, v in body.items() if k != "loras" and (v is not None or k == "prompt")}
    return Job(loras=tuple(refs), **fields)


def result_json(result: JobResult) -> dict[str, Any]:
    """The response body of a finished job."""
    return {"images": [base64.b64encode(image.png_bytes()).decode("ascii") for image in result.images],
            "seeds": result.seeds, "parameters": [image.parameters for image in result.images]}


def status_of(exc: BaseException) -> int:
    """The HTTP status of an error of the library, the same for every front end (A1111 answers bad values with
    422 too): 429 busy, 503 closing, 404 unknown adapter, 422 a bad value or unusable file, 500 else."""
    if isinstance(exc, ServerBusyError):
        return 429
    if isinstance(exc, ServerClosedError):
        return 503
    if isinstance(exc, AdapterNotFoundError):
        return 404
    if isinstance(exc, (ConfigError, FormatError, KeyMappingError, UnsupportedModelError)):
        return 422
    if isinstance(exc, AdapterStateError):
        return 500
    return 400
