"""Header metadata that UIs and sharing sites read: kohya ``ss_*`` keys and ModelSpec 1.0 ``modelspec.*``.

A1111, Forge and Civitai show ``ss_network_dim``/``ss_network_alpha``/``ss_base_model_version`` and
``ss_tag_frequency``; ModelSpec (``modelspec.architecture``, ``modelspec.trigger_phrase``, …) is what
newer tools read. Hashes (``sshs_model_hash``, ``modelspec.hash_sha256``) are added by the writer,
which computes them from the final tensor bytes.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..families import Family, Variant
from .adapter_data import AdapterData
from .json_text import parse_json
from .kohya import kohya_metadata

MODELSPEC_VERSION = "1.0.0"
IMPLEMENTATION_DIFFUSERS = "diffusers"
# Passed through from a loaded file or a training run when present; never invented.
TRAINING_KEYS = ("ss_steps", "ss_epoch", "ss_tag_frequency", "ss_num_train_images", "ss_dataset_dirs",
                 "ss_learning_rate", "ss_training_started_at", "ss_training_finished_at", "ss_resolution")


@dataclass(frozen=True)
class ModelFacts:
    """What the metadata says about the base model: a family's registry values."""

    family: str
    kohya_base_model_version: str
    modelspec_architecture: str
    implementation: str
    resolution: int

    @classmethod
    def of(cls, family: Family, file_format: str, variant: Variant | None = None) -> ModelFacts:
        """The facts of ``family`` (and of its ``variant``, e.g. SD3.5 Medium) for a file in ``file_format``
        (diffusers files name diffusers as the implementation; kohya/ComfyUI files the family's original one)."""
        variant = variant or family.main_variant
        return cls(
            family=family.name,
            kohya_base_model_version=variant.kohya_base_model_version or family.kohya_base_model_version,
            modelspec_architecture=variant.modelspec_architecture or family.modelspec_architecture,
            implementation=IMPLEMENTATION_DIFFUSERS if file_format == "diffusers" else family.original_implementation,
            resolution=family.default_resolution,
        )


def trigger_words_of(metadata: Mapping[str, str]) -> tuple[str, ...]:
    """Trigger words a file records: diffusion_lora's JSON list, else ModelSpec's comma-separated phrase."""
    raw = metadata.get("diffusion_lora.trigger_words")
    if raw:
        try:
            words = parse_json(raw)
        except ValueError:
            words = None
        if isinstance(words, list):
            return tuple(str(w) for w in words if str(w).strip())
    phrase = metadata.get("modelspec.trigger_phrase", "")
    return tuple(w.strip() for w in phrase.split(",") if w.strip())


def sharing_metadata(
    data: AdapterData,
    facts: ModelFacts,
    *,
    name: str,
    trigger_words: Sequence[str],
    inherited: Mapping[str, str] = (),  # type: ignore[assignment]
    now: _dt.datetime | None = None,
) -> dict[str, str]:
    """``ss_*`` and ``modelspec.*`` entries for ``data``; training entries are copied from ``inherited``."""
    inherited = dict(inherited or {})
    when = (now or _dt.datetime.now(_dt.timezone.utc)).replace(microsecond=0)
    meta = {
        **kohya_metadata(data),
        "ss_base_model_version": facts.kohya_base_model_version,
        "ss_output_name": name,
        "ss_resolution": inherited.get("ss_resolution", f"({facts.resolution}, {facts.resolution})"),
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": facts.modelspec_architecture,
        "modelspec.implementation": facts.implementation,
        "modelspec.title": name,
        "modelspec.resolution": f"{facts.resolution}x{facts.resolution}",
        "modelspec.date": when.isoformat(),
    }
    if trigger_words:
        meta["modelspec.trigger_phrase"] = ", ".join(trigger_words)
    for key in TRAINING_KEYS:
        if key in inherited:
            meta[key] = inherited[key]
    if "ss_tag_frequency" in meta and not _is_json_object(meta["ss_tag_frequency"]):
        del meta["ss_tag_frequency"]  # a corrupt value from another tool is not passed on
    return meta


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(parse_json(text), dict)
    except (ValueError, TypeError):
        return False
