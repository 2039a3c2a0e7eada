"""Loading a pipeline's denoiser quantized: through diffusers' quantization configs, or from a GGUF file.

diffusers quantizes while it loads (``TorchAoConfig``, ``BitsAndBytesConfig``, ``GGUFQuantizationConfig``
passed to the denoiser class's ``from_pretrained`` / ``from_single_file``), so the float weights of a large
denoiser are never all in memory. Where diffusers cannot do it — nf4 without a GPU (its bitsandbytes
quantizer refuses to run on the CPU), the built-in tiny and embedded models, single-file checkpoints —
:func:`diffusion_lora.models.quantize.quantize_denoiser` quantizes the loaded float layers in place with the
same libraries; both give the same layer types (and, for torchao, bit-identical weights).

The quantization libraries (and ``gguf``) are imported inside the functions: they are the optional extra
``diffusion-lora[quant]``.
"""

from __future__ import annotations

import collections
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import diffusers
import torch

from ..errors import ConfigError, ModelLoadError
from .quantize import Quantize

__all__ = [
    "GGUF_MAGIC",
    "DenoiserFile",
    "denoiser_slot",
    "describe_quantization",
    "is_gguf_file",
    "load_denoiser_file",
    "load_quantized_denoiser",
    "quantized_components",
    "read_denoiser_file",
    "require_float_weights",
]

GGUF_MAGIC = b"GGUF"
_DENOISER_SLOTS = ("transformer", "unet")
# Kept in float, as models.quantize keeps them: only the denoiser's top-level output projection. diffusers
# matches ``modules_to_not_convert`` as "key." inside or equal to the parameter name, so naming the weight
# itself keeps the top-level layer only (a bare "proj_out" would also keep every block's proj_out).
_TORCHAO_KEEP = ["proj_out.weight", "conv_out.weight"]


def is_gguf_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` starts with the GGUF magic bytes."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


class DenoiserFile:
    """A denoiser weights file given with ``denoiser=``: its path, and for GGUF its quantization types."""

    def __init__(self, path: Path, gguf_types: tuple[str, ...] | None) -> None:
        self.path = path
        self.gguf_types = gguf_types  # e.g. ("Q4_K", "Q6_K"), most frequent first; None: not GGUF

    @property
    def quantization(self) -> str | None:
        """"GGUF Q4_K, Q6_K" for a quantized GGUF file, None otherwise."""
        return f"GGUF {', '.join(self.gguf_types)}" if self.gguf_types else None


def read_denoiser_file(value: str | os.PathLike[str], setting: str = "denoiser") -> DenoiserFile:
    """Check the denoiser file ``value`` before anything loads: a GGUF file (quantization types read with the
    ``gguf`` package) or a ``.safetensors`` file. ModelLoadError naming the file otherwise."""
    path = Path(value).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"{setting} {value}: no such file; pass a GGUF (.gguf) or .safetensors denoiser file")
    if not is_gguf_file(path):
        if path.suffix.lower() == ".safetensors":
            return DenoiserFile(path, None)
        raise ModelLoadError(
            f"{setting} {path}: not a GGUF file (it does not start with the GGUF magic bytes) nor a .safetensors "
            "file; pass the denoiser (transformer/UNet) weights as .gguf or .safetensors"
        )
    try:
        import gguf
    except ImportError:
        raise ConfigError(
            f"{setting} {path}: a GGUF file needs the gguf package, which is not installed: "
            "pip install 'diffusion-lora[quant]'"
        ) from None
    try:
        reader = gguf.GGUFReader(str(path))
        counts = collections.Counter(t.tensor_type.name for t in reader.tensors)
    except Exception as exc:  # gguf raises ValueError, KeyError, struct errors on damaged files
        raise ModelLoadError(f"{setting} {path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from exc
    if not counts:
        raise ModelLoadError(f"{setting} {path}: the GGUF file holds no tensors")
    plain = {"F32", "F16", "BF16", "F64"}
    quantized = tuple(name for name, _ in counts.most_common() if name not in plain)
    return DenoiserFile(path, quantized)


def denoiser_slot(model_index: Mapping[str, Any]) -> tuple[str, str] | None:
    """(component name, diffusers class name) of the denoiser in a pipeline's ``model_index.json``."""
    for slot in _DENOISER_SLOTS:
        entry = model_index.get(slot)
        if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1]:
            return slot, str(entry[1])
    return None


def describe_quantization(config: Mapping[str, Any]) -> str | None:
    """A short description of a saved model config's ``quantization_config`` ("torchao Int8WeightOnlyConfig",
    "bitsandbytes nf4", "gguf"), or None when the model was saved unquantized."""
    quant = config.get("quantization_config")
    if not isinstance(quant, Mapping):
        return None
    method = str(quant.get("quant_method", "quantized"))
    detail = quant.get("bnb_4bit_quant_type") if quant.get("load_in_4bit") else None
    if quant.get("load_in_8bit"):
        detail = "int8"
    kind = quant.get("quant_type")
    if isinstance(kind, Mapping):  # torchao: {"default": {"_type": "Int8WeightOnlyConfig", ...}}
        inner = kind.get("default", kind)
        kind = inner.get("_type") if isinstance(inner, Mapping) else None
    detail = detail or kind
    return f"{method} {detail}" if detail else method


def quantized_components(pipe: Any) -> dict[str, str]:
    """Component name → how it is quantized, for every component holding quantized weights (by diffusers'
    quantizers, by transformers', or in place by :mod:`diffusion_lora.models.quantize`)."""
    from ..adapters.quantized import quant_kind

    found = {}
    for name, component in getattr(pipe, "components", {}).items():
        if not isinstance(component, torch.nn.Module):
            continue
        kinds = {k.value for k in {quant_kind(m) for m in component.modules()} if k is not None}
        method = getattr(getattr(component, "hf_quantizer", None), "quantization_config", None)
        if method is not None and not kinds:  # e.g. a transformers bitsandbytes int8 text encoder
            kinds.add(str(getattr(method, "quant_method", "quantized")))
        if kinds:
            found[name] = ", ".join(sorted(kinds))
    return found


def _accelerator(device: torch.device) -> bool:
    return device.type not in ("cpu", "meta")


def _diffusers_config(mode: Quantize, compute_dtype: torch.dtype, device: torch.device) -> Any | None:
    """diffusers' quantization config for ``mode``, or None where diffusers cannot quantize at load (nf4 on
    the CPU: its bitsandbytes quantizer raises "No GPU found")."""
    if mode is Quantize.NF4:
        if not _accelerator(device):
            return None
        # llm_int8_skip_modules=[]: diffusers' bitsandbytes quantizer matches skip names against each layer's
        # short name, so "proj_out" would also keep every Flux single block's proj_out (1.8 B parameters of
        # Flux.1-dev) in 16 bits; no name keeps just the top-level one, so on a GPU it is quantized too.
        return diffusers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=[],
        )
    from ..compat.torchao import config_factory

    return diffusers.TorchAoConfig(config_factory(mode.value)(), modules_to_not_convert=list(_TORCHAO_KEEP))


def load_quantized_denoiser(
    source: str | Path, slot: str, class_name: str, mode: Quantize, *, torch_dtype: torch.dtype | None,
    device: torch.device, local_files_only: bool,
) -> torch.nn.Module | None:
    """The denoiser ``slot`` of the diffusers folder or hub id ``source`` loaded quantized by diffusers, or None
    when diffusers cannot quantize ``mode`` here (the caller then quantizes in place after loading).

    ConfigError when the saved denoiser is already quantized (its config.json has a quantization_config)."""
    cls = getattr(diffusers, class_name, None)
    if cls is None:
        raise ModelLoadError(f"{source}: the denoiser class {class_name} is not in this diffusers")
    try:
        saved = cls.load_config(str(source), subfolder=slot, local_files_only=local_files_only)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{source}: cannot read the {slot}'s config.json: {exc}") from exc
    already = describe_quantization(saved)
    if already:
        raise ConfigError(
            f"quantize: {source}'s {slot} is already quantized ({already}); drop quantize (--quantize), "
            "or load the unquantized model"
        )
    dtype = torch_dtype or torch.float32
    config = _diffusers_config(mode, dtype, device)
    if config is None:
        return None
    extra = {"device_map": str(device)} if mode is Quantize.NF4 else {}
    try:
        return cls.from_pretrained(str(source), subfolder=slot, quantization_config=config, torch_dtype=dtype,
                                   local_files_only=local_files_only, **extra)
    except (OSError, ValueError, RuntimeError, ImportError) as exc:
        raise ModelLoadError(f"{source}: could not load the {slot} quantized to {mode.value}: {exc}") from exc


def load_denoiser_file(
    file: DenoiserFile, cls: type, config: Mapping[str, Any], *, torch_dtype: torch.dtype | None
) -> torch.nn.Module:
    """The denoiser of class ``cls`` (configured by the base's ``config``) with its weights from ``file``,
    through diffusers' ``from_single_file`` (GGUF: ``GGUFQuantizationConfig``, layers stay quantized and
    compute in ``torch_dtype``, default float32). ModelLoadError naming the file when its tensors do not
    fit the base's denoiser."""
    if not hasattr(cls, "from_single_file"):
        raise ModelLoadError(f"denoiser {file.path}: {cls.__name__} cannot be loaded from a single file")
    dtype = torch_dtype or torch.float32
    extra = {}
    if file.gguf_types is not None:
        extra["quantization_config"] = diffusers.GGUFQuantizationConfig(compute_dtype=dtype)
    with tempfile.TemporaryDirectory(prefix="dl-denoiser-config-") as folder:
        public = {k: v for k, v in config.items() if not k.startswith("_") or k == "_class_name"}
        Path(folder, "config.json").write_text(json.dumps(public), encoding="utf-8")
        try:
            model = cls.from_single_file(str(file.path), config=folder, torch_dtype=dtype, local_files_only=True,
                                         **extra)
        except Exception as exc:  # diffusers' converters raise KeyError, ValueError, RuntimeError, IndexError
            what = file.quantization or "safetensors"
            raise ModelLoadError(
                f"denoiser {file.path}: could not load this {what} file as the base's {cls.__name__} "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); is it the denoiser of "
                "the same model as the base?"
            ) from exc
    if not model.dtype.is_floating_point:
        # diffusers reports a model's dtype from its first parameter; where that is a GGUF block tensor (uint8),
        # pipelines that cast their latents to ``transformer.dtype`` (Flux.3's modular denoise step, diffusers
        # 0.42) fail mid-generation, so refuse before anything runs
        raise ModelLoadError(
            f"denoiser {file.path}: diffusers reports this {file.quantization or 'file'}'s {cls.__name__} as "
            f"{model.dtype} (its first weight is quantized), and its pipeline casts latents to that dtype; "
            "use the unquantized denoiser or quantize=... instead of a GGUF file for this model"
        )
    return model


def require_float_weights(pipe: Any, source: str | os.PathLike[str], action: str) -> None:
    """ConfigError when a component of ``pipe`` (loaded from ``source``) holds quantized weights: ``action``
    (bake, extract) reads and writes full-precision weights, and a quantized base would put its rounding
    error into every weight it writes."""
    quantized = quantized_components(pipe)
    if quantized:
        parts = "; ".join(f"{name}: {how}" for name, how in quantized.items())
        raise ConfigError(
            f"{os.fspath(source)}: holds quantized weights ({parts}); {action} needs the full-precision model, "
            "so pass the unquantized base"
        )
