"""The accelerate internals diffusion_lora relies on, in one place."""

from __future__ import annotations

from accelerate.state import AcceleratorState

__all__ = ["reset_accelerator_state"]


def reset_accelerator_state() -> None:
    """Forget accelerate's process-wide ``AcceleratorState`` (mixed precision, …) but keep the process
    group (``PartialState``), so the next ``Accelerator(...)`` may choose another precision.

    accelerate keeps one shared state per process and refuses a second ``Accelerator`` with another
    ``mixed_precision``; each ``train()`` (a notebook, a test session) is a new run. Uses
    ``AcceleratorState._reset_state(reset_partial_state=False)``, a staticmethod with this spelling in
    accelerate 1.0-1.15.
    """
    AcceleratorState._reset_state(reset_partial_state=False)
