"""A busy machine for the benchmarks' busy-machine rows: a CPU-bound Python process beside a block."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator

# one thread of matrix products, forever: what another job on a shared 2-core machine looks like
BUSY_LOOP = "\n".join(
    ["import torch", "torch.set_num_threads(1)", "x = torch.randn(256, 256)", "while True:",
     "    x = torch.tanh(x @ x)"]
)


@contextlib.contextmanager
def busy_cpu() -> Iterator[None]:
    """Run a CPU-bound Python process beside the block (started, given a second to spin up, killed)."""
    proc = subprocess.Popen([sys.executable, "-c", BUSY_LOOP])
    try:
        time.sleep(1.0)
        yield
    finally:
        proc.kill()
        proc.wait()
