"""diffusion_lora — train, load, stack, fuse and share LoRA adapters for diffusers image models.

The public API lives here::

    import diffusion_lora as dl
    pipe = dl.load_pipeline("tiny-sd15")
    dl.load_lora(pipe, "style.safetensors", weight=0.8)

``import diffusion_lora`` imports neither torch nor diffusers: the names that need them are imported
on first use (a module ``__getattr__``, as diffusers does), so the CLI's ``--help`` starts at once.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    AdapterNotFoundError,
    AdapterStateError,
    ConfigError,
    DatasetError,
    DiffusionLoraError,
    FamilyMismatchError,
    FormatError,
    KeyMappingError,
    ModelLoadError,
    RequestLimitError,
    ServerBusyError,
    ServerClosedError,
    UnsafeFileError,
    UnsupportedModelError,
)
from .families import FAMILIES, Family, Objective, detect_family, get_family
from .version import __version__

if TYPE_CHECKING:
    from .adapters import (
        LoadReport,
        LoraInfo,
        adapter_data,
        add_lora,
        disable,
        enable,
        fuse,
        hotswap,
        list_loras,
        load_lora,
        remove_lora,
        save_lora,
        set_weights,
        unfuse,
    )
    from .models import TINY_MODELS, build_tiny_pipeline, enable_offload, load_pipeline
    from .serve import AdapterRef, Engine, Job, JobResult, ServeLimits
    from .training import TrainConfig, TrainResult, load_config, train

# Public names that need torch/diffusers/peft, by the subpackage that defines them.
_LAZY_FROM: dict[str, tuple[str, ...]] = {
    ".adapters": (
        "LoadReport",
        "LoraInfo",
        "adapter_data",
        "add_lora",
        "disable",
        "enable",
        "fuse",
        "hotswap",
        "list_loras",
        "load_lora",
        "remove_lora",
        "save_lora",
        "set_weights",
        "unfuse",
    ),
    ".models": ("TINY_MODELS", "build_tiny_pipeline", "enable_offload", "load_pipeline"),
    ".serve": ("AdapterRef", "Engine", "Job", "JobResult", "ServeLimits"),
    ".training": ("TrainConfig", "TrainResult", "load_config", "train"),
}
_LAZY: dict[str, str] = {name: module for module, names in _LAZY_FROM.items() for name in names}

__all__ = [
    "__version__",
    "FAMILIES",
    "TINY_MODELS",
    "AdapterNotFoundError",
    "AdapterRef",
    "AdapterStateError",
    "ConfigError",
    "DatasetError",
    "DiffusionLoraError",
    "Engine",
    "Family",
    "FamilyMismatchError",
    "FormatError",
    "Job",
    "JobResult",
    "KeyMappingError",
    "LoadReport",
    "LoraInfo",
    "ModelLoadError",
    "Objective",
    "RequestLimitError",
    "ServeLimits",
    "ServerBusyError",
    "ServerClosedError",
    "TrainConfig",
    "TrainResult",
    "UnsafeFileError",
    "UnsupportedModelError",
    "adapter_data",
    "add_lora",
    "build_tiny_pipeline",
    "detect_family",
    "disable",
    "enable",
    "enable_offload",
    "fuse",
    "get_family",
    "hotswap",
    "list_loras",
    "load_lora",
    "load_config",
    "load_pipeline",
    "remove_lora",
    "save_lora",
    "set_weights",
    "train",
    "unfuse",
]


def __getattr__(name: str) -> Any:
    """Import a lazily exported name's subpackage on first use and keep the name here."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
