"""Atomic file writing: a crash or a full disk never leaves a half-written file at the target path.

Write to a unique temp file in the target's folder, fsync it, ``os.replace`` it onto the target, then
fsync the folder. Used for adapter files, checkpoints and anything else that must not be torn.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import stat
from pathlib import Path

from ..errors import FormatError

logger = logging.getLogger(__name__)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def atomic_write_bytes(path: Path, data: bytes, *, what: str = "file") -> None:
    """Write ``data`` to a fresh temp file beside ``path``, fsync it, then replace ``path`` with it.

    Either the complete new file is at ``path`` or, on any failure, the previous one is untouched and
    no temp file remains. OS errors (disk full, permission denied) become FormatError naming the path.
    """
    if path.is_dir():
        raise FormatError(f"{path}: is a directory; give the path of the file to write")
    fd, tmp = _create_temp(path)
    try:
        try:
            if path.exists():
                os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        _remove_quietly(tmp)
        if isinstance(e, OSError):
            raise FormatError(f"{path}: could not write the {what}: {e}") from e
        raise
    _fsync_directory(path.parent)


def _create_temp(path: Path) -> tuple[int, str]:
    # O_EXCL with mode 0o666 (unlike mkstemp's 0o600) lets the umask decide a new file's permissions.
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
        except OSError as e:
            raise FormatError(f"{path}: cannot create a file in {path.parent}: {e.strerror or e}") from e
    raise FormatError(f"{path}: could not find a free temp file name in {path.parent}")


def _remove_quietly(tmp: str) -> None:
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    except OSError as e:
        logger.warning("could not remove temp file %s: %s", tmp, e)


def _fsync_directory(directory: Path) -> None:
    # The file is already in place; a folder that cannot be fsynced (Windows, some network file
    # systems) only weakens durability after a power loss, so it is logged, not raised.
    if os.name != "posix":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        logger.warning("could not fsync directory %s: %s", directory, e)


def write_new_file(path: Path, data: bytes, *, what: str = "file") -> None:
    """Write ``data`` to ``path`` only if nothing is there yet: never replace, never follow a link.

    The bytes go to a temp file beside ``path`` and are fsynced; ``os.link`` then gives them the
    name, which fails atomically if any entry — file, folder or symlink, even a dangling one — is
    already there, so two writers racing for one name cannot both win. Raises FileExistsError when
    the name is taken (the caller picks another); other OS errors become FormatError naming the path.
    Where hard links are unsupported (FAT, some network shares), the name is claimed with an
    exclusive create and the temp file renamed onto that claim.
    """
    fd, tmp = _create_temp(path)
    try:
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        _link_new(tmp, path)
    except FileExistsError:
        raise
    except OSError as e:
        raise FormatError(f"{path}: could not write the {what}: {e.strerror or e}") from e
    finally:
        _remove_quietly(tmp)
    _fsync_directory(path.parent)


def _link_new(tmp: str, path: Path) -> None:
    try:
        os.link(tmp, path, follow_symlinks=False)
        return
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK):
            raise
    # No hard links here: claim the name exclusively (O_EXCL never follows a link), then rename onto it.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    os.close(os.open(path, flags, 0o666))
    os.replace(tmp, path)


def open_append_no_follow(path: Path, *, what: str = "file") -> int:
    """A file descriptor of ``path`` opened for appending (created if absent), never through a symlink.

    A symlink at ``path`` (even a dangling one), a FIFO, a device or a folder is refused with a
    FormatError naming the path, as is any OS error. The caller owns (and closes) the descriptor,
    e.g. with ``os.fdopen(fd, "ab")``.
    """
    refusal = f"{path}: is a symlink; refusing to write the {what} through it; remove the link"
    if os.path.islink(path):  # checked first too, for systems without O_NOFOLLOW
        raise FormatError(refusal)
    flags = (os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
             | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as e:
        if os.path.islink(path):  # ELOOP from O_NOFOLLOW: a link planted after the check above
            raise FormatError(refusal) from e
        raise FormatError(f"{path}: could not open the {what} for writing: {e.strerror or e}") from e
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise FormatError(f"{path}: is not a regular file; refusing to write the {what} into it; remove it")
    return fd
