"""Running the HTTP server: uvicorn on a socket bound before the model loads, and a graceful shutdown.

On SIGINT/SIGTERM the server stops accepting connections, the engine stops taking jobs (a request still
arriving on an open connection gets 503) and finishes the queued ones; whatever is still queued after
``grace`` seconds is failed with 503. The running batch always completes. Then the process exits 0.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

try:
    import uvicorn
except ImportError:  # pragma: no cover - depends on the installed extras
    raise ConfigError("the HTTP server needs uvicorn; pip install 'diffusion-lora[serve]'") from None

from .http import create_app  # noqa: E402 - after the check that names the missing extra

__all__ = ["ServeOptions", "bind", "serve"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeOptions:
    api_key: str | None = None
    grace: float = 30.0  # seconds the queue may take to drain on shutdown

    def __post_init__(self) -> None:
        if not 0 <= self.grace <= 86400:
            raise ConfigError(f"--grace must be from 0 to 86400 seconds, got {self.grace}")


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: any free port), so the port is known before the model loads."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"--host {host} --port {port}: cannot listen there: {exc.strerror or exc}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(engine: Any, sock: socket.socket, options: ServeOptions,
          on_ready: Callable[[str], None] | None = None) -> None:
    """Serve ``engine`` on ``sock`` until SIGINT/SIGTERM, then drain (see the module doc) and close it."""
    app = create_app(engine, api_key=options.api_key)

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if on_ready is not None and not self.should_exit:
                on_ready(url_of(sock))

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            threading.Thread(target=_drain, args=(engine, options.grace), daemon=True).start()
            await super().shutdown(sockets)

    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=options.grace + 60,
                            lifespan="off")
    # uvicorn re-raises the signal that stopped it once it is done; with these handlers that is a no-op,
    # so the process ends with exit status 0 after the drain
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        Server(config).run(sockets=[sock])
    finally:
        engine.close(drain=False)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _drain(engine: Any, grace: float) -> None:
    engine.close(drain=True, timeout=grace)
    if engine.progress()["queued"]:
        logger.warning("shutdown: %d queued images not run within %gs; failing them", engine.progress()["queued"],
                       grace)
        engine.close(drain=False)
