"""The adapter cache: adapters from the adapter folders, loaded on demand into one pipeline, evicted LRU.

A name resolves only to a ``.safetensors`` file inside one of the folders (no ``..``, no absolute path,
no symlink leading out; see :func:`prompt_tags.find_in_lora_dirs`); pickles never load. The cache is
bounded by a count and by bytes (the adapter tensors as loaded); pinned adapters (those of the batch
running, and any the operator pins) are never evicted. An entry remembers its file's size and
modification time: a file changed on disk is loaded again rather than served stale.

Only the engine's worker thread calls :meth:`AdapterCache.acquire`, :meth:`release` and :meth:`clear`
(they change the pipeline); :meth:`entries`, ``len()`` and :attr:`nbytes` may be read from any thread, and
:meth:`index` only reads the folders. An adapter the cache loads stays disabled between batches (the
engine sets every batch's weights), so the pipeline's own active adapters are what the operator set.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..adapters import adapter_bytes, disable, list_loras, load_lora, remove_lora
from ..errors import AdapterStateError, ConfigError, DiffusionLoraError, FormatError, KeyMappingError
from ..formats.adapter_files import default_adapter_name, header_of
from ..formats.hashes import addnet_hash
from ..formats.printable import printable
from ..prompt_tags import LoraTag, find_in_lora_dirs

__all__ = ["AdapterCache", "CachedAdapter", "LoraFile"]

logger = logging.getLogger(__name__)

_MAX_BROKEN = 1024  # broken files remembered (by size and mtime) so that asking again does not read them again
_MAX_INDEXED = 100_000  # files listed from the folders (an index bigger than that is a mistake, not a library)


@dataclass
class CachedAdapter:
    """One adapter in the pipeline: its file, the name it has in the pipeline, bytes and pins."""

    path: Path
    stamp: tuple[int, int]  # (size, mtime_ns) when loaded
    loaded_as: str  # the adapter's name inside the pipeline
    shown: str  # its name in PNG infotext (the file's stem, as the CLI and A1111 show it)
    nbytes: int
    short_hash: str | None
    pins: int = 0


@dataclass(frozen=True)
class LoraFile:
    """An adapter file of the folders, as A1111's ``/sdapi/v1/loras`` lists it."""

    name: str  # relative path without .safetensors (the name a tag uses)
    alias: str  # ss_output_name when the file says one, else the name
    path: str
    metadata: dict[str, str]


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


class AdapterCache:
    """Adapters of ``lora_dirs`` loaded into ``pipe`` on demand, at most ``max_count`` and ``max_bytes``."""

    def __init__(self, pipe: Any, lora_dirs: Sequence[str | os.PathLike], *, max_count: int = 32,
                 max_bytes: int | None = None) -> None:
        if isinstance(max_count, bool) or not isinstance(max_count, int) or max_count < 1:
            raise ConfigError(f"cache_size must be a whole number of at least 1, got {max_count!r}")
        if max_bytes is not None and (not isinstance(max_bytes, int) or max_bytes < 1):
            raise ConfigError(f"cache_mb must be positive, got {max_bytes!r}")
        self.pipe = pipe
        self.lora_dirs = [Path(d) for d in lora_dirs]
        for folder in self.lora_dirs:
            if not folder.is_dir():
                raise ConfigError(f"lora_dir {printable(str(folder))}: not a folder")
        self.max_count, self.max_bytes = max_count, max_bytes
        self._entries: OrderedDict[Path, CachedAdapter] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()  # guards _entries against readers on other threads
        # adapters loaded before the server started (``--lora``) are served by name and never evicted
        self._preloaded = {info.name for info in list_loras(pipe)}
        # internal names never collide with an adapter already in the pipe (say, a closed engine's)
        self._names = (n for n in (f"serve_{i}" for i in itertools.count()) if n not in self._preloaded)
        self.loads = self.evictions = 0
        # path -> (stamp, error) of files that failed to load: refused again without reading them until they change
        self._broken: OrderedDict[Path, tuple[tuple[int, int], DiffusionLoraError]] = OrderedDict()

    @property
    def preloaded(self) -> frozenset[str]:
        """Names of the adapters that were in the pipeline before the cache: served as they are, never evicted."""
        return frozenset(self._preloaded)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[CachedAdapter]:
        """The cached adapters, least recently used first."""
        with self._lock:
            return list(self._entries.values())

    def resolve(self, name: str) -> Path:
        """The real file ``name`` stands for inside the folders (ConfigError naming it otherwise)."""
        try:
            return find_in_lora_dirs(LoraTag(name, 1.0), self.lora_dirs)
        except (OSError, ValueError) as exc:  # a name the file system refuses (too long, NUL): not a file here
            if isinstance(exc, DiffusionLoraError):
                raise
            raise ConfigError(f"adapter {printable(name)}: not a file name inside the lora folders: {exc}") from None

    def acquire(self, name: str) -> CachedAdapter | str:
        """Load ``name`` if needed, pin it and return its entry; a preloaded adapter's name is returned as is.

        Raises the load's error (naming the file) for a broken file, ConfigError for a name outside the
        folders, AdapterStateError when the adapter does not fit beside the pinned ones (or alone).
        A file changed on disk is loaded again, unless the running batch already pins the old version
        (that batch keeps the version it started with; the next one loads the new file).
        """
        if name in self._preloaded:
            return name
        try:
            path = self.resolve(name)
            stamp = _stamp(path)
        except OSError as exc:  # removed between the lookup and now
            raise ConfigError(f"adapter {printable(name)}: cannot read its file: {exc.strerror or exc}") from None
        entry = self._entries.get(path)
        if entry is not None and entry.stamp != stamp and entry.pins == 0:
            logger.info("%s changed on disk: loading it again", printable(str(path)))
            self._evict(entry)
            entry = None
        broken = self._broken.get(path)
        if entry is None and broken is not None and broken[0] == stamp:
            raise type(broken[1])(*broken[1].args)
        if entry is None:
            entry = self._load(path, stamp)
        else:
            with self._lock:
                self._entries.move_to_end(path)
        entry.pins += 1
        return entry

    def release(self, entry: CachedAdapter | str) -> None:
        if isinstance(entry, CachedAdapter) and entry.pins > 0:
            entry.pins -= 1

    def clear(self) -> None:
        """Unload every unpinned adapter the cache loaded (preloaded adapters stay)."""
        for entry in self.entries():
            if entry.pins == 0:
                self._evict(entry)

    def _load(self, path: Path, stamp: tuple[int, int]) -> CachedAdapter:
        # evict by the file's size before loading (a guess: the tensors may change dtype), so that memory
        # stays near the bound; the exact bound is enforced below, once the loaded size is known
        self._evict_until(lambda: self._over(1, stamp[0]))
        if self._over(1, 0):
            raise AdapterStateError(
                f"{printable(str(path))}: no room in the adapter cache: all {len(self._entries)} cached adapters "
                f"are in use by the running batch (cache_size {self.max_count}); raise cache_size or send fewer "
                "adapters per batch")
        name = next(self._names)
        try:
            try:
                load_lora(self.pipe, path, name=name, weight=1.0)
            except DiffusionLoraError:
                raise
            except Exception as exc:  # a hostile file must fail its requests, never the server
                raise FormatError(f"{printable(str(path))}: could not be loaded: {type(exc).__name__}: {exc}") from None
        except (FormatError, KeyMappingError) as exc:  # the file's own fault: remembered until it changes
            self._broken[path] = (stamp, exc)
            self._broken.move_to_end(path)
            while len(self._broken) > _MAX_BROKEN:
                self._broken.popitem(last=False)
            raise
        try:
            disable(self.pipe, name)  # active only in the batches that ask for it, at their weights
            nbytes = adapter_bytes(self.pipe, name)
        except BaseException:
            remove_lora(self.pipe, name)
            raise
        self._evict_until(lambda: self._over(1, nbytes))
        if self._over(1, nbytes):
            remove_lora(self.pipe, name)
            pinned = self.nbytes
            why = (f"it alone is over cache_bytes {self.max_bytes}" if nbytes > (self.max_bytes or 0) else
                   f"the running batch pins {pinned} bytes of adapters (cache_bytes {self.max_bytes})")
            raise AdapterStateError(f"{printable(str(path))}: its {nbytes} bytes do not fit in the adapter cache: "
                                    f"{why}; raise cache_bytes / --cache-mb")
        try:
            short = addnet_hash(path)[:12]
        except (FormatError, OSError):
            short = None
        entry = CachedAdapter(path, stamp, name, default_adapter_name(path), nbytes, short)
        with self._lock:
            self._entries[path] = entry
        self.loads += 1
        return entry

    def _over(self, extra: int, extra_bytes: int) -> bool:
        """Whether the cache plus ``extra`` adapters of ``extra_bytes`` bytes exceeds a bound."""
        return len(self._entries) + extra > self.max_count or (
            self.max_bytes is not None and self.nbytes + extra_bytes > self.max_bytes)

    def _evict_until(self, over) -> None:
        """Evict unpinned adapters, least recently used first, while ``over()`` is true."""
        for entry in self.entries():
            if not over():
                return
            if entry.pins == 0:
                self._evict(entry)

    def _evict(self, entry: CachedAdapter) -> None:
        remove_lora(self.pipe, entry.loaded_as)  # first: if it fails, the entry still accounts for the adapter
        with self._lock:
            del self._entries[entry.path]
        self.evictions += 1

    def index(self) -> list[LoraFile]:
        """Every ``.safetensors`` file inside the folders (symlinks leading out left out), sorted by name."""
        found: dict[str, LoraFile] = {}
        for folder in self.lora_dirs:
            root = folder.resolve()
            for path in itertools.islice(sorted(root.rglob("*.safetensors")), _MAX_INDEXED):
                try:
                    real = path.resolve()
                    if not real.is_relative_to(root) or not real.is_file():
                        continue
                    metadata, _ = header_of(real)
                except (OSError, RuntimeError, DiffusionLoraError):
                    continue  # unreadable files are listed by nobody; naming one in a request says why
                name = path.relative_to(root).with_suffix("").as_posix()
                alias = metadata.get("ss_output_name") or name
                found.setdefault(name, LoraFile(name, str(alias), str(real), dict(metadata)))
        return [found[n] for n in sorted(found)]
