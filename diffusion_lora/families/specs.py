"""Pipelines and components described as plain data: class names and constructor configs.

A family's tiny test model and its real-size reference model are both written this way, so the
registry stays importable without torch; ``models/`` is the only place that instantiates them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any


def frozen(**kwargs: Any) -> Mapping[str, Any]:
    """A read-only mapping of ``kwargs`` (registry data is shared by every caller)."""
    return MappingProxyType(kwargs)


@dataclass(frozen=True)
class ComponentSpec:
    """One pipeline component: its name in the pipeline, its class name and its constructor config.

    ``cls`` is looked up in :mod:`diffusers` or, for text encoders and tokenizers, :mod:`transformers`.
    Tokenizers take no config; text encoders get token ids and vocabulary size from the tokenizers.
    """

    name: str
    cls: str
    config: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class PipelineSpec:
    """A pipeline: its diffusers class, its components in build order and extra pipeline kwargs.

    A modular pipeline (Flux.3) is built from ``blocks`` (a diffusers blocks class) less the sub-blocks
    named in ``drop_blocks``; its components are then set on it and ``pipeline_kwargs`` is unused.
    """

    pipeline: str
    components: tuple[ComponentSpec, ...]
    pipeline_kwargs: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    blocks: str | None = None
    drop_blocks: tuple[str, ...] = ()
