"""Hold Ctrl-C (SIGINT) until a block that must not be cut in half has finished."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

__all__ = ["interrupts_deferred"]


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Run the block with SIGINT recorded instead of raised; raise KeyboardInterrupt after it if one came.

    Only the main thread can install signal handlers, so elsewhere this does nothing. A process that
    ignores SIGINT (one started in the background by a non-interactive shell, or under ``nohup``
    with ``&``) keeps ignoring it. Nested use is fine: an interrupt held by the inner block is raised
    when it ends, inside the outer block.
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt
