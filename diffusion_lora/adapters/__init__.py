"""The adapter engine: injection, loading, weights, fuse/unfuse and hot-swap, on top of PEFT."""

from .api import (
    LoadReport,
    LoraInfo,
    add_lora,
    disable,
    enable,
    fuse,
    list_loras,
    load_lora,
    remove_lora,
    set_weights,
    unfuse,
)
from .transfer import adapter_data, hotswap, save_lora

__all__ = [
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
]
