"""Model families as frozen data: the registry (:mod:`.registry`), the tiny pipelines (:mod:`.tiny`)
and the published real-size layouts (:mod:`.published`). Importing this package never imports torch."""

from .registry import (
    ALL_LAYERS,
    ALL_LINEAR,
    FAMILIES,
    BlockGroup,
    Conditioning,
    Family,
    KohyaNames,
    Objective,
    Variant,
    detect_family,
    detect_variant,
    family_of_kohya_version,
    family_of_tiny,
    get_family,
    single_file_pipelines,
    supported_titles,
    tiny_models,
)
from .specs import ComponentSpec, PipelineSpec

__all__ = [
    "ALL_LAYERS",
    "ALL_LINEAR",
    "FAMILIES",
    "BlockGroup",
    "ComponentSpec",
    "Conditioning",
    "Family",
    "KohyaNames",
    "Objective",
    "PipelineSpec",
    "Variant",
    "detect_family",
    "detect_variant",
    "family_of_kohya_version",
    "family_of_tiny",
    "get_family",
    "single_file_pipelines",
    "supported_titles",
    "tiny_models",
]
