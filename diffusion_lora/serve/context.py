"""What the HTTP routes share: the engine seen from the event loop, seeds and PNG encoding."""

from __future__ import annotations

import asyncio
import base64
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

from ..errors import AdapterNotFoundError, ConfigError
from ..formats.printable import printable
from .cache import LoraFile
from .engine import Engine
from .jobs import AdapterRef, Job, JobResult

__all__ = ["ServerContext", "check_names", "png_base64", "random_seed"]

_MAX_SEED = 2**32 - 1  # A1111 draws random seeds below 2**32; so do we, whatever API asked


@dataclass
class ServerContext:
    """What every route needs: the engine and how the served model is named."""

    engine: Engine
    model_name: str
    model_hash: str | None = None
    _index: list[LoraFile] | None = field(default=None, repr=False)
    _index_lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)

    async def lora_index(self, refresh: bool = False) -> list[LoraFile]:
        """The adapter files of the folders, read once (walking the folders and every header is not per-request
        work) and again on ``refresh`` (A1111's refresh-loras). Requests resolve names on disk either way."""
        async with self._index_lock:
            if self._index is None or refresh:
                self._index = await asyncio.to_thread(self.engine.cache.index)
            return self._index

    async def run(self, job: Job) -> JobResult:
        """Check the job's adapter names, queue it and wait for its images without blocking the loop."""
        refs = self.engine.check(job).refs  # the limits first: a job over one is refused before any file is read
        await asyncio.to_thread(check_names, self.engine, refs)  # touches the file system
        return await asyncio.wrap_future(self.engine.submit(job))


def check_names(engine: Engine, refs: Sequence[AdapterRef]) -> None:
    """Refuse a stack naming a file that is not in the folders (404) or that cannot be used (422), before
    the job takes a queue slot. The engine resolves the names again when it loads them."""
    preloaded = engine.cache.preloaded  # adapters loaded before the server started (served by name)
    for ref in refs:
        if ref.name in preloaded:
            continue
        try:
            engine.cache.resolve(ref.name)
        except ConfigError:
            if _absent(engine.cache.lora_dirs, ref.name):
                raise AdapterNotFoundError(
                    f"adapter {printable(ref.name)!r}: no loaded adapter of that name and no "
                    f"{printable(PurePosixPath(ref.name).name)}.safetensors in the adapter folders; "
                    "GET /sdapi/v1/loras lists the names") from None
            raise


def _absent(folders: Sequence[Path], name: str) -> bool:
    """True when ``name`` is a plain relative name and no folder holds a file of that name (a 404), False
    for names that the resolver refuses for what they are ('..', absolute paths: a 422)."""
    pure = PurePosixPath(name.replace("\\", "/"))
    if pure.is_absolute() or PureWindowsPath(name).drive or ".." in pure.parts or not pure.parts:
        return False
    relative = pure if pure.suffix == ".safetensors" else pure.with_name(pure.name + ".safetensors")
    return not any((Path(folder) / relative).exists() for folder in folders)


def random_seed() -> int:
    return secrets.randbelow(_MAX_SEED + 1)


def png_base64(result: JobResult) -> list[str]:
    return [base64.b64encode(image.png_bytes()).decode("ascii") for image in result.images]
