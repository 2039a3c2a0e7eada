"""Moving adapter tensors in and out of the pipeline: AdapterData export, hot-swap and saving."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import AdapterStateError
from ..formats.adapter_data import AdapterData, ModuleLora
from ..formats.adapter_files import read_adapter, safetensors_path
from ..formats.codec import encode
from ..formats.metadata import ModelFacts, sharing_metadata, trigger_words_of
from ..formats.safetensors_io import write_adapter_file_with_hashes
from ..version import __version__
from .guards import refuse_meta_weights, refused, require
from .keys import model_keys_of
from .state import AdapterRecord, AdapterState, state_of
from .validate import plan_load
from .weights import apply_weights


def adapter_data(pipe: Any, name: str) -> AdapterData:
    """The tensors of a loaded adapter as AdapterData (CPU copies), for saving or tools."""
    state = state_of(pipe)
    require(state, name)
    modules: dict[str, ModuleLora] = {}
    use_rslora = False
    for site in state.sites():
        layer = site.layer
        if name not in layer.lora_A:
            continue
        magnitude = layer.lora_magnitude_vector[name].weight if name in layer.lora_magnitude_vector else None
        bias = layer.lora_B[name].bias
        modules[f"{site.component}.{site.path}"] = ModuleLora(
            down=_cpu(layer.lora_A[name].weight),
            up=_cpu(layer.lora_B[name].weight),
            alpha=float(layer.lora_alpha[name]),
            magnitude=None if magnitude is None else _cpu(magnitude).reshape(-1),
            bias=None if bias is None else _cpu(bias),
        )
        use_rslora = use_rslora or bool(layer.use_rslora.get(name, False))
    return AdapterData(modules=modules, use_rslora=use_rslora, metadata=dict(state.record(name).metadata))


def _cpu(t: Any) -> Any:
    return t.detach().to("cpu").contiguous()


def hotswap(pipe: Any, name: str, path: str | os.PathLike, *, allow_pickle: bool = False) -> None:
    """Replace the weights of loaded adapter ``name`` with a file's, in place (no re-injection).

    The file must cover the same modules with the same ranks; alpha may differ. On any error the
    pipeline is unchanged.
    """
    state = state_of(pipe)
    require(state, name)
    refuse_meta_weights(state)
    read = read_adapter(path, model_keys_of(state), allow_pickle=allow_pickle)
    weight_file, data = read.path, read.data
    plan = plan_load(state, data, str(weight_file), strict=True, unresolved=read.unresolved)
    current = {
        f"{site.component}.{site.path}": site.layer
        for site in state.sites()
        if name in site.layer.lora_A
    }
    new = {f"{c}.{p}": m for c, mods in plan.modules.items() for p, m in mods.items()}
    if set(new) != set(current):
        differ = sorted(set(new) ^ set(current))
        raise AdapterStateError(
            f"{weight_file}: cannot hot-swap into {name!r}: the files adapt different modules "
            f"({len(differ)} differ, e.g. {', '.join(differ[:3])}); use remove_lora + load_lora"
        )
    for key, m in new.items():
        layer = current[key]
        loaded_rank = layer.r[name]
        has_bias = layer.lora_B[name].bias is not None
        if (m.rank != loaded_rank or (m.magnitude is None) == (name in layer.lora_magnitude_vector)
                or (m.bias is not None) != has_bias):
            raise AdapterStateError(
                f"{weight_file}: cannot hot-swap into {name!r}: {key} has rank {m.rank}"
                f"{'' if m.magnitude is None else ' with DoRA'}, the loaded adapter rank {loaded_rank}"
                f"{' with DoRA' if name in layer.lora_magnitude_vector else ''}"
                f"{'' if (m.bias is not None) == has_bias else ' (one of them has a bias delta, the other not)'}"
                f"; use remove_lora + load_lora"
            )
    rec = state.record(name)
    undo = _restorer(state, name, rec) if state.fused is not None else None
    with refused(state, undo):
        _copy_into(state, name, new, data.use_rslora)
        rec.file, rec.metadata, rec.trigger_words = str(weight_file), data.metadata, trigger_words_of(data.metadata)
        apply_weights(state)


def _restorer(state: AdapterState, name: str, rec: AdapterRecord) -> Callable[[], None]:
    """An undo for a hot-swap into ``name``: copies of its factors, alphas and record fields as they are now.

    Taken only while fused, where a re-fuse that overflows must put the previous adapter back.
    """
    saved = []
    for site in state.sites():
        layer = site.layer
        if name not in layer.lora_A:
            continue
        params = [layer.lora_A[name].weight, layer.lora_B[name].weight]
        if layer.lora_B[name].bias is not None:
            params.append(layer.lora_B[name].bias)
        if name in layer.lora_magnitude_vector:
            params.append(layer.lora_magnitude_vector[name].weight)
        saved.append((layer, [(p, p.detach().clone()) for p in params], layer.lora_alpha[name], layer.use_rslora[name]))
    fields = (rec.file, rec.metadata, rec.trigger_words)

    def undo() -> None:
        with torch.no_grad():
            for layer, params, alpha, use_rslora in saved:
                for param, copy in params:
                    param.copy_(copy)
                layer.lora_alpha[name], layer.use_rslora[name] = alpha, use_rslora
        rec.file, rec.metadata, rec.trigger_words = fields
        apply_weights(state)

    return undo


def _copy_into(state: AdapterState, name: str, modules: Mapping[str, ModuleLora], use_rslora: bool) -> None:
    with torch.no_grad():
        for site in state.sites():
            m = modules.get(f"{site.component}.{site.path}")
            if m is None:
                continue
            layer = site.layer
            layer.lora_A[name].weight.copy_(m.down.reshape(layer.lora_A[name].weight.shape))
            layer.lora_B[name].weight.copy_(m.up.reshape(layer.lora_B[name].weight.shape))
            if m.bias is not None:
                layer.lora_B[name].bias.copy_(m.bias)
            if m.magnitude is not None:
                magnitude = layer.lora_magnitude_vector[name].weight
                magnitude.copy_(m.magnitude.reshape(magnitude.shape))
            layer.lora_alpha[name] = m.alpha
            layer.use_rslora[name] = use_rslora


def save_lora(
    pipe: Any,
    name: str,
    path: str | os.PathLike,
    format: str = "diffusers",
    *,
    trigger_words: Sequence[str] | None = None,
    extra_metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write adapter ``name`` as a ``.safetensors`` file in ``format`` (diffusers, kohya, comfyui), atomically.

    Every format carries kohya's ``ss_*`` and ModelSpec ``modelspec.*`` entries, diffusion_lora's own
    keys (family, base model, name, rank, alpha, targets, trigger words, version), and the hashes of
    the final tensors (``sshs_model_hash``, the "addnet" hash A1111 shows, and
    ``modelspec.hash_sha256``). The diffusers format also carries ``lora_adapter_metadata``, so plain
    ``load_lora_weights`` gets the same alpha.
    """
    state = state_of(pipe)
    out = safetensors_path(path)
    data = adapter_data(pipe, name)
    rec = state.record(name)
    words = tuple(trigger_words) if trigger_words is not None else rec.trigger_words
    tensors, metadata = encode(model_keys_of(state), data, format)
    metadata.update(describe(pipe, state, name, data, words, str(format)))
    metadata.update({str(k): str(v) for k, v in (extra_metadata or {}).items()})
    write_adapter_file_with_hashes(out, tensors, metadata)
    rec.trigger_words = words
    return out


def describe(pipe: Any, state: AdapterState, name: str, data: AdapterData, words: Sequence[str], fmt: str) -> dict:
    """Sharing metadata (``ss_*``, ``modelspec.*``) plus diffusion_lora's own keys for a saved file."""
    facts = ModelFacts.of(state.family, fmt, state.variant)
    meta = sharing_metadata(data, facts, name=name, trigger_words=words, inherited=data.metadata)
    meta.update(_our_metadata(pipe, state, name, data, words))
    return meta


def _module_suffix(key: str) -> str:
    """``to_q`` of ``unet.…attn1.to_q``; ``to_out.0`` of ``unet.…attn1.to_out.0``."""
    parts = key.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1]


def _our_metadata(pipe: Any, state: AdapterState, name: str, data: AdapterData, words: Sequence[str]) -> dict:
    ranks = sorted({m.rank for m in data.modules.values()})
    alphas = sorted({m.alpha for m in data.modules.values()})
    suffixes = sorted({_module_suffix(key) for key in data.modules})
    base = getattr(getattr(pipe, "config", None), "_name_or_path", None) or ""
    return {
        "diffusion_lora.version": __version__,
        "diffusion_lora.name": name,
        "diffusion_lora.family": state.family.name,
        "diffusion_lora.base_model": str(base),
        "diffusion_lora.rank": str(ranks[0]) if len(ranks) == 1 else json.dumps(ranks),
        "diffusion_lora.alpha": str(alphas[0]) if len(alphas) == 1 else json.dumps(alphas),
        "diffusion_lora.use_rslora": json.dumps(data.use_rslora),
        "diffusion_lora.use_dora": json.dumps(data.use_dora),
        "diffusion_lora.targets": json.dumps(suffixes),
        "diffusion_lora.components": json.dumps(sorted(data.components())),
        "diffusion_lora.trigger_words": json.dumps(list(words)),
    }
