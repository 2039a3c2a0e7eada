"""The kohya / A1111 LoRA key format: ``<prefix>_<flat module path>.lora_down.weight`` and friends.

A kohya name is the module path with every ``.`` turned into ``_`` behind a component prefix
(``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``). That cannot be reversed
(``to_q`` vs ``to.q``), so names are never parsed: :func:`kohya_index` flattens every real module
path of the model once and reading is a dictionary look-up. Each module has up to five tensors:

* ``lora_down.weight`` [rank, in] (conv [rank, in, kh, kw]) and ``lora_up.weight`` [out, rank]
  (conv [out, rank, 1, 1]) — our ``down`` and ``up``;
* ``alpha``: a 0-d tensor; scale = alpha / rank per module; absent means alpha = rank (scale 1);
* ``lora_mid.weight`` [rank, rank, kh, kw]: LyCORIS' Tucker 3×3 LoCon, folded into ``down`` on read;
* ``dora_scale``: LyCORIS' DoRA magnitude, see :func:`dora_scale_to_magnitude`.

Files in the wild spell CLIP text encoders ``lora_te1_text_model_encoder_…`` (transformers 4 module
names) and SDXL UNets in the original SGM naming (``lora_unet_input_blocks_4_1_…``, see
:mod:`.sgm_blocks`); both are accepted as aliases, and written the way A1111 and ComfyUI expect.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from ..errors import FormatError, KeyMappingError
from .adapter_data import AdapterData, ModuleLora, bias_from_delta, check_delta_size
from .sgm_blocks import UNetLayout, sgm_path

NETWORK_MODULE = "networks.lora"
_ROLES = {
    "lora_down.weight": "down",
    "lora_up.weight": "up",
    "lora_mid.weight": "mid",
    "alpha": "alpha",
    "dora_scale": "dora_scale",
    "diff_b": "diff_b",  # ComfyUI's bias delta beside a LoRA (its trainer writes one per bias)
}
_KOHYA_KEY = re.compile(
    r"lora_\w+\.(?:lora_down\.weight|lora_up\.weight|lora_mid\.weight|alpha|dora_scale|diff_b|diff)"
)
_CLIP_Q = re.compile(r"(?:text_model\.)?encoder\.layers\.\d+\.self_attn\.q_proj")
_CLIP_WRAPPER = "text_model."

Target = tuple[str, str]  # (pipeline component, module path inside it)


def is_kohya(keys: Iterable[str]) -> bool:
    """True when every key is a kohya LoRA key (``lora_<…>.lora_down.weight`` / ``.lora_up.weight`` /
    ``.alpha`` / ``.lora_mid.weight`` / ``.dora_scale``, or ComfyUI's ``.diff_b`` / ``.diff``) and at
    least one is a ``lora_down`` weight.

    All keys are looked at: a file mixing in keys of another format is not a kohya LoRA file.
    """
    keys = list(keys)
    return any(k.endswith(".lora_down.weight") for k in keys) and all(_KOHYA_KEY.fullmatch(k) for k in keys)


def flatten(path: str) -> str:
    """kohya's flattening of a module path: ``a.b_c.0`` → ``a_b_c_0`` (not reversible)."""
    return path.replace(".", "_")


@dataclass(frozen=True)
class KohyaIndex:
    """Every kohya module name a model answers to, built from its real module list by :func:`kohya_index`.

    ``modules``: kohya name (prefix included, no ``.lora_down.weight``) → (component, module path),
    aliases included; ``names``: (component, path) → the name :func:`write_kohya` writes;
    ``sgm_names``: (component, path) → the SGM name of the ``sgm_component`` UNet's modules that have one.
    """

    modules: Mapping[str, Target]
    names: Mapping[Target, str]
    sgm_names: Mapping[Target, str]
    sgm_component: str | None = None

    def resolve(self, name: str) -> Target | None:
        """(component, module path) of kohya name ``name``, or None when the model has no such module."""
        return self.modules.get(name)

    def name_of(self, component: str, path: str, *, sgm: bool = False) -> str:
        """The kohya name to write for a module; SGM naming for the UNet when ``sgm``.

        Raises KeyMappingError for a module the model does not have, or that has no SGM name.
        """
        target = (component, path)
        if target not in self.names:
            raise KeyMappingError(
                f"module {component}.{path} is not a Linear/Conv2d layer of the model the kohya index was "
                f"built from; rebuild the index from the model the adapter belongs to"
            )
        if sgm and self.sgm_component is None:
            raise KeyMappingError("SGM naming needs a kohya index built with a unet_layout")
        if not sgm or component != self.sgm_component:
            return self.names[target]
        if target not in self.sgm_names:
            raise KeyMappingError(
                f"module {component}.{path} has no name in the original SGM UNet; write this adapter "
                f"with sgm=False (diffusers naming)"
            )
        return self.sgm_names[target]


def _is_clip(paths: Sequence[str]) -> bool:
    return any(_CLIP_Q.fullmatch(p) for p in paths)


def _spellings(path: str, clip: bool, wrapped: bool) -> tuple[str, ...]:
    """Module-path spellings a file may use for ``path``, the one to write first.

    CLIP files say ``text_model.encoder…`` (transformers 4); transformers 5's CLIPTextModel has no
    ``text_model.`` level (``wrapped`` is False) while CLIPTextModelWithProjection keeps it.
    """
    if not clip:
        return (path,)
    if not wrapped:
        return (_CLIP_WRAPPER + path, path)
    if path.startswith(_CLIP_WRAPPER):
        return (path, path[len(_CLIP_WRAPPER) :])
    return (path,)  # text_projection sits outside text_model


def _add(modules: dict[str, Target], name: str, target: Target) -> None:
    other = modules.setdefault(name, target)
    if other != target:
        raise KeyMappingError(
            f"kohya name {name!r} fits two modules, {'.'.join(other)} and {'.'.join(target)}; "
            f"kohya files cannot tell them apart, so this model cannot use the kohya format"
        )


def kohya_index(
    prefixes: Mapping[str, str],
    module_paths: Mapping[str, Sequence[str]],
    unet_layout: UNetLayout | None = None,
    *,
    clip_components: Collection[str] | None = None,
    unet_component: str = "unet",
) -> KohyaIndex:
    """The kohya names of every module in ``module_paths`` (component → paths of its Linear/Conv2d layers).

    ``prefixes``: component → kohya prefix (a family's ``kohya_prefixes``). CLIP text encoders —
    ``clip_components``, by default every component with a ``…encoder.layers.N.self_attn.q_proj`` —
    answer with and without ``text_model_``; with ``unet_layout`` the ``unet_component`` also answers
    to its SGM names. List the plain model's layers: once PEFT has wrapped them, its ``base_layer`` and
    ``lora_A`` are Linear layers too. Raises KeyMappingError when a component has no prefix or two
    modules flatten to the same name.
    """
    clip = (
        set(clip_components)
        if clip_components is not None
        else {c for c, paths in module_paths.items() if _is_clip(paths)}
    )
    modules: dict[str, Target] = {}
    names: dict[Target, str] = {}
    sgm_names: dict[Target, str] = {}
    for component, paths in module_paths.items():
        if component not in prefixes:
            raise KeyMappingError(f"component {component!r} has no kohya prefix (known: {', '.join(sorted(prefixes))})")
        prefix = prefixes[component]
        wrapped = any(p.startswith(_CLIP_WRAPPER) for p in paths)
        sgm = unet_layout if component == unet_component else None
        for path in paths:
            target = (component, path)
            spellings = _spellings(path, component in clip, wrapped)
            names[target] = f"{prefix}_{flatten(spellings[0])}"
            for spelling in spellings:
                _add(modules, f"{prefix}_{flatten(spelling)}", target)
            sgm_spelling = sgm_path(path, sgm) if sgm is not None else None
            if sgm_spelling is not None:
                sgm_names[target] = f"{prefix}_{flatten(sgm_spelling)}"
                _add(modules, sgm_names[target], target)
    return KohyaIndex(
        modules=modules,
        names=names,
        sgm_names=sgm_names,
        sgm_component=unet_component if unet_layout is not None and unet_component in module_paths else None,
    )


def _group(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, tuple[str, torch.Tensor]]]:
    """kohya name → role → (file key, tensor)."""
    groups: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, tensor in tensors.items():
        name, _, suffix = key.partition(".")
        role = _ROLES.get(suffix)
        if role is None:
            raise FormatError(
                f"key {key!r} is not a kohya LoRA key (<name>.lora_down.weight / .lora_up.weight / .alpha "
                f"/ .lora_mid.weight / .dora_scale / .diff_b); LoHa/LoKr and other LyCORIS types are not LoRA"
            )
        groups.setdefault(name, {})[role] = (key, tensor)
    return groups


def unresolved_error(keys: Sequence[str], source: str = "") -> KeyMappingError:
    """The error for file keys that map to no module: their count and the first five."""
    where = f"{source}: " if source else ""
    shown = ", ".join(repr(k) for k in list(keys)[:5])
    return KeyMappingError(
        f"{where}{len(keys)} kohya keys match no module of the model (e.g. {shown}); the file is for "
        f"another model family or architecture"
    )


def parse_kohya(
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    index: KohyaIndex,
    *,
    strict: bool = False,
    source: str = "",
) -> tuple[AdapterData, list[str]]:
    """Read a kohya state dict into an AdapterData, plus the sorted file keys that map to no module.

    Unresolved keys are never dropped silently: they are returned, or with ``strict`` raised as a
    KeyMappingError naming five of them. Raises FormatError for a key of another format, a module
    without both weights, a bad alpha or dora_scale, or two names for the same module.
    """
    modules: dict[str, ModuleLora] = {}
    seen: dict[str, str] = {}
    unresolved: list[str] = []
    for name, parts in _group(tensors).items():
        target = index.resolve(name)
        if target is None:
            unresolved += [key for key, _ in parts.values()]
            continue
        key = ".".join(target)
        if key in seen:
            raise FormatError(f"kohya names {seen[key]!r} and {name!r} both adapt {key}; the file is ambiguous")
        seen[key] = name
        modules[key] = _module(name, {role: t for role, (_, t) in parts.items()})
    unresolved.sort()
    if strict and unresolved:
        raise unresolved_error(unresolved, source)
    return AdapterData(modules=modules, metadata=dict(metadata), format="kohya"), unresolved


def _module(name: str, parts: Mapping[str, torch.Tensor]) -> ModuleLora:
    if "down" not in parts or "up" not in parts:
        missing = "lora_down" if "down" not in parts else "lora_up"
        raise FormatError(f"{name} has no {missing}.weight; the file is incomplete")
    down, up = parts["down"], parts["up"]
    if "mid" in parts:
        down = fold_tucker(down, parts["mid"], name)
    rank = int(down.shape[0])
    if up.dim() < 2 or up.shape[1] != rank or up[0].numel() != rank:
        raise FormatError(f"{name}: lora_up {list(up.shape)} does not fit lora_down {list(down.shape)} (rank {rank})")
    magnitude = None
    if "dora_scale" in parts:
        magnitude = dora_scale_to_magnitude(parts["dora_scale"], int(up.shape[0]), int(down.shape[1]), name)
    alpha = module_alpha(name, parts.get("alpha"), rank)
    bias = None
    if "diff_b" in parts:
        bias = bias_from_delta(name, parts["diff_b"], int(up.shape[0]), alpha / rank)
    return ModuleLora(down=down, up=up, alpha=alpha, magnitude=magnitude, bias=bias)


def module_alpha(name: str, alpha: torch.Tensor | None, rank: int) -> float:
    """The alpha of a module from its ``.alpha`` tensor — kohya's rule, shared by every reader: absent
    or 0 means alpha = rank (scale 1); otherwise one non-negative finite number."""
    if alpha is None:
        return float(rank)
    if alpha.numel() != 1:
        raise FormatError(f"{name}.alpha has shape {list(alpha.shape)}; it must be a single number")
    value = float(alpha.float().reshape(()))
    if not (math.isfinite(value) and value >= 0):
        raise FormatError(f"{name}.alpha is {value}; alpha must be a non-negative finite number")
    return value if value != 0 else float(rank)


def fold_tucker(down: torch.Tensor, mid: torch.Tensor, name: str = "") -> torch.Tensor:
    """One conv ``down`` [rank, in, kh, kw] equal to LyCORIS' Tucker pair: 1×1 ``down`` [rank, in, 1, 1]
    then ``mid`` [rank, rank, kh, kw].

    A 1×1 bias-free conv followed by a kh×kw conv is the kh×kw conv with the product weight, so the
    fold is exact up to float rounding (done in float32) and keeps the rank.
    """
    rank = int(down.shape[0])
    if down.dim() != 4 or tuple(down.shape[2:]) != (1, 1) or mid.dim() != 4 or tuple(mid.shape[:2]) != (rank, rank):
        raise FormatError(
            f"{name}: Tucker LoCon needs lora_down [rank, in, 1, 1] and lora_mid [rank, rank, kh, kw], "
            f"got {list(down.shape)} and {list(mid.shape)}"
        )
    check_delta_size(name, [mid.shape[0], down.shape[1], *mid.shape[2:]], "folded Tucker lora_down")
    folded = torch.einsum("mrkl,ri->mikl", mid.float(), down.float().flatten(1))
    return folded.to(down.dtype)


def dora_scale_to_magnitude(
    dora_scale: torch.Tensor, out_features: int, in_features: int, name: str = ""
) -> torch.Tensor:
    """PEFT's DoRA ``magnitude`` [out] from a LyCORIS ``dora_scale``.

    LyCORIS (``wd_on_output=True``, its default since 3.0) stores [out, 1] (conv [out, 1, 1, 1]) and
    computes W' = dora_scale · V / ‖V‖ with V = W + scale · up @ down and the norm over each output row
    (plus float eps) — PEFT's DoRA with magnitude = dora_scale, so the values carry over unchanged
    (the eps makes a relative difference of ~1e-7). The old convention (``wd_on_output=False``,
    [1, in], norm per input column) has no PEFT equivalent and is refused with a FormatError.
    """
    shape = list(dora_scale.shape)
    if dora_scale.dim() >= 1 and shape[0] == out_features and dora_scale.numel() == out_features:
        return dora_scale.reshape(out_features)
    if dora_scale.dim() >= 2 and shape[0] == 1 and shape[1] == in_features and dora_scale.numel() == in_features:
        raise FormatError(
            f"{name}.dora_scale {shape} decomposes the weight per input column (LyCORIS wd_on_output=False); "
            f"PEFT's DoRA cannot represent that — re-export it with wd_on_output=True or merge it into the model"
        )
    raise FormatError(
        f"{name}.dora_scale has shape {shape}; a layer with {out_features} outputs needs [{out_features}, 1]"
    )


def magnitude_to_dora_scale(magnitude: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """LyCORIS ``dora_scale`` from a PEFT magnitude: [out, 1] for linear, [out, 1, 1, 1] for conv."""
    out = magnitude.numel()
    return magnitude.reshape(out, *([1] * (down.dim() - 1))).contiguous()


def write_kohya(
    data: AdapterData, index: KohyaIndex, *, sgm: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and ``ss_*`` header metadata of a kohya file for ``data``.

    Names come from ``index`` (CLIP with ``text_model_``; the UNet in SGM naming when ``sgm``).
    ``alpha`` is a 0-d tensor of the weights' dtype, as kohya writes it; rsLoRA's alpha is converted
    to the alpha that gives the same scale (alpha · √rank). Other metadata is the caller's.
    """
    tensors: dict[str, torch.Tensor] = {}
    for key, m in data.modules.items():
        component, _, path = key.partition(".")
        name = index.name_of(component, path, sgm=sgm)
        tensors[f"{name}.lora_down.weight"] = m.down
        tensors[f"{name}.lora_up.weight"] = m.up
        tensors[f"{name}.alpha"] = torch.tensor(kohya_alpha(m, data.use_rslora), dtype=m.down.dtype)
        if m.magnitude is not None:
            tensors[f"{name}.dora_scale"] = magnitude_to_dora_scale(m.magnitude, m.down)
    return tensors, kohya_metadata(data)


def kohya_alpha(m: ModuleLora, use_rslora: bool) -> float:
    """The alpha that gives ``m`` its scale under kohya's alpha/rank rule (rsLoRA: alpha·√rank)."""
    return m.alpha * math.sqrt(m.rank) if use_rslora else m.alpha


def kohya_metadata(data: AdapterData) -> dict[str, str]:
    """kohya's ``ss_network_*`` entries: module, dim and alpha as strings (``"4"``, ``"2.0"``), or
    ``"Dynamic"`` when they differ between modules, as kohya's resize_lora writes them."""
    ranks = {m.rank for m in data.modules.values()}
    alphas = {kohya_alpha(m, data.use_rslora) for m in data.modules.values()}
    return {
        "ss_network_module": NETWORK_MODULE,
        "ss_network_dim": str(next(iter(ranks))) if len(ranks) == 1 else "Dynamic",
        "ss_network_alpha": str(float(next(iter(alphas)))) if len(alphas) == 1 else "Dynamic",
    }
