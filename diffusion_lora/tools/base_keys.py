"""Which model's layer shapes the file tools (convert, merge, resize) check an adapter file against.

A file trained on a built-in model (``shapes-sd15``, ``tiny-*``) or a local diffusers folder does not
fit the family's published reference model, so when its metadata names such a base, that model's
shapes are used. Where a file records its base:

* ``diffusion_lora.base_model`` — written by our ``save_lora``/trainer: the pipeline's ``_name_or_path``
  (a built-in name, the folder it was loaded from, or a hub id);
* ``diffusion_lora.train_config`` — our trainer's resolved config; ``model.name`` is what the user gave;
* ``ss_sd_model_name`` — kohya's trainers: the ``--pretrained_model_name_or_path`` value (its basename
  when it was a local path).

ModelSpec (``modelspec.*``) records only the architecture, never the base model itself.

A recorded base is used when it is a built-in name or an existing local folder with a
``model_index.json``. Its shapes come from the component configs alone: the denoiser and text
encoders are built on the meta device (no weights read, no memory for them) from classes that
diffusers or transformers export, so a path named by an untrusted file can never run code from it.
Anything else (a hub id, a single-file checkpoint) is not resolved: the tools fall back to the
reference model, and a misfit names the recorded base and says to pass ``--model``.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from ..adapters import keys_of_components, pipeline_keys
from ..errors import DiffusionLoraError, ModelLoadError, UnsupportedModelError
from ..families import detect_family
from ..formats.json_text import parse_json, read_json_object
from ..formats.model_keys import ModelKeys
from ..models import load_pipeline
from ..models.loading import EMBEDDED_MODELS, embedded_model_path
from ..models.reference import reference_keys
from ..models.tiny import TINY_MODELS

logger = logging.getLogger(__name__)

BASE_MODEL_KEY = "diffusion_lora.base_model"
TRAIN_CONFIG_KEY = "diffusion_lora.train_config"
KOHYA_MODEL_KEY = "ss_sd_model_name"
# A model_index.json or component config.json is a few kB; anything much larger is not one.
_MAX_CONFIG_BYTES = 1 << 20
_LIBRARIES = ("diffusers", "transformers")


def recorded_bases(metadata: Mapping[str, str]) -> list[tuple[str, str]]:
    """(metadata key, value) of every base model the file records, most specific first."""
    found = []
    if metadata.get(BASE_MODEL_KEY):
        found.append((BASE_MODEL_KEY, str(metadata[BASE_MODEL_KEY])))
    raw = metadata.get(TRAIN_CONFIG_KEY)
    if raw:
        try:
            name = parse_json(raw).get("model", {}).get("name")
        except (ValueError, AttributeError):
            name = None
        if isinstance(name, str) and name:
            found.append((f"{TRAIN_CONFIG_KEY} model.name", name))
    if metadata.get(KOHYA_MODEL_KEY):
        found.append((KOHYA_MODEL_KEY, str(metadata[KOHYA_MODEL_KEY])))
    return found


def resolve_base(value: str) -> str | None:
    """``value`` as a source :func:`keys_of_model` reads cheaply (a built-in name or a local diffusers
    folder), or None. The embedded model's recorded folder resolves to its name wherever it is now."""
    if value in EMBEDDED_MODELS or value in TINY_MODELS:
        return value
    if len(value) > 4096 or "\0" in value:
        return None
    path = Path(value)
    if path.name in EMBEDDED_MODELS and path.parent.name == "assets":
        return path.name  # the package's own folder, recorded by an install elsewhere
    try:
        if (path / "model_index.json").is_file():
            return str(path)
    except OSError:
        return None
    return None


def keys_of_model(source: str | os.PathLike) -> ModelKeys:
    """The layer shapes of ``source`` (anything ``load_pipeline`` takes), as cheaply as it can be done.

    Built-in tiny models are built (they are small); the embedded model and local diffusers folders
    are built on the meta device from their configs; other sources (single files, hub ids) are
    loaded. Raises ModelLoadError / UnsupportedModelError when the model cannot be read.
    """
    name = os.fspath(source)
    if name in EMBEDDED_MODELS:
        return folder_keys(embedded_model_path(name))
    if name not in TINY_MODELS and (Path(name) / "model_index.json").is_file():
        return folder_keys(Path(name))
    return pipeline_keys(load_pipeline(name))


def folder_keys(folder: Path) -> ModelKeys:
    """Layer shapes of a diffusers folder's denoiser and text encoders, built on the meta device."""
    index = _read_json(folder / "model_index.json")
    denoiser_name = next((c for c in ("unet", "transformer") if c in index), None)
    if denoiser_name is None:
        raise UnsupportedModelError(f"{folder}: model_index.json names neither a unet nor a transformer")
    denoiser = _meta_component(folder, denoiser_name, index[denoiser_name])
    family = detect_family(SimpleNamespace(**{denoiser_name: denoiser}))
    models = {denoiser_name: denoiser}
    for component in family.text_encoders:
        if component in index and index[component] is not None:
            models[component] = _meta_component(folder, component, index[component])
    return keys_of_components(family, models)


def _meta_component(folder: Path, component: str, spec: Any) -> torch.nn.Module:
    """One component built from ``folder/component/config.json`` on the meta device."""
    where = f"{folder / 'model_index.json'}: {component}"
    if not (isinstance(spec, list) and len(spec) == 2 and spec[0] in _LIBRARIES and isinstance(spec[1], str)):
        raise ModelLoadError(f"{where} is {str(spec)[:80]}; expected [\"diffusers\" or \"transformers\", class]")
    cls = getattr(importlib.import_module(spec[0]), spec[1], None)
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise ModelLoadError(f"{where}: {spec[1]!r} is not a {spec[0]} model class")
    config = _read_json(folder / component / "config.json")
    try:
        with torch.device("meta"):
            if spec[0] == "diffusers":
                return cls.from_config(config)
            return cls(cls.config_class.from_dict(config))
    except Exception as exc:  # any library error means: this config does not build
        raise ModelLoadError(f"{folder / component}: cannot build {spec[1]} from its config.json ({exc})") from exc


def _read_json(path: Path) -> dict:
    """A JSON object from a small regular file; ModelLoadError otherwise (a FIFO cannot hang it)."""
    return read_json_object(path, max_bytes=_MAX_CONFIG_BYTES, error=ModelLoadError, what="model config")


def keys_for_files(
    metadatas: Sequence[Mapping[str, str]], family: str, variant: str | None = None
) -> tuple[ModelKeys, str | None]:
    """The keys to check files of ``family`` against, and the recorded base they come from (None: the
    reference model of the family's ``variant``, e.g. ``"sd35-large"``; of its main model without one).
    The first recorded base that resolves and is of ``family`` is used."""
    tried: set[str] = set()
    for metadata in metadatas:
        for key, value in recorded_bases(metadata):
            source = resolve_base(value)
            if source is None or source in tried:
                continue
            tried.add(source)
            try:
                keys = keys_of_model(source)
            except DiffusionLoraError as exc:
                logger.warning("the base model %s records (%s) cannot be read: %s", key, source, exc)
                continue
            if keys.family.name == family:
                logger.info("checking against %s, the base model the file records (%s)", source, key)
                return keys, source
    return reference_keys(family, variant), None


def misfit_hint(metadata: Mapping[str, str], base: str | None) -> str:
    """What to add to a 'does not fit' error: the base the shapes came from, or what the file records."""
    if base is not None:
        return f" (checked against {base}, the base model the file records; pass --model to use another)"
    recorded = recorded_bases(metadata)
    if recorded:
        key, value = recorded[0]
        shown = json.dumps(value[:200], ensure_ascii=True)
        return (
            f" — the file records its base model as {shown} ({key}), which is not a built-in model or a "
            f"local diffusers folder here; pass --model with that model"
        )
    return (
        " — the file does not record its base model; if it was made for another model of this family "
        "(a tiny, embedded or local one), pass --model with it"
    )
