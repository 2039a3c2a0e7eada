"""The adapter cache: adapters from the adapter folders, loaded on demand into one pipeline, evicted LRU.

A name resolves only to a ``.safetensors`` file inside one of the folders (no ``..``, no absolute path,
no symlink leading out; see :func:`prompt_tags.find_in_lora_dirs`); pickles never load. The cache is
bounded by a count and by bytes (the adapter tensors as loaded); pinned adapters (those of the batch
running, and any the operator pins) are never evicted. An entry remembers its file's size and
modification time: a file changed on disk is loaded again rather than served stale.

Only the engine's worker thread calls :meth:`AdapterCache.acquire` and :meth:`release` (they change the
pipeline); :meth:`index` only reads the folders.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..adapters import adapter_bytes, list_loras, load_lora, remove_lora
from ..errors import AdapterStateError, ConfigError, DiffusionLoraError, FormatError
from ..formats.adapter_files import default_adapter_name, header_of
from ..formats.hashes import addnet_hash
from ..formats.printable import printable
from ..prompt_tags import LoraTag, find_in_lora_dirs

__all__ = ["AdapterCache", "CachedAdapter", "LoraFile"]

logger = logging.getLogger(__name__)

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
        self._names = (f"serve_{i}" for i in itertools.count())
        # adapters loaded before the server started (``--lora``) are served by name and never evicted
        self._preloaded = {info.name for info in list_loras(pipe)}
        self.loads = self.evictions = 0

    @property
    def preloaded(self) -> frozenset[str]:
        """Adapters loaded in the pipeline before the cache was made: served by name, never evicted."""
        return frozenset(self._preloaded)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[CachedAdapter]:
        """The cached adapters, least recently used first."""
        return list(self._entries.values())

    def resolve(self, name: str) -> Path:
        """The real file ``name`` stands for inside the folders (ConfigError naming it otherwise)."""
        return find_in_lora_dirs(LoraTag(name, 1.0), self.lora_dirs)

    def acquire(self, name: str) -> CachedAdapter | str:
        """Load ``name`` if needed, pin it and return its entry; a preloaded adapter's name is returned as is.

        Raises the load's error (naming the file) for a broken file, ConfigError for a name outside the
        folders, AdapterStateError when every cached adapter is pinned and there is no room.
        """
        if name in self._preloaded:
            return name
        path = self.resolve(name)
        entry = self._entries.get(path)
        if entry is not None and entry.stamp != _stamp(path):
            logger.info("%s changed on disk: loading it again", printable(str(path)))
            self._evict(entry)
            entry = None
        if entry is None:
            entry = self._load(path)
        self._entries.move_to_end(path)
        entry.pins += 1
        return entry

    def release(self, entry: CachedAdapter | str) -> None:
        if isinstance(entry, CachedAdapter) and entry.pins > 0:
            entry.pins -= 1

    def _load(self, path: Path) -> CachedAdapter:
        stamp = _stamp(path)
        self._make_room(stamp[0])
        name = next(self._names)
        try:
            load_lora(self.pipe, path, name=name, weight=1.0)
        except DiffusionLoraError:
            raise
        except Exception as exc:  # a hostile file must fail its requests, never the server
            raise FormatError(f"{printable(str(path))}: could not be loaded: {type(exc).__name__}: {exc}") from None
        nbytes = adapter_bytes(self.pipe, name)
        try:
            short = addnet_hash(path)[:12]
        except FormatError:
            short = None
        entry = CachedAdapter(path, stamp, name, default_adapter_name(path), nbytes, short)
        self._entries[path] = entry
        self.loads += 1
        # the byte bound is checked against the real size now that it is known
        self._make_room(0)
        return entry

    def _make_room(self, incoming: int) -> None:
        """Evict unpinned adapters, least recently used first, until one more (of ``incoming`` bytes) fits."""
        def over() -> bool:
            count = len(self._entries) + (1 if incoming else 0)
            size = self.nbytes + incoming
            return count > self.max_count or (self.max_bytes is not None and size > self.max_bytes)

        for entry in list(self._entries.values()):
            if not over():
                return
            if entry.pins == 0:
                self._evict(entry)
        if over() and incoming:
            raise AdapterStateError(
                f"the adapter cache is full of adapters in use ({len(self._entries)} adapters, {self.nbytes} bytes); "
                "raise cache_size / cache_mb or send fewer adapters per batch"
            )

    def _evict(self, entry: CachedAdapter) -> None:
        remove_lora(self.pipe, entry.loaded_as)
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
