"""The adapter engine: injection, loading, weights, fuse/unfuse and hot-swap, on top of PEFT."""

from .api import (
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
