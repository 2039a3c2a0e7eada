"""Training checkpoints that a crash can never leave half-written.

A checkpoint is a folder ``checkpoint-<step>`` holding ``state.pt`` (trainable tensors, optimizer
and LR-scheduler state, step). It is written complete under a temporary name, fsynced, then renamed
into place; only then is the ``latest`` pointer replaced (atomically). A kill at any moment leaves
either the previous checkpoint as latest or the new one — never a torn one — and leftover
temporary folders are ignored and cleaned up.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import torch

from ..errors import DiffusionLoraError
from ..formats.atomic import atomic_write_bytes

logger = logging.getLogger(__name__)
LATEST = "latest"
STATE = "state.pt"
_PREFIX = "checkpoint-"


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(root: Path, step: int, state: dict[str, Any], *, keep: int) -> Path:
    """Write ``state`` as checkpoint ``step`` under ``root``, point ``latest`` at it, keep the newest ``keep``.

    A failure (disk full, no permission) removes the partial folder, keeps every earlier checkpoint
    and raises DiffusionLoraError naming the path.
    """
    final = root / f"{_PREFIX}{step:08d}"
    tmp = root / f".tmp-{_PREFIX}{step:08d}-{secrets.token_hex(4)}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        torch.save(state, tmp / STATE)
        _fsync_file(tmp / STATE)
        if final.exists():  # re-saving the same step (resumed run): replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, (OSError, RuntimeError)):  # torch.save reports a full disk as RuntimeError
            raise DiffusionLoraError(
                f"{final}: could not write the checkpoint ({exc}); earlier checkpoints are intact. Free disk "
                f"space or fix the folder's permissions, then continue with --resume"
            ) from exc
        raise
    atomic_write_bytes(root / LATEST, final.name.encode(), what="latest-checkpoint pointer")
    _prune(root, keep)
    return final


def _complete(root: Path) -> list[Path]:
    return sorted(p for p in root.glob(f"{_PREFIX}*") if p.is_dir() and (p / STATE).is_file())


def _prune(root: Path, keep: int) -> None:
    for old in _complete(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for tmp in root.glob(f".tmp-{_PREFIX}*"):
        shutil.rmtree(tmp, ignore_errors=True)


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint ``latest`` points to, else the newest complete one, else None."""
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text(encoding="utf-8").strip()
        if (candidate / STATE).is_file():
            return candidate
        logger.warning("%s points to %s, which is incomplete; using the newest complete checkpoint", pointer, candidate)
    complete = _complete(root) if root.is_dir() else []
    return complete[-1] if complete else None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The state saved in checkpoint folder ``path`` (tensors and plain values only; no code runs)."""
    try:
        return torch.load(path / STATE, map_location="cpu", weights_only=True)
    except Exception as exc:  # a checkpoint we did not write, or a broken disk
        raise DiffusionLoraError(f"{path / STATE}: cannot read this checkpoint ({exc}); delete it to resume "
                                 f"from the one before") from exc
