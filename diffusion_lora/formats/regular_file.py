"""Opening a user's path for reading without hanging on it: the one opener every reader uses.

``O_NONBLOCK`` so that a FIFO at the path cannot hang the open, then ``fstat`` refuses anything that is
not a regular file: a FIFO, a socket or a device such as ``/dev/zero`` would never end or never start.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from ..errors import DiffusionLoraError, FormatError


def open_regular(
    path: str | os.PathLike, *, error: type[DiffusionLoraError] = FormatError, what: str = ""
) -> BinaryIO:
    """``path`` opened for binary reading if it is a regular file; otherwise ``error`` naming it.

    ``what`` (e.g. ``"caption file "``) goes before the path in the messages.
    """
    where = f"{what}{Path(path)}"
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError as e:
        raise error(f"{where}: no such file; check the path") from e
    except IsADirectoryError as e:
        raise error(f"{where}: is a directory; pass the file inside it") from e
    except OSError as e:
        raise error(f"{where}: cannot be opened ({e.strerror or e})") from e
    try:
        mode = os.fstat(fd).st_mode
    except OSError as e:
        os.close(fd)
        raise error(f"{where}: cannot be read ({e.strerror or e})") from e
    if not stat.S_ISREG(mode):
        os.close(fd)
        if stat.S_ISDIR(mode):
            raise error(f"{where}: is a directory; pass the file inside it")
        raise error(f"{where}: not a regular file (a FIFO, socket or device); remove it or put the file itself there")
    return os.fdopen(fd, "rb")


@contextlib.contextmanager
def reading(path: str | os.PathLike, *, doing: str = "") -> Iterator[BinaryIO]:
    """``path`` opened by :func:`open_regular`; an OSError while it is read (EIO and the like) becomes a
    FormatError naming the path (``doing``, e.g. ``" the file to hash it"``, goes after "could not read")."""
    with open_regular(path) as f:
        try:
            yield f
        except OSError as e:
            raise FormatError(f"{Path(path)}: could not read{doing}: {e.strerror or e}") from e
