"""The HTTP front end of the engine: the AUTOMATIC1111 web API and a native JSON API, on FastAPI.

:func:`create_app` wraps a running :class:`~diffusion_lora.serve.engine.Engine`. Request handlers
never block the event loop: a job is submitted to the engine's queue and its Future awaited, so
concurrent requests land in the queue together and the engine batches them into one pipeline call.

Every failure answers JSON ``{"detail": "<one line>"}`` naming the limit, adapter, file or setting
at fault (never a traceback): limits and bad values 422, an unknown adapter 404, a full queue 429
(with ``Retry-After``), a server shutting down 503, a body over the size limit 413, a missing or
wrong API key 401.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import logging
import os
from pathlib import Path
from typing import Any

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel, ConfigDict, Field
    from starlette.exceptions import HTTPException
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    from ..errors import ConfigError

    raise ConfigError(f"the HTTP server needs FastAPI and uvicorn ({exc.name} is missing); "
                      "pip install 'diffusion-lora[serve]'") from None

from ..errors import (
    ConfigError,
    DiffusionLoraError,
    FormatError,
)
from ..formats.hashes import legacy_hash
from ..formats.printable import printable
from ..models.invoke import pipeline_name
from ..version import __version__
from .a1111 import add_a1111_routes
from .context import ServerContext, png_base64, random_seed
from .engine import Engine
from .jobs import AdapterRef, Job
from .native_json import status_of

__all__ = ["MAX_BODY_BYTES", "create_app", "status_of"]

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20  # a generation request is a few hundred bytes; 1 MiB leaves room for long prompts
_RETRY_AFTER_S = 2
_OPEN_PATHS = frozenset({"/v1/health"})  # answered without the API key (load balancers' probes)


# -- errors ----------------------------------------------------------------------------------------------

def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    one_line = printable(detail)  # control characters (and newlines) of names and file paths escaped
    return JSONResponse({"detail": one_line}, status_code=status, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(DiffusionLoraError)
    async def library_error(request: Request, exc: DiffusionLoraError) -> JSONResponse:
        status = status_of(exc)
        headers = {"Retry-After": str(_RETRY_AFTER_S)} if status in (429, 503) else None
        return _error(status, str(exc), headers)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # one line naming each field, without echoing the (possibly huge) input
        parts = []
        for err in exc.errors()[:5]:
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
        return _error(422, "; ".join(parts) or "invalid request")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), dict(exc.headers or {}) or None)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("request %s failed", request.url.path)
        return _error(500, f"internal error ({type(exc).__name__}); see the server log")


# -- auth and body size (plain ASGI middleware: they answer before the body is read) --------------------

class _Guard:
    """Refuses requests without the API key (401) and bodies over ``max_body`` bytes (413)."""

    def __init__(self, app: Any, api_key: str | None, max_body: int) -> None:
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.max_body = max_body

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        given = headers.get(b"authorization", b"")
        scheme, _, value = given.partition(b" ")
        value = value.strip()
        if scheme.lower() == b"basic":  # A1111 clients send --api-auth user:pass; the key is the password
            try:
                value = base64.b64decode(value, validate=True).partition(b":")[2]
            except (binascii.Error, ValueError):
                return False
        elif scheme.lower() != b"bearer":
            return False
        return hmac.compare_digest(value, self.key)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.key is not None and scope["path"] not in _OPEN_PATHS and not self._authorized(headers):
            response = _error(401, "missing or wrong API key: send 'Authorization: Bearer KEY' (or HTTP basic "
                              "auth with the key as password)", {"WWW-Authenticate": 'Bearer, Basic realm="api"'})
            return await response(scope, receive, send)
        length = headers.get(b"content-length")
        if length is not None and not length.isdigit():
            return await _error(400, "Content-Length is not a number")(scope, receive, send)
        if length is not None and int(length) > self.max_body:
            return await _error(413, f"request body over the limit of {self.max_body} bytes")(scope, receive, send)
        seen = 0

        async def bounded_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:  # a chunked body without Content-Length
                    raise HTTPException(413, f"request body over the limit of {self.max_body} bytes")
            return message

        await self.app(scope, bounded_receive, send)


# -- the native API ------------------------------------------------------------------------------------

class LoraSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="adapter name: a file stem or relative path inside the adapter folders")
    weight: float = Field(1.0, description="blend factor of the adapter")
    text_encoder_weight: float | None = Field(None, description="text encoders' weight (default: weight)")


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(description="the prompt; A1111 <lora:NAME:W> tags are applied too")
    negative_prompt: str = ""
    loras: list[LoraSpec] = Field(default_factory=list, max_length=256, description="the adapter stack")
    steps: int = Field(20, ge=1)
    guidance: float | None = Field(None, description="CFG scale (default: the model's)")
    width: int | None = Field(None, description="pixels, a multiple of 8 (default: the model's native size)")
    height: int | None = None
    seed: int | None = Field(None, description="seed of the first image (image i: seed+i); none: random")
    count: int = Field(1, ge=1, le=10_000, description="images to generate")
    sampler: str | None = Field(None, description="A1111 sampler name (default: the model's scheduler)")
    scheduler: str | None = Field(None, description="A1111 schedule type")


class GenerateResponse(BaseModel):
    images: list[str] = Field(description="base64 PNGs with the A1111 'parameters' text chunk")
    seeds: list[int]
    parameters: list[str] = Field(description="each image's A1111 infotext")


class LoraInfo(BaseModel):
    name: str
    alias: str
    path: str
    metadata: dict[str, str]


class CacheStats(BaseModel):
    entries: int
    bytes: int
    max_entries: int
    max_bytes: int | None
    loads: int
    evictions: int


class Stats(BaseModel):
    model: str
    queued: int = Field(description="images waiting")
    running: int = Field(description="images in the running batch")
    step: int
    steps: int
    batches: int = Field(description="pipeline calls since start")
    images: int = Field(description="images generated since start")
    max_batch: int
    cache: CacheStats


def _add_native_routes(app: FastAPI, ctx: ServerContext) -> None:
    @app.post("/v1/generate", response_model=GenerateResponse, tags=["native"])
    async def generate(body: GenerateRequest) -> GenerateResponse:
        """Generate ``count`` images of one prompt with an explicit adapter stack."""
        names = [s.name for s in body.loras]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ConfigError(f"loras: {printable(twice[0])!r} is listed twice; give each adapter once")
        job = Job(body.prompt, body.negative_prompt,
                  tuple(AdapterRef(s.name, s.weight, s.text_encoder_weight) for s in body.loras),
                  steps=body.steps, guidance=body.guidance, width=body.width, height=body.height,
                  seed=random_seed() if body.seed is None else body.seed, count=body.count,
                  sampler=body.sampler, scheduler=body.scheduler)
        result = await ctx.run(job)
        return GenerateResponse(images=await asyncio.to_thread(png_base64, result), seeds=result.seeds,
                                parameters=[image.parameters for image in result.images])

    @app.get("/v1/loras", response_model=list[LoraInfo], tags=["native"])
    async def loras() -> list[LoraInfo]:
        """The adapter files of the folders."""
        return [LoraInfo(**vars(f)) for f in await ctx.lora_index()]

    @app.get("/v1/health", tags=["native"])
    async def health() -> dict[str, str]:
        """Liveness (no API key needed)."""
        return {"status": "ok"}

    @app.get("/v1/stats", response_model=Stats, tags=["native"])
    async def stats() -> Stats:
        """Queue, batches and adapter cache counters."""
        engine, cache = ctx.engine, ctx.engine.cache
        progress = engine.progress()
        entries = cache.entries()  # a copy: the worker may change the cache meanwhile
        return Stats(model=ctx.model_name, queued=progress["queued"], running=progress["running"],
                     step=progress["step"], steps=progress["steps"], batches=progress["batches"],
                     images=progress["images"], max_batch=engine.max_batch,
                     cache=CacheStats(entries=len(entries), bytes=sum(e.nbytes for e in entries),
                                      max_entries=cache.max_count, max_bytes=cache.max_bytes, loads=cache.loads,
                                      evictions=cache.evictions))


# -- the app ---------------------------------------------------------------------------------------------

def _model_name(engine: Engine) -> str:
    if engine.model_file:
        return Path(engine.model_file).stem
    name = pipeline_name(engine.pipe)
    return Path(name).name if name else type(engine.pipe).__name__


def create_app(engine: Engine, *, api_key: str | None = None, model_name: str | None = None,
               max_body: int = MAX_BODY_BYTES) -> FastAPI:
    """The FastAPI app serving ``engine``: A1111's ``/sdapi/v1/*`` and the native ``/v1/*`` endpoints.

    With ``api_key`` every endpoint but ``/v1/health`` needs ``Authorization: Bearer KEY`` (or HTTP basic
    auth with the key as password). Closing the engine is the caller's business.
    """
    if api_key is not None and not api_key:
        raise ConfigError("api_key must not be empty")
    model_hash = None
    if engine.model_file and os.path.isfile(engine.model_file):
        try:
            model_hash = legacy_hash(engine.model_file)
        except FormatError:
            model_hash = None
    ctx = ServerContext(engine, model_name or _model_name(engine), model_hash)
    app = FastAPI(title="diffusion-lora", version=__version__,
                  description="Many LoRA adapters on one base model: the AUTOMATIC1111 web API (/sdapi/v1) and a "
                  "native API (/v1) with explicit adapter stacks. Requests with different stacks share batches.")
    app.state.ctx = ctx
    _install_error_handlers(app)
    _add_native_routes(app, ctx)
    add_a1111_routes(app, ctx)
    app.add_middleware(_Guard, api_key=api_key, max_body=max_body)
    return app

