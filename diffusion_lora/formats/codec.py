"""Decoding any supported file's tensors into AdapterData for one model, and encoding it back out.

The one dispatcher over key formats: diffusers/PEFT, kohya/A1111 (SD/SDXL names and SGM names, Flux
BFL names with fused qkv), ComfyUI (``diffusion_model.`` / ``text_encoders.``) and LyCORIS (LoHa,
LoKr, full, loaded exactly as full-rank LoRA). Names are always resolved against the model's real
module list (:class:`ModelKeys`); keys that resolve to nothing are returned, never dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError, FormatError
from ..families import FAMILIES, KohyaNames
from .adapter_data import AdapterData, ModuleLora
from .comfyui import TEXT_PREFIX, comfyui_names, comfyui_to_kohya, write_comfyui
from .detect import FileFormat, detect_format
from .flux2_names import BFL2_ROOTS, bfl2_table
from .flux2_names import NETWORK_MODULE as FLUX2_NETWORK_MODULE
from .flux3_names import to_bfl_names, to_diffusers_names
from .flux_names import COMFYUI_PREFIX, KOHYA_PREFIX, NETWORK_MODULE, FluxDims, Target, bfl_table
from .flux_tensors import parse_flux, write_flux_kohya
from .flux_variants import BFL_ROOTS, fal_as_comfyui, fal_key
from .kohya import flatten, is_kohya, kohya_metadata, parse_kohya, write_kohya
from .lycoris import delta_as_lora, fit_shape, is_lycoris, lycoris_deltas
from .mmdit_names import mmdit_to_kohya, write_mmdit
from .model_keys import ModelKeys
from .peft_format import parse_peft, write_peft

LYCORIS = "lycoris"


@dataclass(frozen=True)
class _BflLayout:
    """A Black Forest Labs model's LoRA names: its BFL table, the kohya network module its trainers write,
    and whether fal's ``base_model.model.<BFL name>`` PEFT files exist for it."""

    table: Callable[[FluxDims], Mapping[str, tuple[Target, ...]]]
    network_module: str
    fal_roots: tuple[str, ...] = ()  # the BFL names fal's ``base_model.model.<BFL name>`` PEFT files use


_BFL_LAYOUTS = {
    KohyaNames.BFL: _BflLayout(bfl_table, NETWORK_MODULE, fal_roots=BFL_ROOTS),  # fal's Kontext trainer
    KohyaNames.BFL2: _BflLayout(bfl2_table, FLUX2_NETWORK_MODULE, fal_roots=BFL2_ROOTS),  # fal's Klein trainer
}


@dataclass
class Decoded:
    """An adapter decoded for one model: its data, the format name and the keys that fit no module."""

    data: AdapterData
    format: str
    unresolved: list[str] = field(default_factory=list)


def decode(
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    keys: ModelKeys,
    *,
    peft_config: Mapping[str, object] | None = None,
    source: str = "",
) -> Decoded:
    """Detect the format of ``tensors`` (all keys) and read them for the model of ``keys``."""
    family = keys.family
    if family.kohya_names is KohyaNames.BFL3:  # Flux.3: BFL names are renames; read them as diffusers paths
        renamed, origin = to_diffusers_names(tensors, keys.module_paths.get(family.denoiser, ()))
        decoded = _decode(renamed, metadata, keys, peft_config=peft_config, source=source)
        decoded.unresolved = sorted(origin.get(k, k) for k in decoded.unresolved)
        return decoded
    return _decode(tensors, metadata, keys, peft_config=peft_config, source=source)


def _decode(
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    keys: ModelKeys,
    *,
    peft_config: Mapping[str, object] | None = None,
    source: str = "",
) -> Decoded:
    family = keys.family
    if is_lycoris(tensors) and not is_kohya(tensors):  # LoRA beside ComfyUI's diff/diff_b stays LoRA
        return _decode_lycoris(tensors, metadata, keys)
    layout = _BFL_LAYOUTS.get(family.kohya_names)
    fmt = detect_format(tensors, source)
    fal = fal_as_comfyui(tensors, layout.fal_roots) if layout is not None and layout.fal_roots else None
    if fal is not None:  # fal's trainers: PEFT's prefix over BFL names, which ComfyUI's reader knows
        decoded = _decode_flux(fal, metadata, keys, FileFormat.COMFYUI, source, layout)
        decoded.unresolved = sorted(fal_key(k) for k in decoded.unresolved)  # the file's own names
        return decoded
    if fmt is FileFormat.DIFFUSERS:
        # Every component name of every family, so another family's keys keep their component and
        # fail to match visibly instead of being taken for bare keys of this family's denoiser.
        components = {c for f in FAMILIES.values() for c in (f.denoiser, *f.text_encoders)}
        data = parse_peft(tensors, metadata, components, family.denoiser, peft_config)
        return Decoded(_model_spelling(data, keys, source), fmt.value)
    if layout is not None:
        return _decode_flux(tensors, metadata, keys, fmt, source, layout)
    origin: dict[str, str] = {}
    if fmt is FileFormat.COMFYUI:
        renamed = comfyui_to_kohya(tensors, family.kohya_prefixes, family.comfyui_text_encoders, family.denoiser)
        origin = dict(zip(renamed, tensors))  # one renamed key per file key, in the file's order
        tensors = renamed
    if family.kohya_names is KohyaNames.MMDIT:  # fused MMDiT layers split into diffusers-named ones
        tensors, split_from = mmdit_to_kohya(tensors, keys.module_shapes.get(family.denoiser, {}))
        origin = {k: origin.get(v, v) for k, v in split_from.items()}
    data, unresolved = _decode_kohya_names(tensors, metadata, keys, source)
    data.format = fmt.value
    return Decoded(data, fmt.value, sorted({origin.get(k, k) for k in unresolved}))


def _decode_kohya_names(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], keys: ModelKeys, source: str
) -> tuple[AdapterData, list[str]]:
    """kohya-named tensors (renamed ComfyUI ones too, which may carry ``diff``/``diff_b``) as AdapterData,
    plus the sorted file keys it cannot hold.

    LoRA modules keep their bias delta (``diff_b``) as the LoRA's bias. A module with a whole weight
    delta (``diff``) on a Linear/Conv2d layer becomes an exact full-rank LoRA, as LyCORIS full modules
    do. A ``diff_b`` without a LoRA or ``diff`` (the bias of a norm, of a layer the file adapts no
    other way) and the ``diff`` of a layer LoRA cannot adapt (a norm's weight) have no place in a PEFT
    adapter: they are returned with the unresolved keys, which loading refuses by name or, with
    ``strict=False``, skips by name.
    """
    by_name: dict[str, dict[str, str]] = {}
    for key in tensors:
        name, _, suffix = key.partition(".")
        by_name.setdefault(name, {})[suffix] = key
    lora: dict[str, torch.Tensor] = {}
    full: dict[str, torch.Tensor] = {}
    unheld: list[str] = []
    for name, parts in by_name.items():
        if "diff" in parts and keys.kohya.resolve(name) is not None:
            full.update({k: tensors[k] for k in parts.values()})
        elif parts.keys() <= _DELTA_ONLY:
            unheld += parts.values()
        else:
            lora.update({k: tensors[k] for k in parts.values()})
    data, unresolved = parse_kohya(lora, metadata, keys.kohya, source=source)
    if full:
        whole = _decode_lycoris(full, metadata, keys)
        for key, module in whole.data.modules.items():
            if key in data.modules:
                raise FormatError(
                    f"{source}: {key} has both a LoRA and a whole weight delta (diff); the file is ambiguous"
                )
            data.modules[key] = module
        unresolved += whole.unresolved
    _conv_factors(data, keys)
    return data, sorted(unresolved + unheld)


_DELTA_ONLY = frozenset({"diff", "diff_b", "alpha"})


def _conv_factors(data: AdapterData, keys: ModelKeys) -> None:
    """Give flattened LoRA factors of conv layers the layer's 4-d shapes, in place.

    ComfyUI's trainer stores a conv layer's LoRA as down [rank, in·kh·kw] and up [out, rank]; PEFT's
    conv LoRA is down [rank, in, kh, kw] and up [out, rank, 1, 1] — the same numbers in another shape,
    so up @ down is unchanged. Factors that do not fit are left for the shape check to report.
    """
    for key, m in data.modules.items():
        component, _, path = key.partition(".")
        shape = keys.shape(component, path)
        if shape is None or len(shape) != 4 or m.down.dim() != 2 or m.up.dim() != 2:
            continue
        _, in_c, kh, kw = shape
        if m.down.shape[1] == in_c * kh * kw:
            m.down = m.down.reshape(m.rank, in_c, kh, kw)
            m.up = m.up.reshape(m.up.shape[0], m.rank, 1, 1)


def _model_spelling(data: AdapterData, keys: ModelKeys, source: str) -> AdapterData:
    """``data`` with every module path spelled as the model spells it (see :meth:`ModelKeys.module_path`)."""
    modules: dict[str, ModuleLora] = {}
    for key, m in data.modules.items():
        component, _, path = key.partition(".")
        own = f"{component}.{keys.module_path(component, path)}"
        if own in modules:
            raise FormatError(f"{source}: two modules of the file both adapt {own} (spelled with and without "
                              f"'text_model.'); the file is ambiguous")
        modules[own] = m
    data.modules = modules
    return data


def _decode_flux(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], keys: ModelKeys, fmt: FileFormat, source: str,
    layout: _BflLayout,
) -> Decoded:
    """Transformer keys through the BFL/OneTrainer/kohya-diffusers index; CLIP keys through kohya's."""
    family = keys.family
    text = {k: v for k, v in tensors.items() if k.startswith(("lora_te", TEXT_PREFIX))}
    denoiser = {k: v for k, v in tensors.items() if k not in text}
    data, unresolved = parse_flux(
        denoiser, metadata, keys.flux_dims, module_paths=keys.module_paths["transformer"], source=source,
        table=layout.table(keys.flux_dims),
    )
    if text:
        if fmt is FileFormat.COMFYUI:
            text = comfyui_to_kohya(text, family.kohya_prefixes, family.comfyui_text_encoders, family.denoiser)
        text_data, text_unresolved = _decode_kohya_names(text, metadata, keys, source)
        data.modules.update(text_data.modules)
        unresolved = sorted(unresolved + text_unresolved)
    data.format = fmt.value
    return Decoded(data, fmt.value, unresolved)


def _decode_lycoris(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], keys: ModelKeys) -> Decoded:
    """LoHa/LoKr/full modules as exact full-rank LoRA (ΔW = up @ down with an identity factor)."""
    modules: dict[str, ModuleLora] = {}
    unresolved: list[str] = []
    for name, delta in lycoris_deltas(tensors, metadata).items():
        target = keys.kohya.resolve(name)
        if target is None:
            unresolved += [k for k in tensors if k.startswith(name + ".")]
            continue
        shape = keys.shape(*target)
        if shape is not None:
            delta = fit_shape(delta, shape, name)
        modules[".".join(target)] = delta_as_lora(delta)
    return Decoded(AdapterData(modules=modules, metadata=dict(metadata), format=LYCORIS), LYCORIS, sorted(unresolved))


def encode(keys: ModelKeys, data: AdapterData, fmt: FileFormat | str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and format metadata of ``data`` written as ``fmt`` for the model of ``keys``.

    kohya: ``lora_unet_``/``lora_te*_`` names with ``.alpha`` — SGM block names for SDXL, BFL names
    with fused qkv for Flux — what A1111/Forge and ComfyUI load natively; DoRA as ``dora_scale``.
    comfyui: ``diffusion_model.`` / ``text_encoders.`` names. diffusers: PEFT keys with
    ``lora_adapter_metadata``.
    """
    try:
        fmt = FileFormat(fmt)
    except ValueError:
        raise ConfigError(
            f"format {fmt!r} is unknown; choose one of {', '.join(f.value for f in FileFormat)}"
        ) from None
    family = keys.family
    if fmt is FileFormat.DIFFUSERS:
        return write_peft(data)
    biased = [k for k, m in data.modules.items() if m.bias is not None]
    if biased and fmt is FileFormat.KOHYA:
        raise FormatError(
            f"{len(biased)} module(s) change a layer's bias (e.g. {biased[0]}, a diff_b); kohya LoRA files "
            f"cannot carry that — save in the diffusers format (a lora_B bias) or the comfyui format (diff_b)"
        )
    if family.kohya_names in _BFL_LAYOUTS:
        return _encode_flux(keys, data, fmt, _BFL_LAYOUTS[family.kohya_names])
    if family.kohya_names is KohyaNames.MMDIT:
        return write_mmdit(
            data, keys.module_shapes.get(family.denoiser, {}), keys.kohya, comfyui=fmt is FileFormat.COMFYUI,
            denoiser=family.denoiser, text_encoders=family.comfyui_text_encoders,
        )
    if family.kohya_names is KohyaNames.BFL3:
        return _encode_flux3(keys, data, fmt)
    if fmt is FileFormat.KOHYA:
        return write_kohya(data, keys.kohya, sgm=family.kohya_names is KohyaNames.SGM)
    names = comfyui_names(data, family.denoiser, family.comfyui_text_encoders, keys.unet_layout)
    return write_comfyui(data, names), kohya_metadata(data)


def _encode_flux3(keys: ModelKeys, data: AdapterData, fmt: FileFormat) -> tuple[dict, dict[str, str]]:
    """Flux.3 kohya (``lora_unet_<flat BFL>``) or ComfyUI (``diffusion_model.<BFL>``) tensors: the generic
    writers' diffusers spellings renamed to BFL's (no layer is fused)."""
    if fmt is FileFormat.KOHYA:
        tensors, metadata = write_kohya(data, keys.kohya)
    else:
        names = {key: COMFYUI_PREFIX + key.partition(".")[2] for key in data.modules}
        tensors, metadata = write_comfyui(data, names), kohya_metadata(data)
    return to_bfl_names(tensors, keys.module_paths.get(keys.family.denoiser, ())), metadata


def _encode_flux(
    keys: ModelKeys, data: AdapterData, fmt: FileFormat, layout: _BflLayout
) -> tuple[dict, dict[str, str]]:
    family = keys.family
    denoiser = {k: m for k, m in data.modules.items() if k.startswith("transformer.")}

    text = {k: m for k, m in data.modules.items() if k not in denoiser}
    table = layout.table(keys.flux_dims)
    tensors, metadata = write_flux_kohya(
        AdapterData(modules=denoiser, use_rslora=data.use_rslora), keys.flux_dims, table, layout.network_module
    )
    if fmt is FileFormat.COMFYUI:
        dotted = {KOHYA_PREFIX + flatten(bfl): COMFYUI_PREFIX + bfl for bfl in table}
        tensors = {dotted[k.split(".", 1)[0]] + "." + k.split(".", 1)[1]: v for k, v in tensors.items()}
    if text:
        text_data = AdapterData(modules=text, use_rslora=data.use_rslora)
        if fmt is FileFormat.KOHYA:
            tensors.update(write_kohya(text_data, keys.kohya)[0])
        else:
            names = comfyui_names(text_data, family.denoiser, family.comfyui_text_encoders, None)
            tensors.update(write_comfyui(text_data, names))
    return tensors, metadata
