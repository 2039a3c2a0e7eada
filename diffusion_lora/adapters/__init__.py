"""The adapter engine: injection, loading, weights, fuse/unfuse and hot-swap, on top of PEFT.

Besides the user-facing functions, this is the surface the file tools (``tools/``) use: a pipeline's
module keys, its plain (unwrapped) layers and state dict, target resolution, the weight check, and what a
quantized layer stands for (its float weight and shape).
"""

from .api import (
    LoadReport,
    LoraInfo,
    adapter_bytes,
    adapter_settings,
    add_lora,
    disable,
    enable,
    fuse,
    is_fused,
    list_loras,
    load_lora,
    remove_lora,
    set_weights,
    unfuse,
)
from .inject import resolve_targets
from .keys import keys_of_components, pipeline_keys
from .layers import plain_modules, plain_state_dict
from .mixed import per_sample_adapters, uses_dora
from .quantized import dequantized_weight, logical_shape, quant_kind
from .state import Weight
from .transfer import adapter_data, hotswap, save_lora
from .weights import check_weight_value

__all__ = [
    "LoadReport",
    "LoraInfo",
    "Weight",
    "adapter_bytes",
    "adapter_settings",
    "adapter_data",
    "add_lora",
    "check_weight_value",
    "dequantized_weight",
    "disable",
    "enable",
    "fuse",
    "hotswap",
    "is_fused",
    "keys_of_components",
    "list_loras",
    "load_lora",
    "per_sample_adapters",
    "logical_shape",
    "pipeline_keys",
    "plain_modules",
    "plain_state_dict",
    "quant_kind",
    "remove_lora",
    "resolve_targets",
    "save_lora",
    "set_weights",
    "unfuse",
    "uses_dora",
]
