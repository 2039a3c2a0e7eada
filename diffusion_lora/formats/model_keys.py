"""The module names of one model — all that reading and writing key formats needs to know about it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

from ..families import Family
from .kohya import KohyaIndex, kohya_index
from .sgm_blocks import UNetLayout


@dataclass(frozen=True)
class ModelKeys:
    """A model family plus the paths of every Linear/Conv2d layer per pipeline component.

    Built from a loaded pipeline (``adapters.state``) or from a real-size reference model on the
    meta device (``models.reference``), so converting files never needs the weights.
    """

    family: Family
    module_paths: Mapping[str, tuple[str, ...]]
    unet_layout: UNetLayout | None = None

    @cached_property
    def kohya(self) -> KohyaIndex:
        """kohya/A1111 name index (SGM aliases for a UNet with a layout)."""
        paths = {c: p for c, p in self.module_paths.items() if c in self.family.kohya_prefixes}
        return kohya_index(
            self.family.kohya_prefixes, paths, self.unet_layout, unet_component=self.family.denoiser
        )
