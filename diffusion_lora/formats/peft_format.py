"""The diffusers / PEFT key format: ``<component>.<module>.lora_A.weight`` and ``.lora_B.weight``.

Alpha is not stored as a tensor in this format; diffusers keeps each component's LoraConfig (``r``,
``lora_alpha``, ``rank_pattern``, ``alpha_pattern``, ``use_rslora``, ``use_dora``) as JSON in the
``lora_adapter_metadata`` header entry, flattened with the component as prefix (``unet.lora_alpha``).
Without it, diffusers and PEFT take alpha = rank (scale 1), and so do we.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping

import torch

from ..errors import FormatError
from .adapter_data import AdapterData, ModuleLora
from .json_text import parse_json

LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"
PEFT_MODEL_PREFIX = "base_model.model."
_ROLE_SUFFIXES = (
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_B.bias", "bias"),
    (".lora_magnitude_vector.weight", "magnitude"),
    (".lora_magnitude_vector", "magnitude"),
    # Older diffusers files (LoRACompatibleLinear / attention-processor era), same alpha rules.
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    (".down.weight", "down"),
    (".up.weight", "up"),
    (".alpha", "alpha"),
)
# Attention-processor LoRA keys name the processor, not the projection it adapts.
_PROCESSOR_PATH = re.compile(r"\.processor\.(to_[qkv]|to_out)_lora$")


def split_peft_key(key: str) -> tuple[str, str] | None:
    """(module path, role) of a diffusers/PEFT LoRA key, role in down/up/magnitude/alpha; else None."""
    for suffix, role in _ROLE_SUFFIXES:
        if key.endswith(suffix):
            module = key[: -len(suffix)]
            m = _PROCESSOR_PATH.search(module)
            if m:
                target = "to_out.0" if m.group(1) == "to_out" else m.group(1)
                return module[: m.start()] + "." + target, role
            if role in ("down", "up") and suffix in (".down.weight", ".up.weight"):
                return None  # bare .down/.up only mean LoRA inside a processor key
            return module, role
    return None


def component_configs(metadata: Mapping[str, str], components: Collection[str]) -> dict[str, dict]:
    """Each component's LoraConfig fields from ``lora_adapter_metadata``; {} when absent."""
    raw = metadata.get(LORA_ADAPTER_METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = parse_json(raw)
    except ValueError as exc:
        raise FormatError(f"metadata {LORA_ADAPTER_METADATA_KEY!r} is not valid JSON ({exc})") from None
    if not isinstance(flat, dict):
        raise FormatError(f"metadata {LORA_ADAPTER_METADATA_KEY!r} must be a JSON object")
    configs: dict[str, dict] = {}
    for key, value in flat.items():
        component, _, field = str(key).partition(".")
        if component in components and field:
            configs.setdefault(component, {})[field] = value
    return configs


_REGEX_SYNTAX = re.compile(r"[*+?{}()\[\]|$]")


def _pattern_path(pattern: str) -> str:
    """The module path a ``rank_pattern``/``alpha_pattern`` key names.

    PEFT treats these keys as regular expressions, but every writer (PEFT, diffusers, us) stores
    module paths, at most ``^``-anchored and ``re.escape``d. A key from a file is never run as a
    regular expression: one like ``(a+)+$`` would make matching take exponential time.
    """
    path = re.sub(r"\\(.)", r"\1", pattern.removeprefix("^"))
    if len(pattern) > 1000 or _REGEX_SYNTAX.search(path) or "\\" in path:
        raise FormatError(
            f"metadata pattern key {pattern[:80]!r} is not a module path; rank_pattern/alpha_pattern keys "
            "must name modules (e.g. 'down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q')"
        )
    return path


# A LoraConfig names at most every adapted module in a pattern (about 1,100 for SDXL's UNet); more
# entries than this are not a config, and would make matching every module against them slow.
MAX_PATTERN_ENTRIES = 20_000

PatternTable = dict[str, tuple[int, object]]  # module path a key names → (key's position, value)


def pattern_table(patterns: object, where: str) -> PatternTable:
    """``rank_pattern``/``alpha_pattern`` as a look-up table, built once per component.

    ``where`` names the setting in errors. Raises FormatError for more than MAX_PATTERN_ENTRIES keys
    or a key that is not a module path.
    """
    if not isinstance(patterns, dict):
        return {}
    if len(patterns) > MAX_PATTERN_ENTRIES:
        raise FormatError(
            f"{where} has {len(patterns):,} entries, more than the {MAX_PATTERN_ENTRIES:,} a model's modules "
            f"need; the adapter config is corrupt"
        )
    table: PatternTable = {}
    for position, (pattern, value) in enumerate(patterns.items()):
        table.setdefault(_pattern_path(str(pattern)), (position, value))
    return table


def _pattern_value(table: PatternTable, path: str, default: object) -> object:
    """PEFT's rule: the first pattern key that names the module (``path`` or a dotted suffix of it) wins."""
    parts = path.split(".")
    found = [table[s] for s in (".".join(parts[i:]) for i in range(len(parts))) if s in table]
    return min(found, key=lambda hit: hit[0])[1] if found else default


def _module_alpha(path: str, rank: int, config: Mapping[str, object], alphas: PatternTable) -> float:
    if not config:
        return float(rank)
    alpha = _pattern_value(alphas, path, config.get("lora_alpha", rank))
    try:
        value = float(alpha) if isinstance(alpha, (int, float)) and not isinstance(alpha, bool) else None
    except OverflowError:  # a JSON integer with hundreds of digits
        value = None
    if value is None or not 0 < value < float("inf"):
        raise FormatError(f"lora_alpha for module {path!r} must be a positive finite number, got {str(alpha)[:40]}")
    return value


def _flag(config: Mapping[str, object], field: str, where: str) -> bool:
    """A boolean setting: absent is False; anything but JSON true/false is an error (the string
    ``"false"`` is truthy in Python and would silently turn the setting on)."""
    value = config.get(field, False)
    if not isinstance(value, bool):
        raise FormatError(f"{where} is {str(value)[:40]!r}; it must be true or false (a JSON boolean)")
    return value


def _alpha_tensor(module: str, value: torch.Tensor) -> float:
    if value.numel() != 1:
        raise FormatError(f"alpha of module {module!r} must be a single number, got shape {list(value.shape)}")
    alpha = float(value.reshape(()).item())
    if not alpha > 0 or alpha == float("inf"):
        raise FormatError(f"alpha of module {module!r} is {alpha}; it must be a positive finite number")
    return alpha


def parse_peft(
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    components: Collection[str],
    default_component: str,
    config: Mapping[str, object] | None = None,
) -> AdapterData:
    """Read a diffusers/PEFT state dict into an AdapterData.

    Keys without a known component prefix (a bare PEFT save of one model, possibly with
    ``base_model.model.``) belong to ``default_component``; ``config`` is that model's
    ``adapter_config.json`` when the file came from a PEFT folder.
    """
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        split = split_peft_key(key.removeprefix(PEFT_MODEL_PREFIX))
        if split is None:
            raise FormatError(f"key {key!r} is not a diffusers/PEFT LoRA key (…lora_A.weight / …lora_B.weight)")
        module, role = split
        if module.partition(".")[0] not in components:
            module = f"{default_component}.{module}"
        parts.setdefault(module, {})[role] = tensor
    configs = component_configs(metadata, components)
    where = {c: f"{LORA_ADAPTER_METADATA_KEY} entry '{c}.{{}}'" for c in configs}
    if config and default_component not in configs:
        configs[default_component] = dict(config)
        where[default_component] = "adapter_config.json key '{}'"
    alphas = {
        c: pattern_table(cfg.get("alpha_pattern"), where[c].format("alpha_pattern"))
        for c, cfg in configs.items()
    }
    modules: dict[str, ModuleLora] = {}
    for module, roles in parts.items():
        if "down" not in roles or "up" not in roles:
            missing = "lora_A" if "down" not in roles else "lora_B"
            raise FormatError(f"module {module!r} has no {missing} weight; the file is incomplete")
        component, _, path = module.partition(".")
        rank = int(roles["down"].shape[0])
        if "alpha" in roles:  # an explicit network alpha beats the config
            alpha = _alpha_tensor(module, roles["alpha"])
        else:
            alpha = _module_alpha(path, rank, configs.get(component, {}), alphas.get(component, {}))
        magnitude = roles.get("magnitude")
        if magnitude is not None:  # PEFT stores a conv layer's magnitude as [1, out, 1, 1]
            magnitude = magnitude.reshape(-1)
        modules[module] = ModuleLora(
            down=roles["down"], up=roles["up"], alpha=alpha, magnitude=magnitude, bias=roles.get("bias")
        )
    use_rslora = any([_flag(cfg, "use_rslora", where[c].format("use_rslora")) for c, cfg in configs.items()])
    return AdapterData(modules=modules, use_rslora=use_rslora, metadata=dict(metadata), format="diffusers")


def lora_config_fields(modules: Mapping[str, ModuleLora], use_rslora: bool) -> dict[str, object]:
    """LoraConfig fields describing ``modules`` (paths inside one component) exactly.

    The most common rank and alpha become ``r``/``lora_alpha``; the others go into exact-path
    ``rank_pattern``/``alpha_pattern`` entries, so every module keeps its own scale.
    """
    ranks = [m.rank for m in modules.values()]
    alphas = [m.alpha for m in modules.values()]
    r = max(set(ranks), key=ranks.count)
    alpha = max(set(alphas), key=alphas.count)
    return {
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(modules),
        "rank_pattern": {"^" + re.escape(p): m.rank for p, m in modules.items() if m.rank != r},
        "alpha_pattern": {"^" + re.escape(p): m.alpha for p, m in modules.items() if m.alpha != alpha},
        "use_rslora": use_rslora,
        "use_dora": any(m.magnitude is not None for m in modules.values()),
        "lora_bias": any(m.bias is not None for m in modules.values()),
        "lora_dropout": 0.0,
        "bias": "none",
        "init_lora_weights": True,
    }


def write_peft(data: AdapterData) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a diffusers-format file for ``data``."""
    tensors: dict[str, torch.Tensor] = {}
    flat_config: dict[str, object] = {}
    for component, modules in data.components().items():
        for path, m in modules.items():
            base = f"{component}.{path}"
            tensors[f"{base}.lora_A.weight"] = m.down
            tensors[f"{base}.lora_B.weight"] = m.up
            if m.magnitude is not None:
                tensors[f"{base}.lora_magnitude_vector"] = m.magnitude
            if m.bias is not None:
                tensors[f"{base}.lora_B.bias"] = m.bias
        for field, value in lora_config_fields(modules, data.use_rslora).items():
            flat_config[f"{component}.{field}"] = value
    metadata = {"format": "pt", LORA_ADAPTER_METADATA_KEY: json.dumps(flat_config, indent=2, sort_keys=True)}
    return tensors, metadata
