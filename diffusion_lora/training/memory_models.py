"""The model ``train --estimate`` sizes, built on the meta device from the config's ``model.name``: its own
configs for a tiny model, the embedded model or a local diffusers folder (or one in the Hugging Face cache),
else the family's published layout for a known hub id (never a download)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..families import Family, Variant, detect_family, detect_variant, get_family, tiny_models
from ..families.memory import PUBLISHED_REPOS
from ..model_names import EMBEDDED_MODELS

__all__ = ["ModelLayout", "layout_of_reference", "resolve_model"]


@dataclass
class ModelLayout:
    """A model's denoiser and text encoders as (meta) modules, its VAE's size and where it came from."""

    family: Family
    variant: Variant
    denoiser: torch.nn.Module
    text_encoders: dict[str, torch.nn.Module]
    vae_params: int | None
    native: int | None
    source: str


def _on_meta(spec_cls: str, config: Mapping[str, Any], library: str) -> torch.nn.Module:
    import diffusers
    import transformers

    with torch.device("meta"):
        if library == "transformers":
            cfg = transformers.AutoConfig.for_model(**dict(config)) if "model_type" in config else None
            cls = getattr(transformers, spec_cls)
            return cls(cfg if cfg is not None else cls.config_class(**dict(config)))
        cls = getattr(diffusers, spec_cls)
        return cls.from_config(dict(config))


def _from_folder(folder: Path, source: str) -> ModelLayout:
    index = json.loads((folder / "model_index.json").read_text())
    pipeline_cls = index.get("_class_name", "DiffusionPipeline")
    modules: dict[str, torch.nn.Module] = {}
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or len(entry) != 2 or entry[0] is None:
            continue
        library, cls = entry
        config_file = folder / name / "config.json"
        if library not in ("diffusers", "transformers") or not config_file.is_file():
            continue
        modules[name] = _on_meta(cls, json.loads(config_file.read_text()), library)
    fake = type(pipeline_cls, (), {})()  # detect_variant reads the pipeline's class name
    for name, module in modules.items():
        setattr(fake, name, module)
    family, variant = detect_family(fake), detect_variant(fake)
    vae = modules.get("vae")
    if vae is not None:
        fake.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    from ..models.loading import native_size

    return ModelLayout(family, variant, modules[family.denoiser],
                  {n: modules[n] for n in family.text_encoders if n in modules},
                  sum(p.numel() for p in vae.parameters()) if vae is not None else None,
                  native_size(fake), source)


def layout_of_reference(family: Family, variant: Variant, source: str) -> ModelLayout:
    from ..models.reference import build_component

    with torch.device("meta"):
        built = {spec.name: build_component(spec) for spec in variant.reference}
    return ModelLayout(family, variant, built[family.denoiser],
                  {n: built[n] for n in family.text_encoders if n in built}, None, None, source)


def _from_tiny(name: str) -> ModelLayout:
    from ..models.tiny import build_tiny_pipeline

    family, variant = tiny_models()[name]
    pipe = build_tiny_pipeline(name)
    from ..models.loading import native_size

    return ModelLayout(family, variant, getattr(pipe, family.denoiser),
                  {n: getattr(pipe, n) for n in family.text_encoders if getattr(pipe, n, None) is not None},
                  sum(p.numel() for p in pipe.vae.parameters()), native_size(pipe), name)


def _hub_cache_folder(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "model_index.json")
    except Exception:  # noqa: BLE001 - a malformed id or cache is the same as "not cached" here
        return None
    return Path(found).parent if isinstance(found, str) else None


def resolve_model(name: str) -> ModelLayout:
    """The config's ``model.name`` built on the meta device (tiny models are built for real: they are tiny)."""
    from ..models.loading import _HUB_ID, SINGLE_FILE_SUFFIXES, embedded_model_path

    if name in EMBEDDED_MODELS:
        return _from_folder(embedded_model_path(name), name)
    if name in tiny_models():
        return _from_tiny(name)
    path = Path(name).expanduser()
    if path.is_dir() and (path / "model_index.json").is_file():
        return _from_folder(path, name)
    if path.is_file() and name.lower().endswith(SINGLE_FILE_SUFFIXES):
        from ..models.loading import detect_single_file_pipeline, read_checkpoint_shapes

        model_type, _ = detect_single_file_pipeline(read_checkpoint_shapes(path))
        for family in _families():
            if model_type in family.single_file_types:
                return layout_of_reference(family, family.main_variant, f"{name} (as the published {family.title})")
    if _HUB_ID.match(name):
        folder = _hub_cache_folder(name)
        if folder is not None:
            return _from_folder(folder, name)
        if name in PUBLISHED_REPOS:
            family_name, variant_name = PUBLISHED_REPOS[name]
            family = get_family(family_name)
            variant = family.variant(variant_name)
            return layout_of_reference(family, variant, f"{name} (published layout of {variant.title})")
    known = ", ".join(sorted(PUBLISHED_REPOS))
    raise ConfigError(f"model.name: cannot size {name!r} without downloading it; use a local diffusers folder, "
                      f"a model in the Hugging Face cache, a tiny model or a known hub id ({known})")


def _families() -> list[Family]:
    from ..families import FAMILIES

    return list(FAMILIES.values())
