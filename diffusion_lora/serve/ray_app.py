"""Scale-out on Ray Serve: replicas of one engine each, requests routed by adapter stack.

Each replica holds one base pipeline and one :class:`Engine` (which batches its requests, different
stacks in one denoiser call). Ray's model multiplexing does the routing: a request's multiplexed model
id is its :func:`stack_id` (the set of adapters it loads), and Ray's router sends a request to a replica
that already holds that id, else to one holding the fewest. The "model" a replica holds for an id is
the stack's adapters pinned in its engine cache; when Ray evicts the id (more than ``max_stacks`` on
the replica, least recently used first) it calls the model's ``__del__``, which unpins them (the cache
may then evict them when it needs room). Routing only decides where a request runs: the engine loads
whatever a batch needs either way, so a request sent without the id, or routed elsewhere, gets the same
image.

HTTP (Ray's proxy): ``POST /v1/generate`` with the native JSON body (:mod:`.native_json`) and the header
``serve_multiplexed_model_id: <stack_id>``, which Ray's proxy routes on; a header that does not match
the body's adapters is refused (400), a missing one is computed from the body (no routing preference).
From Python: ``handle.options(multiplexed_model_id=stack_id(names)).generate.remote(body)``.
Responses add ``replica``: the id of the replica that served the request.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DiffusionLoraError, ServerClosedError
from ..formats.printable import printable
from .context import check_names
from .engine import Engine
from .jobs import ServeLimits
from .native_json import job_from_json, result_json, status_of
from .stack_id import STACK_ID_HEADER, stack_id, stack_names

__all__ = ["StackReplica", "check_bind", "ray_deployment", "require_ray", "run_ray"]

logger = logging.getLogger(__name__)

_MAX_BODY = 1 << 20  # bytes of a request body (a prompt is at most a few KB)


def require_ray() -> Any:
    """``ray.serve``, or a ConfigError saying how to install it."""
    try:
        from ray import serve
    except ImportError:
        raise ConfigError("Ray Serve is not installed; pip install 'diffusion-lora[ray]'") from None
    return serve


class _Held:
    """The stacks a replica holds (Ray evicts from an executor thread, requests read them on the event loop)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stacks: dict[str, _HeldStack] = {}

    def add(self, stack: _HeldStack) -> None:
        with self._lock:
            self._stacks[stack.key] = stack

    def remove(self, stack: _HeldStack) -> None:
        with self._lock:
            if self._stacks.get(stack.key) is stack:
                del self._stacks[stack.key]

    def keys(self) -> list[str]:
        with self._lock:
            return sorted(self._stacks)


class _HeldStack:
    """Ray's multiplexed "model" for one stack id: the stack's adapters pinned in the replica's engine.

    Ray's multiplexer calls ``__del__`` when it evicts the id; Python calls it again when the object is
    collected, so releasing happens once.
    """

    def __init__(self, key: str, engine: Engine, pins: list, held: _Held) -> None:
        self.key, self._engine, self._pins, self._held = key, engine, pins, held
        self._released = False
        held.add(self)

    def __del__(self) -> None:
        if self._released:
            return
        self._released = True
        self._held.remove(self)
        try:
            self._engine.unpin(self._pins)
        except ServerClosedError:
            pass  # the engine is gone, and its pipeline with it


class StackReplica:
    """One replica: a base pipeline (``model``) and an :class:`Engine` over ``lora_dirs``.

    Holds at most ``max_stacks`` adapter stacks for Ray's router (pinned: they stay loaded); everything
    else is the engine's (``max_batch``, ``cache_size``, ``cache_bytes``, ``limits``, ``batch_window``).
    ``api_key``: HTTP requests (Ray's proxy) must send ``Authorization: Bearer <api_key>``; calls through a
    DeploymentHandle come from inside the cluster and are not checked.
    """

    def __init__(self, model: str, lora_dirs: Sequence[str], *, max_stacks: int, max_batch: int = 8,
                 cache_size: int = 32, cache_bytes: int | None = None, limits: ServeLimits | None = None,
                 batch_window: float = 0.01, device: str | None = None, api_key: str | None = None) -> None:
        serve = require_ray()
        from ..models import load_pipeline

        pipe = load_pipeline(model, device=device)
        model_file = model if _is_file(model) else None  # its hash and stem go into the infotext (as the CLI's)
        self.engine = Engine(pipe, lora_dirs, limits=limits, max_batch=max_batch, cache_size=cache_size,
                             cache_bytes=cache_bytes, batch_window=batch_window, model_file=model_file)
        self.replica = serve.get_replica_context().replica_tag
        self._api_key = api_key.encode() if api_key else None
        self._held = _Held()
        engine, held = self.engine, self._held

        async def load_stack(key: str) -> _HeldStack:
            pins = await asyncio.wrap_future(engine.pin(stack_names(key)))
            return _HeldStack(key, engine, pins, held)

        # wired here, not with a decorator on a method: the bound (max_stacks) is a deployment argument
        self._load_stack: Callable[[str], Any] = serve.multiplexed(max_num_models_per_replica=max_stacks)(load_stack)

    async def generate(self, body: Any, *, state: bool = False) -> dict[str, Any]:
        """Generate what ``body`` (native JSON) asks for; raises the library's errors.

        The answer names the ``replica`` that served it; ``state`` adds :meth:`state` (what the replica
        holds: stack ids and cached adapters, which other clients' requests loaded, so HTTP never asks).
        """
        serve = require_ray()
        job = job_from_json(body)
        refs = self.engine.check(job).refs  # limits before any adapter loads
        await asyncio.to_thread(check_names, self.engine, refs)  # unknown names: 404 before a queue slot
        key = stack_id(ref.name for ref in job.stack()[1])
        routed = serve.get_multiplexed_model_id()
        if routed and routed != key:
            raise ConfigError(f"{STACK_ID_HEADER} {printable(routed[:200])!r} does not match the request's adapters, "
                              f"whose id is {key!r}; send that (diffusion_lora.serve.stack_id) or no header")
        if key:
            await self._load_stack(key)
        result = await asyncio.wrap_future(self.engine.submit(job))
        out = result_json(result)
        out["replica"] = self.replica
        if state:
            out["state"] = self.state()
        return out

    def state(self) -> dict[str, Any]:
        """The stack ids this replica holds, its cached adapters (file stem -> pins), loads and evictions."""
        return {"stacks": self._held.keys(),
                "adapters": {e.shown: e.pins for e in self.engine.cache.entries()},
                "loads": self.engine.cache.loads, "evictions": self.engine.cache.evictions}

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        path = request.scope.get("path", "")[len(request.scope.get("root_path", "")):].rstrip("/")
        if self._api_key is not None:
            sent = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(sent, b"Bearer " + self._api_key):
                return JSONResponse({"detail": "missing or wrong API key (Authorization: Bearer KEY)"}, 401)
        if path != "/v1/generate":
            return JSONResponse({"detail": f"no route {printable(path[:200])!r}; POST /v1/generate"}, 404)
        if request.method != "POST":
            return JSONResponse({"detail": "POST /v1/generate"}, 405)
        try:
            body = await _read_json(request)
            return JSONResponse(await self.generate(body))
        except DiffusionLoraError as exc:
            return JSONResponse({"detail": printable(str(exc))}, status_of(exc))
        except Exception as exc:  # one line, never a traceback, to the client; the log has the rest
            logger.exception("request failed")
            return JSONResponse({"detail": f"generation failed: {type(exc).__name__}"}, 500)

    def __del__(self) -> None:
        # Ray Serve calls this on graceful shutdown, once the replica's requests have finished
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close(drain=False, timeout=30)


def _is_file(model: str) -> bool:
    try:
        return Path(model).is_file()
    except OSError:
        return False


async def _read_json(request: Any) -> Any:
    import json

    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > _MAX_BODY:
            raise ConfigError(f"the request body is over {_MAX_BODY} bytes")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except ValueError as exc:
        raise ConfigError(f"the request body is not JSON: {exc}") from None


def ray_deployment(model: str, lora_dirs: Sequence[str], *, replicas: int = 2, max_batch: int = 8,
                   max_stacks: int = 4, cache_size: int | None = None, cache_bytes: int | None = None,
                   limits: ServeLimits | None = None, batch_window: float = 0.01, device: str | None = None,
                   api_key: str | None = None, ray_actor_options: dict[str, Any] | None = None,
                   max_ongoing_requests: int | None = None, name: str = "diffusion-lora") -> Any:
    """A bound Ray Serve application: ``replicas`` × :class:`StackReplica` (pass it to ``serve.run``).

    ``max_stacks`` is Ray's ``max_num_models_per_replica``: how many adapter stacks one replica holds
    pinned for routing. ``cache_size`` (default ``max_stacks`` × ``limits.max_adapters``) must leave them
    room. ``ray_actor_options`` (default one CPU; ``{"num_gpus": 1}`` for a GPU, which also moves the
    pipeline to ``cuda`` unless ``device`` says otherwise) and ``max_ongoing_requests`` (default
    2 × ``max_batch``: enough queued on a replica to fill a batch) go to ``serve.deployment``.
    """
    serve = require_ray()
    limits = limits or ServeLimits()
    for key, value in (("replicas", replicas), ("max_stacks", max_stacks), ("max_batch", max_batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{key} must be a whole number of at least 1, got {value!r}")
    needed = max_stacks * limits.max_adapters
    if cache_size is None:
        cache_size = needed
    elif cache_size < needed:
        raise ConfigError(f"cache_size {cache_size} cannot hold max_stacks ({max_stacks}) stacks of max_adapters "
                          f"({limits.max_adapters}) pinned adapters; raise cache_size to {needed} or lower them")
    options = dict(ray_actor_options or {"num_cpus": 1})
    if device is None and options.get("num_gpus"):
        device = "cuda"
    deployment = serve.deployment(StackReplica, name=name).options(
        num_replicas=replicas, ray_actor_options=options,
        max_ongoing_requests=max_ongoing_requests or 2 * max_batch)
    return deployment.bind(model, list(map(str, lora_dirs)), max_stacks=max_stacks, max_batch=max_batch,
                           cache_size=cache_size, cache_bytes=cache_bytes, limits=limits,
                           batch_window=batch_window, device=device, api_key=api_key)


def check_bind(host: str, api_key: str | None) -> None:
    """A bind outside the loopback interface needs an API key (ConfigError otherwise)."""
    import ipaddress

    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not api_key:
        raise ConfigError(f"--host {printable(host)} is reachable from other machines; set --api-key to require "
                          "a bearer token, or bind to 127.0.0.1")


def run_ray(app: Any, *, host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
            api_key: str | None = None, ready: Callable[[str], None] | None = None) -> None:
    """Serve ``app`` on Ray's HTTP proxy at ``host:port`` until interrupted.

    ``address`` None starts a private local Ray instance on 127.0.0.1; otherwise it is ``ray.init``'s
    (``auto``, ``HOST:PORT``, ``ray://HOST:PORT``) and the cluster's nodes run the replicas.

    ``ready(url)`` is called once the replicas are up. Ray Serve stops on return.
    """
    check_bind(host, api_key)
    serve = require_ray()
    import time

    import ray

    if address is None:
        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1")
    else:
        ray.init(address=address)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(app, name="diffusion-lora", route_prefix="/")
        if ready is not None:
            ready(f"http://{host}:{port}/v1/generate")
        while True:
            time.sleep(3600)
    finally:
        serve.shutdown()
        ray.shutdown()
