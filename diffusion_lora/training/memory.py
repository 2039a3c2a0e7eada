"""``train CONFIG --estimate``: the memory a training run needs, by part, without loading any weight.

The config's model is built on the meta device (module shapes only): its own configs for a tiny model or
a local folder (or one in the Hugging Face cache), the family's published layout (:mod:`..families.published`)
for a hub id known from :data:`..families.memory.PUBLISHED_REPOS`. Then:

* base weights: every plain Linear of the denoiser that ``model.quantize`` would quantize at that format's
  bytes per weight (scales included; :func:`quantized_weight_bytes`), everything else at ``model.dtype``;
* LoRA weights, their gradients (float32, as the trainer keeps them) and the optimizer's state;
* activations of one step at the resolution and batch size: per block, a calibrated number of values per
  token per channel (:mod:`..families.memory`), with or without gradient checkpointing;
* text encoders (none while training when their outputs are cached and they are freed) and the VAE.

Two phases are reported: *setup* (every component loaded while captions are encoded, before any step)
and *step* (the peak of a training step). The run's peak is the larger. Numbers are bytes; GPU runtime
overhead (CUDA context, allocator slack) is not included.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..adapters.inject import target_paths
from ..errors import ConfigError
from ..families import Family
from ..families.memory import (
    BLOCK_COSTS,
    DEQUANTIZED_WEIGHTS_KEPT,
    PUBLISHED_VAE_PARAMS,
    SEQUENCE_TOKENS,
    TIME_EMBEDDING_LINEARS,
    BlockCost,
)
from ..models.quantize import Quantize, keeps_float, parse_quantize
from .config import MixedPrecision, ModelDtype, OptimizerName, TextCache, TextEncoders, TrainConfig
from .memory_models import ModelLayout, resolve_model
from .recipe import AUTO_TARGETS, auto_targets

__all__ = ["EstimateSettings", "MemoryEstimate", "MemoryPart", "estimate_memory", "estimate_modules",
           "optimizer_state_bytes", "quantized_weight_bytes"]

GB = 1e9
_DTYPE_BYTES = {ModelDtype.FLOAT32: 4, ModelDtype.FLOAT16: 2, ModelDtype.BFLOAT16: 2}
_NF4_BLOCK, _NF4_SCALE_BLOCK, _ADAM8_BLOCK, _ADAM8_MIN = 64, 256, 256, 4096


@dataclass(frozen=True)
class MemoryPart:
    """One line of the estimate: ``bytes`` for ``name`` (``note`` says what it counts)."""

    name: str
    bytes: float
    note: str = ""


@dataclass(frozen=True)
class MemoryEstimate:
    """The estimate of one run: the parts resident while captions are encoded (``setup``) and at the peak
    of a training step (``step``), the activations with the other checkpointing setting, what was assumed."""

    model: str
    setup: tuple[MemoryPart, ...]
    step: tuple[MemoryPart, ...]
    activations_other: float
    assumptions: tuple[str, ...]
    checkpointing: bool

    @property
    def setup_total(self) -> float:
        return sum(p.bytes for p in self.setup)

    @property
    def step_total(self) -> float:
        return sum(p.bytes for p in self.step)

    @property
    def peak(self) -> float:
        """The run's peak: the larger phase."""
        return max(self.setup_total, self.step_total)

    def part(self, name: str) -> float:
        """Bytes of the step part ``name`` (0 when there is none)."""
        return sum(p.bytes for p in self.step if p.name == name)

    def format(self) -> str:
        """The estimate as the CLI prints it (GB = 10^9 bytes)."""
        lines = [f"memory estimate for {self.model} (GB = 1e9 bytes; GPU runtime overhead not included)",
                 "training step:"]
        lines += [f"  {p.name:<28} {p.bytes / GB:8.2f}  {p.note}" for p in self.step]
        lines.append(f"  {'total':<28} {self.step_total / GB:8.2f}")
        other = "off" if self.checkpointing else "on"
        delta = self.step_total - self.part("activations") + self.activations_other
        lines.append(f"  (with gradient checkpointing {other}: activations {self.activations_other / GB:.2f}, "
                     f"total {delta / GB:.2f})")
        lines.append("setup (all components loaded while captions are encoded):")
        lines += [f"  {p.name:<28} {p.bytes / GB:8.2f}  {p.note}" for p in self.setup]
        lines.append(f"  {'total':<28} {self.setup_total / GB:8.2f}")
        lines.append(f"peak: {self.peak / GB:.2f} GB")
        lines.append("assumed:")
        lines += [f"  - {a}" for a in self.assumptions]
        return "\n".join(lines)


@dataclass(frozen=True)
class EstimateSettings:
    """What of a config the estimate depends on (see :func:`settings_of`)."""

    resolution: int
    batch_size: int = 1
    weight_bytes: int = 2  # model.dtype
    activation_bytes: int = 2  # the compute dtype of activations
    quantize: Quantize | None = None
    rank: int = 16
    targets: str | Sequence[str] = "attn"
    text_encoder: bool = False
    use_dora: bool = False
    optimizer: OptimizerName = OptimizerName.ADAMW
    checkpointing: bool = False
    text_encoders_freed: bool = True
    text_tokens: int | None = None  # context tokens joined to the image's; None: the family's (SEQUENCE_TOKENS)
    notes: tuple[str, ...] = field(default=())


# ---------------------------------------------------------------- bytes per format


def quantized_weight_bytes(mode: Quantize | None, out_features: int, in_features: int, dtype_bytes: int) -> float:
    """Bytes of one ``[out, in]`` Linear weight stored as ``mode`` (None: ``dtype_bytes`` per value):
    nf4 = bitsandbytes' packed 4-bit values + uint8 block scales per 64 + float32 second-level scales per 256
    blocks (double quantization, as :func:`~diffusion_lora.compat.bitsandbytes.quantize_nf4` makes them);
    int8 = torchao's int8 values + a float32 scale and an int8 zero point per output row; fp8 = float8
    values + a float32 scale per output row."""
    n = out_features * in_features
    if mode is None:
        return float(n * dtype_bytes)
    if mode is Quantize.NF4:
        blocks = math.ceil(n / _NF4_BLOCK)
        return math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / _NF4_SCALE_BLOCK)
    if mode is Quantize.INT8:
        return float(n + 5 * out_features)
    return float(n + 4 * out_features)


def optimizer_state_bytes(name: OptimizerName, sizes: Sequence[int]) -> float:
    """Bytes of ``name``'s state for float32 parameters of ``sizes`` elements: AdamW two float32 moments
    (8 B each value); bitsandbytes' AdamW8bit two uint8 moments + a float32 absmax per 256 values for
    tensors of at least 4096 values (smaller ones keep 32-bit state); Prodigy two moments, ``s`` and a
    copy of the initial weights (16 B)."""
    if name is OptimizerName.ADAMW:
        return 8.0 * sum(sizes)
    if name is OptimizerName.PRODIGY:
        return 16.0 * sum(sizes)
    total = 0.0
    for n in sizes:
        total += 2 * (n + 4 * math.ceil(n / _ADAM8_BLOCK)) if n >= _ADAM8_MIN else 8 * n
    return total


# ---------------------------------------------------------------- the config's model on meta


def settings_of(cfg: TrainConfig, family: Family, resolution: int | None = None) -> EstimateSettings:
    """The estimate's inputs from ``cfg`` (``data.resolution`` unset: ``resolution``, else the family's)."""
    res = cfg.data.resolution or resolution or family.default_resolution
    weight = _DTYPE_BYTES[cfg.model.dtype]
    act = 2 if cfg.train.mixed_precision is not MixedPrecision.NO else weight
    quant = parse_quantize(getattr(cfg.model, "quantize", None), "model.quantize")
    freed = (cfg.text_cache is not TextCache.OFF and not cfg.lora.text_encoder
             and cfg.cache.text_encoders is not TextEncoders.KEEP)
    return EstimateSettings(
        # unset batch size and targets: what training.recipe chooses for a real-size model of the family
        resolution=res, batch_size=cfg.train.batch_size or 1, weight_bytes=weight, activation_bytes=act,
        quantize=quant, rank=cfg.lora.rank,
        targets=auto_targets(family.denoiser) if cfg.lora.targets == AUTO_TARGETS else cfg.lora.targets,
        text_encoder=cfg.lora.text_encoder,
        use_dora=cfg.lora.use_dora, optimizer=cfg.optimizer.name,
        checkpointing=cfg.train.gradient_checkpointing, text_encoders_freed=freed,
    )


# ---------------------------------------------------------------- counting


def _param_bytes(module: torch.nn.Module, dtype_bytes: int) -> float:
    return float(sum(p.numel() for p in module.parameters()) * dtype_bytes)


def _denoiser_weights(denoiser: torch.nn.Module, s: EstimateSettings) -> tuple[float, float, int]:
    """(quantized Linear weight bytes, bytes of everything else, largest quantized weight's value count)."""
    quantized, rest, largest = 0.0, 0.0, 0
    counted: set[int] = set()
    for parent_path, parent in denoiser.named_modules():
        for child_name, child in parent.named_children():
            path = f"{parent_path}.{child_name}" if parent_path else child_name
            if s.quantize is None or type(child) is not torch.nn.Linear or keeps_float(path):
                continue
            counted.add(id(child.weight))
            quantized += quantized_weight_bytes(s.quantize, child.out_features, child.in_features, s.weight_bytes)
            largest = max(largest, child.weight.numel())
    for p in denoiser.parameters():
        if id(p) not in counted:
            rest += p.numel() * s.weight_bytes
    return quantized, rest, largest


def _lora_sizes(model: ModelLayout, s: EstimateSettings) -> list[int]:
    """Element counts of every LoRA tensor (down, up, DoRA magnitude) the run adds."""
    family = model.family
    parts: list[tuple[str, torch.nn.Module, str | Sequence[str]]] = [(family.denoiser, model.denoiser, s.targets)]
    if s.text_encoder:
        parts += [(n, model.text_encoders[n], family.text_encoder_targets)
                  for n in family.lora_text_encoders if n in model.text_encoders]
    sizes: list[int] = []
    for component, module, targets in parts:
        mods = dict(module.named_modules())
        for path in target_paths(module, family, targets, component):
            fan_in, fan_out = _fans(mods[path])
            sizes += [s.rank * fan_in, fan_out * s.rank]
            if s.use_dora:
                sizes.append(fan_out)
    return sizes


def _fans(layer: torch.nn.Module) -> tuple[int, int]:
    """(inputs, outputs) of a Linear, or of a Conv2d's kernel (in_channels × kernel area, out_channels)."""
    if isinstance(layer, torch.nn.Conv2d):
        kh, kw = layer.kernel_size
        return layer.in_channels // layer.groups * kh * kw, layer.out_channels
    return layer.in_features, layer.out_features


def _block_cost(block: torch.nn.Module) -> BlockCost:
    return BLOCK_COSTS[type(block).__name__]


def _blocks(denoiser: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The denoiser's blocks (modules of a class in :data:`BLOCK_COSTS`), outermost only, in order."""
    found: list[tuple[str, torch.nn.Module]] = []
    inside: str | None = None
    for path, module in denoiser.named_modules():
        if inside is not None and path.startswith(inside + "."):
            continue
        if type(module).__name__ in BLOCK_COSTS:
            found.append((path, module))
            inside = path
    return found


def _width(block: torch.nn.Module, cost: BlockCost) -> int:
    obj: Any = block
    for attr in cost.width.split("."):
        obj = getattr(obj, attr)
    return int(obj)


_LEVEL = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.|^(mid_block)\.")


def _unet_level(path: str, levels: int) -> int:
    """The resolution level (0 = full latent size) of a UNet module at ``path``."""
    m = _LEVEL.match(path)
    if m is None:
        return 0
    if m.group(3):
        return levels - 1
    index = int(m.group(2))
    return index if m.group(1) == "down_blocks" else levels - 1 - index


def _lora_targets(model: ModelLayout, s: EstimateSettings) -> set[str]:
    family = model.family
    return set(target_paths(model.denoiser, family, s.targets, family.denoiser))


def _lora_input_copies(block: torch.nn.Module, path: str, targets: set[str], tokens: int, context: int,
                       s: EstimateSettings) -> float:
    """Bytes of the float32 input copies the LoRA layers of ``block`` keep for backward: PEFT casts a layer's
    input to the LoRA weights' dtype (float32, as the trainer keeps them), so a 16-bit model keeps one
    float32 copy of each targeted layer's input. A cross-attention key/value layer reads the ``context``
    tokens; every other layer ``tokens`` (a double-stream block's average per stream; a Conv2d's input has
    ``in_channels`` values at each of ``tokens`` positions)."""
    if s.activation_bytes >= 4:
        return 0.0
    total = 0.0
    for sub_path, layer in block.named_modules():
        if f"{path}.{sub_path}" not in targets:
            continue
        parent_path, _, leaf = sub_path.rpartition(".")
        parent = block.get_submodule(parent_path) if parent_path else block
        cross = bool(getattr(parent, "is_cross_attention", False)) and leaf in ("to_k", "to_v")
        width = layer.in_channels if isinstance(layer, torch.nn.Conv2d) else layer.in_features
        total += 4.0 * width * (context if cross else tokens) * s.batch_size
    return total


def _dequantized_kept(block: torch.nn.Module, path: str, s: EstimateSettings) -> float:
    """Bytes of dequantized weights autograd keeps for ``block`` when the base is a torchao tensor (see
    :data:`DEQUANTIZED_WEIGHTS_KEPT`): every quantized Linear except those fed by the timestep embedding."""
    if s.quantize is None or s.quantize.value not in DEQUANTIZED_WEIGHTS_KEPT:
        return 0.0
    total = 0
    for sub_path, layer in block.named_modules():
        full = f"{path}.{sub_path}"
        if type(layer) is torch.nn.Linear and not keeps_float(full) and not full.endswith(TIME_EMBEDDING_LINEARS):
            total += layer.weight.numel()
    return float(total * s.activation_bytes * s.batch_size)


def activation_bytes(model: ModelLayout, s: EstimateSettings, checkpointing: bool) -> tuple[float, str]:
    """Bytes of activations at a step's peak, and a line saying what was assumed about tokens."""
    seq = SEQUENCE_TOKENS[model.variant.conditioning or model.family.conditioning]
    den = model.denoiser
    levels = len(getattr(den, "down_blocks", ())) or 1
    latent = s.resolution // 8  # every family's VAE scales by 8; transformers then take 2x2 patches
    image = (latent // 2) ** 2 * seq.image_factor
    text = seq.text if s.text_tokens is None or not seq.text else s.text_tokens
    kept: list[float] = []
    inputs: list[float] = []
    extras: list[float] = []
    dequantized: list[float] = []
    unmeasured: set[str] = set()
    targets = _lora_targets(model, s)
    for path, block in _blocks(den):
        cost = _block_cost(block)
        if not cost.measured:
            unmeasured.add(type(block).__name__)
        tokens = (latent // 2 ** _unet_level(path, levels)) ** 2 if cost.tokens == "image" else image + text
        width = _width(block, cost)
        unit = tokens * width * s.activation_bytes * s.batch_size
        copies = _lora_input_copies(block, path, targets, tokens // cost.streams, seq.context, s)
        kept.append(cost.kept * unit + copies)
        inputs.append(cost.inputs * unit)
        extras.append(cost.extra)
        dequantized.append(_dequantized_kept(block, path, s))
    if not kept:
        raise ConfigError(f"model.name: {type(den).__name__} has no block this estimate knows; cannot size "
                          "its activations")
    biggest = max(range(len(kept)), key=kept.__getitem__)
    extra = extras[biggest] * kept[biggest]
    if checkpointing:
        total = sum(inputs) + kept[biggest] + max(dequantized) + extra
    else:
        total = sum(kept) + sum(dequantized) + extra
    if text:
        note = f"{image} image + {text} text tokens per image"
    else:
        note = f"{latent}x{latent} latent pixels at the first level"
    if sum(dequantized):
        note += f"; {s.quantize.value} keeps dequantized weights for backward"
    if unmeasured:
        note += f"; not measured, copied from similar blocks: {', '.join(sorted(unmeasured))}"
    return total, note


def estimate_modules(model: ModelLayout, s: EstimateSettings) -> MemoryEstimate:
    """The estimate for already-built (meta) modules — what :func:`estimate_memory` and the calibration
    probes (``bench/memory_probe.py``) share."""
    fmt = s.quantize.value if s.quantize else f"{8 * s.weight_bytes}-bit float"
    quantized, rest, largest = _denoiser_weights(model.denoiser, s)
    sizes = _lora_sizes(model, s)
    lora = 4.0 * sum(sizes)
    acts, token_note = activation_bytes(model, s, s.checkpointing)
    other, _ = activation_bytes(model, s, not s.checkpointing)
    te_bytes = sum(_param_bytes(m, s.weight_bytes) for m in model.text_encoders.values())
    vae_params = model.vae_params if model.vae_params is not None else PUBLISHED_VAE_PARAMS
    vae = float(vae_params * s.weight_bytes)
    te_names = ", ".join(model.text_encoders) or "none"
    weights = [MemoryPart("denoiser weights", quantized + rest,
                          f"{fmt} Linears, the rest {8 * s.weight_bytes}-bit" if s.quantize else fmt)]
    step = list(weights)
    if s.text_encoders_freed:
        step.append(MemoryPart("text encoders", 0.0, f"{te_names}: outputs cached, encoders freed"))
    else:
        step.append(MemoryPart("text encoders", te_bytes, f"{te_names}: kept loaded"))
    step += [
        MemoryPart("VAE", vae, "kept for latents and samples"),
        MemoryPart("LoRA weights", lora, f"{sum(sizes) / 1e6:.2f} M float32 values, rank {s.rank}"),
        MemoryPart("LoRA gradients", lora, "float32"),
        MemoryPart("optimizer state", optimizer_state_bytes(s.optimizer, sizes), s.optimizer.value),
        MemoryPart("activations", acts, f"batch {s.batch_size} at {s.resolution} px, gradient checkpointing "
                   f"{'on' if s.checkpointing else 'off'}"),
    ]
    if s.quantize is not None and s.quantize.value not in DEQUANTIZED_WEIGHTS_KEPT:  # torchao: in activations
        step.append(MemoryPart("dequantized weight", float(largest * s.activation_bytes),
                               "the largest quantized Linear, dequantized while it computes"))
    setup = [*weights, MemoryPart("text encoders", te_bytes, f"{te_names}: loaded to encode captions"),
             MemoryPart("VAE", vae, ""), MemoryPart("LoRA weights", lora, "")]
    assumptions = (
        f"model: {model.source} ({model.variant.title}, {type(model.denoiser).__name__})",
        f"resolution {s.resolution} px (buckets hold at most that many pixels), {token_note}",
        f"batch {s.batch_size}, weights {8 * s.weight_bytes}-bit, activations {8 * s.activation_bytes}-bit, "
        f"quantize {s.quantize.value if s.quantize else 'none'}",
        f"LoRA rank {s.rank} on {s.targets if isinstance(s.targets, str) else len(s.targets)} targets"
        f"{' + text encoders' if s.text_encoder else ''}{', DoRA' if s.use_dora else ''}, optimizer "
        f"{s.optimizer.value}",
        "VAE: " + (f"{vae_params / 1e6:.0f} M values" if model.vae_params is not None else
                   f"not in the published layout; {vae_params / 1e6:.0f} M values assumed"),
        "activations scale linearly with tokens (memory-efficient attention; no tokens x tokens matrix kept)",
        *s.notes,
    )
    return MemoryEstimate(model.source, tuple(setup), tuple(step), other, assumptions, s.checkpointing)


def estimate_memory(cfg: TrainConfig) -> MemoryEstimate:
    """The expected peak memory of training ``cfg``, by part, computed on the meta device (no weights are
    loaded or downloaded). Raises ConfigError when the model cannot be sized without downloading it."""
    model = resolve_model(cfg.model.name)
    settings = settings_of(cfg, model.family, model.native)
    return estimate_modules(model, settings)
