"""diffusion_lora — train, load, stack, fuse and share LoRA adapters for diffusers image models.

The public API lives here::

    import diffusion_lora as dl
    pipe = dl.load_pipeline("tiny-sd15")
    dl.load_lora(pipe, "style.safetensors", weight=0.8)
"""

from .adapters import (  # noqa: E402
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
from .errors import (  # noqa: E402
    AdapterNotFoundError,
    AdapterStateError,
    ConfigError,
    DatasetError,
    DiffusionLoraError,
    FamilyMismatchError,
    FormatError,
    KeyMappingError,
    ModelLoadError,
    UnsafeFileError,
    UnsupportedModelError,
)
from .families import FAMILIES, Family, Objective, detect_family, get_family  # noqa: E402
from .models import TINY_MODELS, build_tiny_pipeline, load_pipeline  # noqa: E402
from .training import TrainConfig, TrainResult, load_config, train  # noqa: E402
from .version import __version__  # noqa: E402

__all__ = [
    "__version__",
    "FAMILIES",
    "TINY_MODELS",
    "AdapterNotFoundError",
    "AdapterStateError",
    "ConfigError",
    "DatasetError",
    "DiffusionLoraError",
    "Family",
    "FamilyMismatchError",
    "FormatError",
    "KeyMappingError",
    "LoadReport",
    "LoraInfo",
    "ModelLoadError",
    "Objective",
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
