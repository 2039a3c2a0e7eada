"""The files a run touches: dataset files read without hanging or inflating, outputs written without
following links.

Dataset files are opened with ``O_NONBLOCK`` and checked to be regular files before anything is read,
so a FIFO named ``x.png`` cannot hang the run. Everything the run writes into its output folder goes
through a temp file in the target folder and an atomic rename (:mod:`diffusion_lora.formats.atomic`),
so a symlink planted in the output folder is replaced, never written through; the folders the run
creates there (``logs``, ``samples``) must be real folders, not links.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import DatasetError, DiffusionLoraError
from ..formats.atomic import atomic_write_bytes
from ..formats.regular_file import open_regular as _open_regular


def open_regular(path: Path) -> BinaryIO:
    """``path`` opened for binary reading; DatasetError naming it unless it is a regular file."""
    return _open_regular(path, error=DatasetError)


def read_bounded(path: Path, limit: int, what: str) -> bytes | None:
    """The bytes of the regular file ``path`` (None if nothing is there); DatasetError naming it when it
    is not a regular file, cannot be read or holds more than ``limit`` bytes (only ``limit + 1`` are read)."""
    if not os.path.lexists(path):
        return None
    with open_regular(path) as fh:
        try:
            data = fh.read(limit + 1)
        except OSError as exc:
            raise DatasetError(f"{path}: {what} cannot be read ({exc.strerror or exc})") from exc
    if len(data) > limit:
        raise DatasetError(f"{path}: {what} is over the limit of {limit:,} bytes; shorten it")
    return data


def own_folder(path: Path) -> Path:
    """``path`` created if needed (with its parents) and checked to be a real folder, not a symlink."""
    if path.is_symlink():
        raise DiffusionLoraError(f"{path}: is a symlink; the run writes only into folders it owns; remove the link")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError as exc:
        raise DiffusionLoraError(f"{path}: exists and is not a folder; remove or rename it") from exc
    except OSError as exc:
        raise DiffusionLoraError(f"{path}: cannot create the folder ({exc.strerror or exc})") from exc
    if path.is_symlink() or not path.is_dir():
        raise DiffusionLoraError(f"{path}: is not a folder the run owns; remove it")
    return path


def write_output(path: Path, data: bytes, what: str) -> Path:
    """``data`` at ``path`` by temp file + atomic rename (a symlink there is replaced, never followed)."""
    atomic_write_bytes(path, data, what=what)
    return path


def write_png(image: Any, path: Path, what: str = "image") -> Path:
    """A PIL image saved as PNG at ``path``, atomically (see :func:`write_output`)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return write_output(path, buffer.getvalue(), what)
