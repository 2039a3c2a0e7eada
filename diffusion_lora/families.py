"""The registry of model families diffusion_lora supports, as frozen data.

Adding a family means adding one :class:`Family` entry here and one tiny-model builder; no other module
branches on a family's name. Everything that differs between families — the denoiser component, the
text encoders, which layers LoRA targets, the training objective, the block layout used by per-block
weights and the kohya key prefixes — is a field of its entry.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .errors import UnsupportedModelError


class Objective(str, enum.Enum):
    """What the denoiser is trained to predict."""

    EPSILON = "epsilon"
    V_PREDICTION = "v_prediction"
    FLOW_MATCHING = "flow_matching"


@dataclass(frozen=True)
class BlockGroup:
    """A group of denoiser blocks addressable by per-block weights.

    ``pattern`` matches a module path (relative to the denoiser) and captures the block index, or
    captures nothing for a group with a single block (``mid``).
    """

    name: str
    pattern: str
    indexed: bool = True


@dataclass(frozen=True)
class Family:
    """Everything diffusion_lora needs to know about one model family."""

    name: str
    title: str
    denoiser: str  # pipeline component holding the denoiser: "unet" or "transformer"
    denoiser_class: str
    text_encoders: tuple[str, ...]  # every text-encoder component of the pipeline
    lora_text_encoders: tuple[str, ...]  # the ones that get LoRA when text_encoder=True
    objective: Objective
    target_presets: Mapping[str, tuple[str, ...]]  # preset -> module-name suffixes ("*" = all Linear)
    text_encoder_targets: tuple[str, ...]
    block_groups: tuple[BlockGroup, ...]
    kohya_prefixes: Mapping[str, str]  # component -> kohya key prefix
    comfyui_text_encoders: Mapping[str, str]  # ComfyUI's text_encoders.<name> -> component
    kohya_base_model_version: str  # kohya's ss_base_model_version
    modelspec_architecture: str  # ModelSpec 1.0 architecture of a LoRA for this family
    original_implementation: str  # ModelSpec implementation of the family's original checkpoints
    default_resolution: int
    tiny_model: str | None
    matches_config: Callable[[Mapping[str, Any]], bool] = field(repr=False, default=lambda c: True)

    def targets(self, preset: str) -> tuple[str, ...]:
        """Module-name suffixes of the named target preset; raises ConfigError for an unknown one."""
        from .errors import ConfigError

        try:
            return self.target_presets[preset]
        except KeyError:
            raise ConfigError(
                f"targets: unknown preset {preset!r} for family {self.name}; "
                f"choose one of {', '.join(self.target_presets)} or pass a list of module names"
            ) from None

    def block_of(self, module_path: str) -> tuple[str, int | None] | None:
        """The (group, index) a denoiser module belongs to, or None when it is outside every group."""
        for group in self.block_groups:
            m = re.match(group.pattern, module_path)
            if m:
                return group.name, (int(m.group(1)) if group.indexed else None)
        return None


ALL_LINEAR = ("*",)
SGM_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"
_UNET_ATTN = ("to_q", "to_k", "to_v", "to_out.0")
_UNET_FF = ("ff.net.0.proj", "ff.net.2")
_JOINT_ATTN = _UNET_ATTN + ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
_JOINT_FF = _UNET_FF + ("ff_context.net.0.proj", "ff_context.net.2")
_CLIP_ATTN = ("q_proj", "k_proj", "v_proj", "out_proj")

_UNET_BLOCKS = (
    BlockGroup("down", r"down_blocks\.(\d+)\."),
    BlockGroup("mid", r"mid_block\.", indexed=False),
    BlockGroup("up", r"up_blocks\.(\d+)\."),
)
_MMDIT_BLOCKS = (BlockGroup("blocks", r"transformer_blocks\.(\d+)\."),)
_FLUX_BLOCKS = (
    BlockGroup("blocks", r"transformer_blocks\.(\d+)\."),
    BlockGroup("single", r"single_transformer_blocks\.(\d+)\."),
)


def _presets(attn: tuple[str, ...], ff: tuple[str, ...]) -> Mapping[str, tuple[str, ...]]:
    return MappingProxyType({"attn": attn, "attn-ff": attn + ff, "all-linear": ALL_LINEAR})


FAMILIES: Mapping[str, Family] = MappingProxyType(
    {
        f.name: f
        for f in (
            Family(
                name="sd1",
                title="Stable Diffusion 1.x",
                denoiser="unet",
                denoiser_class="UNet2DConditionModel",
                text_encoders=("text_encoder",),
                lora_text_encoders=("text_encoder",),
                objective=Objective.EPSILON,
                target_presets=_presets(_UNET_ATTN, _UNET_FF),
                text_encoder_targets=_CLIP_ATTN,
                block_groups=_UNET_BLOCKS,
                kohya_prefixes=MappingProxyType({"unet": "lora_unet", "text_encoder": "lora_te"}),
                comfyui_text_encoders=MappingProxyType({"clip_l": "text_encoder"}),
                kohya_base_model_version="sd_v1",
                modelspec_architecture="stable-diffusion-v1/lora",
                original_implementation=SGM_IMPLEMENTATION,
                default_resolution=512,
                tiny_model="tiny-sd15",
                matches_config=lambda c: c.get("addition_embed_type") != "text_time"
                and not c.get("use_linear_projection", False),
            ),
            Family(
                name="sd2",
                title="Stable Diffusion 2.x",
                denoiser="unet",
                denoiser_class="UNet2DConditionModel",
                text_encoders=("text_encoder",),
                lora_text_encoders=("text_encoder",),
                objective=Objective.V_PREDICTION,
                target_presets=_presets(_UNET_ATTN, _UNET_FF),
                text_encoder_targets=_CLIP_ATTN,
                block_groups=_UNET_BLOCKS,
                kohya_prefixes=MappingProxyType({"unet": "lora_unet", "text_encoder": "lora_te"}),
                comfyui_text_encoders=MappingProxyType({"clip_h": "text_encoder"}),
                kohya_base_model_version="sd_v2",
                modelspec_architecture="stable-diffusion-v2-768-v/lora",
                original_implementation=SGM_IMPLEMENTATION,
                default_resolution=768,
                tiny_model=None,
                matches_config=lambda c: c.get("addition_embed_type") != "text_time"
                and bool(c.get("use_linear_projection", False)),
            ),
            Family(
                name="sdxl",
                title="Stable Diffusion XL",
                denoiser="unet",
                denoiser_class="UNet2DConditionModel",
                text_encoders=("text_encoder", "text_encoder_2"),
                lora_text_encoders=("text_encoder", "text_encoder_2"),
                objective=Objective.EPSILON,
                target_presets=_presets(_UNET_ATTN, _UNET_FF),
                text_encoder_targets=_CLIP_ATTN,
                block_groups=_UNET_BLOCKS,
                kohya_prefixes=MappingProxyType(
                    {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
                ),
                comfyui_text_encoders=MappingProxyType({"clip_l": "text_encoder", "clip_g": "text_encoder_2"}),
                kohya_base_model_version="sdxl_base_v1-0",
                modelspec_architecture="stable-diffusion-xl-v1-base/lora",
                original_implementation=SGM_IMPLEMENTATION,
                default_resolution=1024,
                tiny_model="tiny-sdxl",
                matches_config=lambda c: c.get("addition_embed_type") == "text_time",
            ),
            Family(
                name="sd3",
                title="Stable Diffusion 3 / 3.5",
                denoiser="transformer",
                denoiser_class="SD3Transformer2DModel",
                text_encoders=("text_encoder", "text_encoder_2", "text_encoder_3"),
                lora_text_encoders=("text_encoder", "text_encoder_2"),
                objective=Objective.FLOW_MATCHING,
                target_presets=_presets(_JOINT_ATTN, _JOINT_FF),
                text_encoder_targets=_CLIP_ATTN,
                block_groups=_MMDIT_BLOCKS,
                kohya_prefixes=MappingProxyType(
                    {
                        "transformer": "lora_unet",
                        "text_encoder": "lora_te1",
                        "text_encoder_2": "lora_te2",
                        "text_encoder_3": "lora_te3",
                    }
                ),
                comfyui_text_encoders=MappingProxyType(
                    {"clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5xxl": "text_encoder_3"}
                ),
                kohya_base_model_version="sd3",
                modelspec_architecture="stable-diffusion-3-medium/lora",
                original_implementation=SGM_IMPLEMENTATION,
                default_resolution=1024,
                tiny_model="tiny-sd3",
            ),
            Family(
                name="flux1",
                title="Flux.1",
                denoiser="transformer",
                denoiser_class="FluxTransformer2DModel",
                text_encoders=("text_encoder", "text_encoder_2"),
                lora_text_encoders=("text_encoder",),
                objective=Objective.FLOW_MATCHING,
                # single blocks have no to_out: their projection is proj_out, reached by attn-ff.
                target_presets=_presets(_JOINT_ATTN, _JOINT_FF + ("proj_mlp", "proj_out")),
                text_encoder_targets=_CLIP_ATTN,
                block_groups=_FLUX_BLOCKS,
                kohya_prefixes=MappingProxyType(
                    {"transformer": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te3"}
                ),
                comfyui_text_encoders=MappingProxyType({"clip_l": "text_encoder", "t5xxl": "text_encoder_2"}),
                kohya_base_model_version="flux1",
                modelspec_architecture="flux-1-dev/lora",
                original_implementation="https://github.com/black-forest-labs/flux",
                default_resolution=1024,
                tiny_model="tiny-flux",
            ),
        )
    }
)


def get_family(name: str) -> Family:
    """The registered family called ``name``; UnsupportedModelError names the valid ones otherwise."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise UnsupportedModelError(
            f"unknown model family {name!r}; known families: {', '.join(FAMILIES)}"
        ) from None


def detect_family(pipe: Any) -> Family:
    """The family of a diffusers pipeline, from its denoiser's class and config.

    Raises UnsupportedModelError when the pipeline has no denoiser of a known family.
    """
    for component in ("unet", "transformer"):
        denoiser = getattr(pipe, component, None)
        if denoiser is None:
            continue
        cls_name = type(denoiser).__name__
        config = dict(getattr(denoiser, "config", {}) or {})
        for family in FAMILIES.values():
            if (
                family.denoiser == component
                and family.denoiser_class == cls_name
                and family.matches_config(config)
            ):
                return family
        raise UnsupportedModelError(
            f"{type(pipe).__name__} has a {component} of class {cls_name}, which belongs to no "
            f"supported family ({', '.join(FAMILIES)}); diffusion_lora cannot place LoRA layers in it"
        )
    raise UnsupportedModelError(
        f"{type(pipe).__name__} has neither a `unet` nor a `transformer` component; "
        f"pass a Stable Diffusion 1.x/2.x, SDXL, SD3 or Flux.1 pipeline"
    )
