"""The module names of one model — all that reading and writing key formats needs to know about it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from ..families import Family
from .flux_names import FluxDims
from .kohya import KohyaIndex, kohya_index
from .sgm_blocks import UNetLayout

Shape = tuple[int, ...]
_CLIP_WRAPPER = "text_model."


@dataclass(frozen=True)
class ModelKeys:
    """A model family plus the weight shape of every Linear/Conv2d layer, per pipeline component.

    Built from a loaded pipeline (``adapters.keys.model_keys_of``) or from a real-size reference
    model on the meta device (``models.reference``), so converting files never needs the weights.
    ``denoiser_config`` is the denoiser's config dict (Flux split sizes, UNet block layout).
    """

    family: Family
    module_shapes: Mapping[str, Mapping[str, Shape]]
    unet_layout: UNetLayout | None = None
    denoiser_config: Mapping[str, Any] = field(default_factory=dict)

    @property
    def module_paths(self) -> dict[str, tuple[str, ...]]:
        return {c: tuple(shapes) for c, shapes in self.module_shapes.items()}

    @cached_property
    def kohya(self) -> KohyaIndex:
        """kohya/A1111 name index (SGM aliases for a UNet with a layout)."""
        paths = {c: p for c, p in self.module_paths.items() if c in self.family.kohya_prefixes}
        return kohya_index(
            self.family.kohya_prefixes, paths, self.unet_layout, unet_component=self.family.denoiser
        )

    @cached_property
    def flux_dims(self) -> FluxDims:
        """Split sizes of a Flux transformer, read from its real layers."""
        shapes = self.module_shapes.get("transformer", {})
        return FluxDims.from_config(self.denoiser_config, {p: s[:2] for p, s in shapes.items()})

    def shape(self, component: str, path: str) -> Shape | None:
        return self.module_shapes.get(component, {}).get(path)

    def module_path(self, component: str, path: str) -> str:
        """The model's own spelling of a module path read from a file, or ``path`` when it has none.

        CLIP text encoders are spelled two ways: files in the wild say ``text_model.encoder.…``
        (transformers 4), while transformers 5's CLIPTextModel has no ``text_model.`` level (its
        CLIPTextModelWithProjection keeps it). Either spelling resolves to the layer the model has.
        """
        paths = self.module_shapes.get(component, {})
        if path in paths:
            return path
        other = path[len(_CLIP_WRAPPER) :] if path.startswith(_CLIP_WRAPPER) else _CLIP_WRAPPER + path
        return other if other in paths else path
