"""Caches of VAE latent distributions and text-encoder outputs, in memory or on disk.

A cache entry's key covers everything its value depends on — the model's fingerprint, the image
file's bytes and caption, the bucket, the crop and the flip — so a stale entry can never be
returned: anything that changes gives another key, and the entry is rebuilt. Disk entries are
safetensors files written atomically and read back through the validating reader.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import DiffusionLoraError
from ..formats.safetensors_io import read_adapter_file, write_adapter_file

logger = logging.getLogger(__name__)
Entry = dict[str, torch.Tensor]


def model_fingerprint(*modules: torch.nn.Module) -> str:
    """A fingerprint of module weights: configs, every parameter's name/shape/dtype and a sample of values.

    Hashes at most 8 192 values per tensor plus the tensor's float64 sum, so it stays fast on
    multi-billion-parameter encoders while any retraining or swap of the model changes it.
    """
    h = hashlib.sha256()
    for module in modules:
        config = getattr(module, "config", None)
        if config is not None:
            h.update(json.dumps(_plain(config), sort_keys=True, default=str).encode())
        for name, p in module.state_dict().items():
            flat = p.detach().reshape(-1)
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
            sample = torch.cat([flat[:4096], flat[-4096:]]) if flat.numel() > 8192 else flat
            h.update(sample.to("cpu", torch.float32).numpy().tobytes())
            h.update(repr(float(flat.double().sum())).encode())
    return h.hexdigest()


def _plain(config: Any) -> Any:
    try:
        return dict(config)
    except (TypeError, ValueError):
        return config.to_dict() if hasattr(config, "to_dict") else str(config)


def entry_key(*parts: object) -> str:
    """The cache key of an entry from the values it depends on."""
    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()


class TensorCache:
    """Key → dict of tensors, kept in memory, on disk under ``directory``, or not at all (``off``)."""

    def __init__(self, mode: str, directory: Path | None = None) -> None:
        if mode not in ("memory", "disk", "off"):
            raise DiffusionLoraError(f"cache mode {mode!r} must be memory, disk or off")
        self.mode = mode
        self.directory = directory
        self._memory: dict[str, Entry] = {}
        if mode == "disk":
            if directory is None:
                raise DiffusionLoraError("a disk cache needs a directory (cache.dir)")
            directory.mkdir(parents=True, exist_ok=True)

    def get(self, key: str, compute: Callable[[], Entry]) -> Entry:
        """The entry for ``key``, computing (and storing) it on a miss. Values are detached CPU tensors."""
        if self.mode == "off":
            return compute()
        cached = self._memory.get(key) if self.mode == "memory" else self._read(key)
        if cached is not None:
            return cached
        value = {k: v.detach().to("cpu").contiguous() for k, v in compute().items()}
        if self.mode == "memory":
            self._memory[key] = value
        else:
            write_adapter_file(self._path(key), value, {"diffusion_lora.cache": "1"})
        return value

    def _path(self, key: str) -> Path:
        assert self.directory is not None
        return self.directory / f"{key}.safetensors"

    def _read(self, key: str) -> Entry | None:
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            tensors, _ = read_adapter_file(path)
        except DiffusionLoraError as exc:  # a torn or foreign file: rebuild it
            logger.warning("cache entry %s is unreadable (%s); rebuilding it", path, exc)
            return None
        return tensors


def to_device(entry: Mapping[str, torch.Tensor], device: torch.device, dtype: torch.dtype | None = None) -> Entry:
    return {k: v.to(device=device, dtype=dtype if dtype is not None and v.is_floating_point() else v.dtype)
            for k, v in entry.items()}
