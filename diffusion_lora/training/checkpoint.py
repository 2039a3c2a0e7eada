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
import re
import secrets
import shutil
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import DiffusionLoraError
from ..formats.atomic import atomic_write_bytes

logger = logging.getLogger(__name__)
LATEST = "latest"
STATE = "state.pt"
_PREFIX = "checkpoint-"
_NAME = re.compile(rf"{_PREFIX}\d{{8}}")
_MAX_POINTER_BYTES = 256


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
    if root.is_symlink() or final.is_symlink():
        link = root if root.is_symlink() else final
        raise DiffusionLoraError(f"{link}: is a symlink; checkpoints are written only into folders the run owns; "
                                 "remove the link")
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
    # Only real folders of this run: a planted symlink could lead anywhere.
    return sorted(p for p in root.glob(f"{_PREFIX}*")
                  if _NAME.fullmatch(p.name) and not p.is_symlink() and p.is_dir() and (p / STATE).is_file())


def _prune(root: Path, keep: int) -> None:
    for old in _complete(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for tmp in root.glob(f".tmp-{_PREFIX}*"):
        shutil.rmtree(tmp, ignore_errors=True)


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint ``latest`` points to, else the newest complete one, else None.

    ``latest`` must name a ``checkpoint-NNNNNNNN`` folder of ``root`` itself (not a path, not a
    symlink): anything else is a DiffusionLoraError naming the pointer, never followed.
    """
    pointer = root / LATEST
    if os.path.lexists(pointer):
        candidate = root / _read_pointer(pointer)
        if (candidate / STATE).is_file():
            return candidate
        logger.warning("%s points to %s, which is incomplete; using the newest complete checkpoint", pointer, candidate)
    complete = _complete(root) if root.is_dir() else []
    return complete[-1] if complete else None


def _read_pointer(pointer: Path) -> str:
    fix = f"delete {pointer} to resume from the newest complete checkpoint"
    try:
        fd = os.open(pointer, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise DiffusionLoraError(f"{pointer}: cannot be read as a checkpoint pointer ({exc.strerror or exc}); "
                                 f"{fix}") from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise DiffusionLoraError(f"{pointer}: is not a regular file; {fix}")
    with os.fdopen(fd, "rb") as f:
        raw = f.read(_MAX_POINTER_BYTES + 1)
    name = raw.decode("utf-8", errors="replace").strip()
    if len(raw) > _MAX_POINTER_BYTES or not _NAME.fullmatch(name):
        raise DiffusionLoraError(f"{pointer}: does not name a checkpoint folder of this run "
                                 f"(checkpoint-NNNNNNNN); {fix}")
    candidate = pointer.parent / name
    if candidate.is_symlink():
        raise DiffusionLoraError(f"{candidate}: is a symlink, not a checkpoint folder of this run; {fix}")
    return name


def check_state(saved: Any, path: Path, params: Mapping[str, torch.Tensor], optimizer: Any, steps: int) -> None:
    """Raise DiffusionLoraError naming ``path`` unless ``saved`` is a checkpoint this run can resume:
    ``step`` an int in [0, steps], ``params`` exactly this run's trainable tensors (same names and
    shapes, finite floats), ``optimizer`` shaped like ``optimizer`` (this run's optimizer's state
    is this run's torch optimizer: same groups and sizes, state tensors shaped like their parameters) and a
    ``scheduler`` and ``config`` mapping. Nothing is modified."""
    fix = "it was not written by this run's settings, or it is damaged; delete it to resume from the one before"

    def bad(what: str) -> DiffusionLoraError:
        return DiffusionLoraError(f"{path / STATE}: {what}; {fix}")

    if not isinstance(saved, dict):
        raise bad(f"holds a {type(saved).__name__}, not a checkpoint")
    missing = [k for k in ("step", "params", "optimizer", "scheduler", "config") if k not in saved]
    if missing:
        raise bad(f"lacks {', '.join(missing)}")
    step = saved["step"]
    if type(step) is not int or not 0 <= step <= steps:
        raise bad(f"step is {step!r}, not a step count in [0, {steps}] (train.steps)")
    for key in ("scheduler", "config"):
        if not isinstance(saved[key], dict):
            raise bad(f"{key} is a {type(saved[key]).__name__}, not a mapping")
    _check_params(saved["params"], params, bad)
    in_order = [p for group in optimizer.param_groups for p in group["params"]]
    _check_optimizer(saved["optimizer"], optimizer.state_dict(), in_order, bad)


def _check_params(saved: Any, params: Mapping[str, torch.Tensor], bad: Any) -> None:
    if not isinstance(saved, dict):
        raise bad(f"params is a {type(saved).__name__}, not a mapping")
    extra = sorted(set(saved) - set(params), key=str)
    if extra:
        raise bad(f"parameter {extra[0]} is not in this run's adapter")
    absent = [n for n in params if n not in saved]
    if absent:
        raise bad(f"parameter {absent[0]} of this run's adapter is missing")
    for name, tensor in saved.items():
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise bad(f"parameter {name} is not a float tensor")
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise bad(f"parameter {name} has shape {list(tensor.shape)}, this run's has {list(params[name].shape)}")
        if not bool(torch.isfinite(tensor).all()):
            raise bad(f"parameter {name} holds NaN or Inf")


def _check_optimizer(saved: Any, current: Mapping[str, Any], params: list[torch.Tensor], bad: Any) -> None:
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    state = saved.get("state") if isinstance(saved, dict) else None
    if not isinstance(groups, list) or not isinstance(state, dict):
        raise bad("optimizer is not an optimizer state (param_groups and state)")
    want = [len(g["params"]) for g in current["param_groups"]]
    have = [len(g["params"]) if isinstance(g, dict) and isinstance(g.get("params"), list) else None for g in groups]
    if have != want:
        raise bad(f"optimizer has parameter groups of sizes {have}, this run's has {want}")
    ids = [i for g in groups for i in g["params"]]
    if not all(type(i) is int for i in ids) or sorted(ids) != list(range(len(params))):
        raise bad("optimizer's parameter ids are not 0..N-1")
    shapes = {i: tuple(p.shape) for i, p in zip(ids, params, strict=True)}
    for index, entry in state.items():
        if index not in shapes or not isinstance(entry, dict):
            raise bad(f"optimizer state {index!r} belongs to no parameter")
        for key, value in entry.items():
            if not isinstance(value, torch.Tensor):
                continue
            if value.dim() and tuple(value.shape) != shapes[index]:
                raise bad(f"optimizer state {key} of parameter {index} has shape {list(value.shape)}, "
                          f"the parameter {list(shapes[index])}")
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise bad(f"optimizer state {key} of parameter {index} holds NaN or Inf")


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The state saved in checkpoint folder ``path`` (tensors and plain values only; no code runs)."""
    try:
        return torch.load(path / STATE, map_location="cpu", weights_only=True)
    except Exception as exc:  # a checkpoint we did not write, or a broken disk
        raise DiffusionLoraError(f"{path / STATE}: cannot read this checkpoint ({exc}); delete it to resume "
                                 f"from the one before") from exc


def resume_view(cfg: Any) -> dict:
    """The part of a run's config (a :class:`~.config.TrainConfig`) a checkpoint must match to be
    resumed: everything but the step count, the non-finite step allowance (a safety limit, not part
    of the math) and outputs."""
    view = cfg.to_dict()
    view["train"] = {k: v for k, v in view["train"].items() if k not in ("steps", "max_nonfinite_steps")}
    for section in ("sample", "log", "checkpoint", "output"):
        view.pop(section, None)
    return view
