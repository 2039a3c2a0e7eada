"""The registry of model families diffusion_lora supports, as frozen data.

Adding a family means adding one :class:`Family` entry here and one tiny pipeline in
:mod:`.tiny`; no other module branches on a family's name or keeps a table keyed by it. Everything
that differs between families — the denoiser component, the text encoders, which layers LoRA targets,
the training objective and conditioning, the block layout used by per-block weights, the kohya key
names, the evidence that tells a file's family from its keys, the single-file checkpoint types and
the tiny and real-size models — is a field of its entry.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ..errors import ConfigError, UnsupportedModelError
from . import published, tiny
from .kinds import Conditioning, KohyaNames, Objective
from .specs import ComponentSpec, PipelineSpec


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
class Variant:
    """One published model of a family that needs its own pipeline inputs, reference layout, tiny model
    or metadata (Flux.1 Kontext/Fill, SD3.5 Medium, Flux.2 Klein), while sharing the family's module
    names, LoRA targets and file formats.

    A variant is recognised by its pipeline class (``pipelines``) or by its denoiser config
    (``matches_config``); ``None``/empty fields take the family's value (:meth:`Family.all_variants`
    returns them filled in).
    """

    name: str
    title: str
    pipelines: tuple[str, ...] = ()  # pipeline classes that always mean this variant
    matches_config: Callable[[Mapping[str, Any]], bool] | None = field(repr=False, default=None)
    tiny_model: str | None = None  # a built-in tiny pipeline of this variant
    tiny: PipelineSpec | None = field(repr=False, default=None)
    reference: tuple[ComponentSpec, ...] = field(repr=False, default=())  # real-size layout; () = the family's
    conditioning: Conditioning | None = None
    modelspec_architecture: str | None = None
    kohya_base_model_version: str | None = None
    inputs: tuple[str, ...] = ()  # image inputs a generation call needs: "image", "mask_image", "control_image"
    # denoiser Linear layers whose input is wider than in the family's main variant (Flux.1 Fill/Control's
    # x_embedder): a LoRA trained on the main variant loads with zero input columns added, as diffusers does
    widened_inputs: tuple[str, ...] = ()
    # regexes over a file's module names that only this variant's layout has (SD3.5 Medium's attn2); used to
    # pick the reference layout a file's names resolve against when nothing else says which variant it is for
    key_evidence: tuple[str, ...] = ()

    def matches(self, pipeline_class: str, config: Mapping[str, Any]) -> bool:
        """True when a pipeline of class ``pipeline_class`` whose denoiser has ``config`` is this variant."""
        if pipeline_class in self.pipelines:
            return True
        return self.matches_config is not None and self.matches_config(config)


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
    tiny_model: str  # name of the built-in tiny random-weight pipeline
    tiny: PipelineSpec = field(repr=False)  # that pipeline, as data (built by models.tiny)
    reference: tuple[ComponentSpec, ...] = field(repr=False)  # the published model's denoiser + text encoders
    conditioning: Conditioning
    kohya_names: KohyaNames
    # diffusers single-file model types (infer_diffusers_model_type) -> the pipeline class that loads them
    single_file_types: Mapping[str, str]
    # regexes over "<component>.<module path>" (or kohya / ComfyUI) keys that point to this family; a
    # pattern listed by several families points to all of them
    key_evidence: tuple[str, ...] = ()
    context_width: int | None = None  # the real model's cross-attention context width (attn2.to_k input)
    kohya_version_aliases: tuple[str, ...] = ()  # other ss_base_model_version values kohya writes for it
    dynamic_shift: bool = False  # flow-matching shift from the image's sequence length when train.shift is unset
    matches_config: Callable[[Mapping[str, Any]], bool] = field(repr=False, default=lambda c: True)
    # published models of the family beyond the one the fields above describe (tried first, in order)
    variants: tuple[Variant, ...] = ()

    @property
    def main_variant(self) -> Variant:
        """The variant the family's own fields describe (Flux.1-dev, SD3 medium, ...)."""
        return Variant(
            name=self.name, title=self.title, tiny_model=self.tiny_model, tiny=self.tiny, reference=self.reference,
            conditioning=self.conditioning, modelspec_architecture=self.modelspec_architecture,
            kohya_base_model_version=self.kohya_base_model_version,
        )

    @property
    def all_variants(self) -> tuple[Variant, ...]:
        """The main variant, then every extra one with its unset fields taken from the family."""
        main = self.main_variant
        return (main,) + tuple(
            dataclasses.replace(
                v, reference=v.reference or main.reference, conditioning=v.conditioning or main.conditioning,
                modelspec_architecture=v.modelspec_architecture or main.modelspec_architecture,
                kohya_base_model_version=v.kohya_base_model_version or main.kohya_base_model_version,
            )
            for v in self.variants
        )

    def variant(self, name: str) -> Variant:
        """The variant called ``name`` (the family's own name is its main variant)."""
        for v in self.all_variants:
            if v.name == name:
                return v
        raise UnsupportedModelError(
            f"family {self.name} has no variant {name!r}; its variants are "
            f"{', '.join(v.name for v in self.all_variants)}"
        )

    def variant_of(self, pipeline_class: str, config: Mapping[str, Any]) -> Variant:
        """The variant of a pipeline of class ``pipeline_class`` with denoiser ``config`` (main if none)."""
        variants = self.all_variants
        for v in variants[1:]:
            if v.matches(pipeline_class, config):
                return v
        return variants[0]

    def targets(self, preset: str) -> tuple[str, ...]:
        """Module-name suffixes of the named target preset; raises ConfigError for an unknown one."""
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
# every Linear and every Conv2d (kohya's LoCon, LyCORIS' "full" preset): a style that lives in textures
# and colours is drawn by a UNet's convolutions at least as much as by its attention
ALL_LAYERS = ("**",)
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


# joint-attention context projections: SD3 and Flux both have them
_JOINT_EVIDENCE = r"^transformer\.transformer_blocks\.\d+\.attn\.add_[qkv]_proj"
# a CLIP-G second text encoder: SDXL and SD3 both have one (Flux's text_encoder_2 is T5)
_CLIP_G_EVIDENCE = r"^text_encoder_2\.(text_model\.)?encoder\.layers\."
_CLIP_G_FILE_EVIDENCE = r"^lora_te2_|^text_encoders\.clip_g\."
# SD3.5 Medium's MMDiT-X blocks have a second image self-attention; SD3.5 Large has 38 blocks (SD3's 24)
_SD35_MEDIUM_EVIDENCE = r"(joint_blocks[._]\d+[._]x_block|transformer_blocks[._]\d+)[._]attn2[._]"
_SD35_LARGE_EVIDENCE = r"(joint_blocks|transformer_blocks)[._](2[4-9]|3[0-7])[._]"
# layers Flux.1 has and Chroma (Flux.1's blocks; its approximator computes the modulation) has not: the
# modulation Linears and the time/text/guidance embedders (diffusers' double-block norm1.linear, norm_out and
# time_text_embed.timestep/text_embedder are SD3's too, so only single-block and guidance names count there)
_FLUX1_ONLY_EVIDENCE = (
    r"^transformer\.(single_transformer_blocks\.\d+\.norm\.linear|time_text_embed\.guidance_embedder\.)"
    # (SD3's MMDiT and Flux.2 have final_layer.adaLN_modulation, Flux.2 time_in/guidance_in: not evidence)
    r"|^(lora_unet_|diffusion_model\.)(double_blocks[._]\d+[._](img|txt)_mod|single_blocks[._]\d+[._]modulation"
    r"|vector_in[._])"
)


# the final layer's adaLN modulation in original (BFL / MMDiT) names: Flux.1, Flux.2 and SD3 have it; Chroma
# (pruned norm_out) and Flux.3 (final_layer.image.*) have not
_FINAL_ADALN_EVIDENCE = r"^(lora_unet_|diffusion_model\.)final_layer[._]adaLN_modulation"


def _presets(attn: tuple[str, ...], ff: tuple[str, ...]) -> Mapping[str, tuple[str, ...]]:
    return MappingProxyType({"attn": attn, "attn-ff": attn + ff, "all-linear": ALL_LINEAR, "all": ALL_LAYERS})


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
                tiny=tiny.SD15,
                reference=published.SD15,
                conditioning=Conditioning.UNET,
                kohya_names=KohyaNames.DIFFUSERS,
                single_file_types=MappingProxyType(
                    {"v1": "StableDiffusionPipeline", "inpainting": "StableDiffusionInpaintPipeline"}
                ),
                key_evidence=(r"^unet\.down_blocks\.0\.attentions\.", r"^unet\.up_blocks\.3\.attentions\."),
                context_width=768,
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
                tiny_model="tiny-sd2",
                tiny=tiny.SD2,
                reference=published.SD2,
                conditioning=Conditioning.UNET,
                kohya_names=KohyaNames.DIFFUSERS,
                single_file_types=MappingProxyType(
                    {"v2": "StableDiffusionPipeline", "inpainting_v2": "StableDiffusionInpaintPipeline"}
                ),
                key_evidence=(r"^unet\.down_blocks\.0\.attentions\.", r"^unet\.up_blocks\.3\.attentions\."),
                context_width=1024,
                kohya_version_aliases=("sd_v2_768_v",),
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
                tiny=tiny.SDXL,
                reference=published.SDXL,
                conditioning=Conditioning.SDXL,
                kohya_names=KohyaNames.SGM,
                single_file_types=MappingProxyType(
                    {
                        "xl_base": "StableDiffusionXLPipeline",
                        "playground-v2-5": "StableDiffusionXLPipeline",
                        "xl_refiner": "StableDiffusionXLImg2ImgPipeline",
                        "xl_inpaint": "StableDiffusionXLInpaintPipeline",
                    }
                ),
                key_evidence=(
                    _CLIP_G_EVIDENCE,
                    _CLIP_G_FILE_EVIDENCE,
                    # SDXL stacks 2 or 10 transformer blocks per attention; SD1/SD2 have one.
                    r"^unet\.(down|up)_blocks\.\d+\.attentions\.\d+\.transformer_blocks\.[1-9]",
                    r"^unet\.add_embedding\.",
                    r"^(lora_unet_|diffusion_model\.)(input|output)_blocks[._]\d+[._]1[._]transformer_blocks[._][1-9]",
                    r"^lora_unet_(down|up)_blocks_\d+_attentions_\d+_transformer_blocks_[1-9]",
                ),
                context_width=2048,
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
                tiny=tiny.SD3,
                reference=published.SD3,
                conditioning=Conditioning.SD3,
                kohya_names=KohyaNames.MMDIT,
                single_file_types=MappingProxyType(
                    {
                        "sd3": "StableDiffusion3Pipeline",
                        "sd35_medium": "StableDiffusion3Pipeline",
                        "sd35_large": "StableDiffusion3Pipeline",
                    }
                ),
                key_evidence=(
                    r"^transformer\.transformer_blocks\.\d+\.attn2\.",
                    _JOINT_EVIDENCE,
                    _CLIP_G_EVIDENCE,
                    _CLIP_G_FILE_EVIDENCE,
                    r"^(lora_unet_|diffusion_model\.)joint_blocks[._]",
                    _FINAL_ADALN_EVIDENCE,
                ),
                kohya_version_aliases=("medium",),  # sd-scripts' SD3 trainer writes its model type
                # the main variant (SD3 medium) has no qk-norm; the SD3.5 variants are told apart by their config
                variants=(
                    Variant(
                        name="sd35-large",
                        title="Stable Diffusion 3.5 Large",
                        matches_config=lambda c: bool(c.get("qk_norm")) and not c.get("dual_attention_layers"),
                        reference=published.SD35_LARGE,
                        modelspec_architecture="stable-diffusion-3-5-large/lora",
                        kohya_base_model_version="5-large",
                        key_evidence=(_SD35_LARGE_EVIDENCE,),
                    ),
                    Variant(
                        name="sd35-medium",
                        title="Stable Diffusion 3.5 Medium",
                        matches_config=lambda c: bool(c.get("qk_norm")) and bool(c.get("dual_attention_layers")),
                        tiny_model="tiny-sd35",
                        tiny=tiny.SD35,
                        reference=published.SD35_MEDIUM,
                        modelspec_architecture="stable-diffusion-3-5-medium/lora",
                        kohya_base_model_version="5-medium",
                        key_evidence=(_SD35_MEDIUM_EVIDENCE,),
                    ),
                ),
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
                tiny=tiny.FLUX,
                reference=published.FLUX1,
                conditioning=Conditioning.FLUX,
                kohya_names=KohyaNames.BFL,
                single_file_types=MappingProxyType(
                    {
                        "flux-dev": "FluxPipeline",
                        "flux-schnell": "FluxPipeline",
                        "flux-fill": "FluxFillPipeline",
                        "flux-depth": "FluxControlPipeline",
                    }
                ),
                key_evidence=(
                    r"^transformer\.single_transformer_blocks\.",
                    _JOINT_EVIDENCE,
                    r"^text_encoder_2\.encoder\.block\.",  # Flux's second text encoder is T5
                    _FLUX1_ONLY_EVIDENCE,
                    _FINAL_ADALN_EVIDENCE,
                    r"^(lora_unet_|diffusion_model\.)(double|single)_blocks[._]",
                    # BFL names with fal's Kontext trainer's PEFT prefix, or bare (the prefix removed)
                    r"^(base_model\.model\.)?(double|single)_blocks\.\d+\.",
                ),
                dynamic_shift=True,
                variants=(
                    Variant(
                        name="flux1-kontext",
                        title="Flux.1 Kontext",
                        # its transformer config is Flux.1-dev's: only the pipeline class tells them apart
                        pipelines=("FluxKontextPipeline",),
                        tiny_model="tiny-flux-kontext",
                        tiny=tiny.FLUX_KONTEXT,
                        conditioning=Conditioning.FLUX_KONTEXT,
                        modelspec_architecture="flux-1-kontext-dev/lora",
                        inputs=("image",),
                    ),
                    Variant(
                        name="flux1-kontext-inpaint",
                        title="Flux.1 Kontext inpainting",
                        # Kontext's model; the pipeline repaints the mask's white part of `image`
                        pipelines=("FluxKontextInpaintPipeline",),
                        conditioning=Conditioning.FLUX_KONTEXT,
                        modelspec_architecture="flux-1-kontext-dev/lora",
                        inputs=("image", "mask_image"),
                    ),
                    Variant(
                        name="flux1-fill",
                        title="Flux.1 Fill",
                        pipelines=("FluxFillPipeline",),
                        # noisy + masked-image + mask channels: more than twice the output
                        matches_config=lambda c: bool(c.get("out_channels"))
                        and c.get("in_channels", 0) > 2 * c["out_channels"],
                        tiny_model="tiny-flux-fill",
                        tiny=tiny.FLUX_FILL,
                        reference=published.FLUX1_FILL,
                        conditioning=Conditioning.FLUX_FILL,
                        modelspec_architecture="flux-1-fill-dev/lora",
                        inputs=("image", "mask_image"),
                        widened_inputs=("x_embedder",),
                    ),
                    Variant(
                        name="flux1-control",
                        title="Flux.1 Control (Depth/Canny)",
                        pipelines=("FluxControlPipeline", "FluxControlImg2ImgPipeline", "FluxControlInpaintPipeline"),
                        # noisy + control-image channels: twice the output
                        matches_config=lambda c: bool(c.get("out_channels"))
                        and c.get("in_channels", 0) == 2 * c["out_channels"],
                        tiny_model="tiny-flux-control",
                        tiny=tiny.FLUX_CONTROL,
                        reference=published.FLUX1_CONTROL,
                        conditioning=Conditioning.FLUX_CONTROL,
                        inputs=("control_image",),
                        widened_inputs=("x_embedder",),
                    ),
                ),
            ),
            # --- chroma ---
            Family(
                name="chroma",
                title="Chroma",
                denoiser="transformer",
                # used by ChromaPipeline, ChromaImg2ImgPipeline and ChromaInpaintPipeline
                denoiser_class="ChromaTransformer2DModel",
                text_encoders=("text_encoder",),  # T5 only
                # diffusers' Flux mixin would load text_encoder.* into T5, but no Chroma trainer writes T5 LoRAs
                lora_text_encoders=(),
                objective=Objective.FLOW_MATCHING,
                # Flux.1's layout without modulation layers: the same presets reach the same projections
                target_presets=_presets(_JOINT_ATTN, _JOINT_FF + ("proj_mlp", "proj_out")),
                text_encoder_targets=(),
                block_groups=_FLUX_BLOCKS,
                kohya_prefixes=MappingProxyType({"transformer": "lora_unet"}),
                comfyui_text_encoders=MappingProxyType({}),
                kohya_base_model_version="chroma",  # sd-scripts' flux_utils.MODEL_VERSION_CHROMA
                modelspec_architecture="chroma/lora",  # sd-scripts' sai_model_spec.ARCH_FLUX_1_CHROMA
                original_implementation="https://huggingface.co/lodestones/Chroma",
                default_resolution=1024,
                tiny_model="tiny-chroma",
                tiny=tiny.CHROMA,
                reference=published.CHROMA,
                conditioning=Conditioning.CHROMA,
                kohya_names=KohyaNames.BFL,  # Flux.1's names without modulation, plus the approximator's
                single_file_types=MappingProxyType({"chroma": "ChromaPipeline"}),
                key_evidence=(
                    r"^transformer\.distilled_guidance_layer\.",
                    r"^(lora_unet_|lora_transformer_|diffusion_model\.)distilled_guidance_layer[._]",
                    # the same patterns as flux1's: Chroma keeps Flux.1's block names, diffusers' and BFL's
                    r"^transformer\.single_transformer_blocks\.",
                    r"^(lora_unet_|diffusion_model\.)(double|single)_blocks[._]",
                ),
                context_width=4096,  # T5-XXL
                dynamic_shift=True,
            ),
            # --- flux3 ---
            Family(
                name="flux3",
                title="Flux.3",
                denoiser="transformer",
                denoiser_class="Flux3Transformer2DModel",
                text_encoders=("text_encoder",),  # Qwen3-VL; its LoRA loader adapts the transformer only
                lora_text_encoders=(),
                objective=Objective.FLOW_MATCHING,
                # no fused layers and no add_*_proj: text is its own mode (txt_mode_blocks); every block is
                # attn + SwiGLU ff (linear_in holds gate and up).
                target_presets=_presets(_UNET_ATTN, ("linear_in", "linear_out")),
                text_encoder_targets=(),
                # mode_blocks.image_cond.* runs only with reference images (image-to-image); in
                # text-to-image a LoRA there changes nothing.
                block_groups=(
                    BlockGroup("image", r"mode_blocks\.image\.(\d+)\."),
                    BlockGroup("image_cond", r"mode_blocks\.image_cond\.(\d+)\."),
                    BlockGroup("txt", r"txt_mode_blocks\.(\d+)\."),
                    BlockGroup("single", r"single_transformer_blocks\.(\d+)\."),
                ),
                kohya_prefixes=MappingProxyType({"transformer": "lora_unet"}),
                comfyui_text_encoders=MappingProxyType({}),
                # no kohya/musubi Flux.3 trainer exists yet: our own value, as ModelSpec's below
                kohya_base_model_version="flux3",
                modelspec_architecture="flux-3-image/lora",
                original_implementation="https://github.com/black-forest-labs/flux-3-image-klein",
                default_resolution=1024,
                tiny_model="tiny-flux3",
                tiny=tiny.FLUX3,
                reference=published.FLUX3,  # the transformer's class defaults: no published config to read
                conditioning=Conditioning.FLUX3,
                kohya_names=KohyaNames.BFL3,
                # diffusers single-file loading of "flux-3-image" goes through the transformer alone;
                # there is no pipeline-level from_single_file for a modular pipeline
                single_file_types=MappingProxyType({}),
                key_evidence=(
                    r"^transformer\.(txt_)?mode_blocks\.",
                    r"^transformer\.single_transformer_blocks\.\d+\.ff\.linear_(in|out)",
                    r"^(lora_unet_|diffusion_model\.)(content_mode_blocks|txt_mode_blocks)[._]",
                    r"^(lora_unet_|diffusion_model\.)single_blocks[._]\d+[._](q_proj|k_proj|v_proj|attn_out|mlp_in|mlp_out)",
                    # shared with Flux.1 (same spelling): with the patterns above, a Flux.3 file points to flux3
                    # (its BFL names have no double_blocks, and its single_blocks' layers are its own above)
                    r"^transformer\.single_transformer_blocks\.",
                ),
                context_width=20480,  # 8 stacked Qwen3-VL (2560-wide) hidden states
                # constant shift from the scheduler's config (6.93, Flux3SetTimestepsStep), no dynamic shift
                dynamic_shift=False,
                variants=(
                    Variant(
                        name="flux3-distilled",
                        title="Flux.3 (step-distilled)",
                        pipelines=("Flux3DistilledModularPipeline",),
                        matches_config=lambda c: bool(c.get("flow_map", False)),
                        reference=published.FLUX3_DISTILLED,
                    ),
                ),
            ),
            Family(
                name="flux2",
                title="Flux.2",
                denoiser="transformer",
                denoiser_class="Flux2Transformer2DModel",
                text_encoders=("text_encoder",),
                # Mistral Small 24B / Qwen3: trained LoRAs adapt the transformer only (diffusers'
                # Flux2LoraLoaderMixin loads nothing else); training caches the encoder's outputs
                lora_text_encoders=(),
                objective=Objective.FLOW_MATCHING,
                # Single blocks fuse their projections: to_qkv_mlp_proj is q, k, v and the MLP's gate and
                # up rows in one Linear, to_out the attention output and MLP down-projection side by side,
                # so "attn" also adapts the single blocks' MLP (as every Flux.2 trainer does: it is BFL's
                # linear1/linear2). Double blocks' to_out is a ModuleList: the suffix reaches only the
                # single blocks' Linear.
                target_presets=_presets(
                    _JOINT_ATTN + ("to_qkv_mlp_proj", "to_out"),
                    ("linear_in", "linear_out"),  # the SwiGLU feed-forwards of the double blocks
                ),
                text_encoder_targets=(),
                block_groups=_FLUX_BLOCKS,
                kohya_prefixes=MappingProxyType({"transformer": "lora_unet"}),
                comfyui_text_encoders=MappingProxyType({}),
                kohya_base_model_version="flux2_dev",
                modelspec_architecture="Flux.2-dev/lora",  # musubi-tuner's sai_model_spec names
                original_implementation="https://github.com/black-forest-labs/flux2",
                default_resolution=1024,
                tiny_model="tiny-flux2",
                tiny=tiny.FLUX2,
                reference=published.FLUX2_DEV,
                conditioning=Conditioning.FLUX2,
                kohya_names=KohyaNames.BFL2,
                single_file_types=MappingProxyType({}),  # Flux2Pipeline has no from_single_file
                key_evidence=(
                    r"^transformer\.single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out)(\.|$)",
                    r"^transformer\.transformer_blocks\.\d+\.ff(_context)?\.linear_(in|out)(\.|$)",
                    r"^transformer\.(time_guidance_embed|double_stream_modulation_|single_stream_modulation)",
                    r"^(lora_unet_|diffusion_model\.|base_model\.model\.)(double|single)_stream_modulation",
                    r"^base_model\.model\.(double|single)_blocks\.",  # fal's Klein trainer
                    _FINAL_ADALN_EVIDENCE,
                ),
                context_width=15360,  # 3 stacked Mistral Small hidden states
                dynamic_shift=True,
                variants=(
                    Variant(
                        name="flux2-klein-9b",
                        title="Flux.2 Klein 9B",
                        matches_config=lambda c: not c.get("guidance_embeds", True)
                        and c.get("num_attention_heads") == 32,
                        reference=published.FLUX2_KLEIN_9B,
                        modelspec_architecture="Flux.2-klein-9b/lora",
                        kohya_base_model_version="flux2_klein_9b",
                    ),
                    Variant(
                        name="flux2-klein",
                        title="Flux.2 Klein",
                        pipelines=(
                            "Flux2KleinPipeline",
                            "Flux2KleinInpaintPipeline",
                            "Flux2KleinKVPipeline",
                            "Flux2KleinModularPipeline",
                            "Flux2KleinBaseModularPipeline",
                        ),
                        matches_config=lambda c: not c.get("guidance_embeds", True),
                        tiny_model="tiny-flux2-klein",
                        tiny=tiny.FLUX2_KLEIN,
                        reference=published.FLUX2_KLEIN_4B,
                        modelspec_architecture="Flux.2-klein-4b/lora",
                        kohya_base_model_version="flux2_klein_4b",
                    ),
                ),
            ),
        )
    }
)


def supported_titles() -> str:
    """The titles of every registered family, for messages ("Stable Diffusion 1.x, ... or Flux.1")."""
    titles = [f.title for f in FAMILIES.values()]
    return ", ".join(titles[:-1]) + " or " + titles[-1]


def family_of_kohya_version(version: str) -> Family | None:
    """The family of a kohya ``ss_base_model_version`` value, or None when no family writes it."""
    for family in FAMILIES.values():
        versions = {v.kohya_base_model_version for v in family.all_variants} | set(family.kohya_version_aliases)
        if version in versions:
            return family
    return None


def tiny_models() -> Mapping[str, tuple[Family, Variant]]:
    """Every built-in tiny model -> the family and variant it belongs to (registry order)."""
    return MappingProxyType({
        v.tiny_model: (f, v) for f in FAMILIES.values() for v in f.all_variants if v.tiny_model and v.tiny
    })


def family_of_tiny(name: str) -> Family:
    """The family of the built-in tiny model ``name``."""
    try:
        return tiny_models()[name][0]
    except KeyError:
        raise UnsupportedModelError(
            f"unknown tiny model {name!r}; the built-in tiny models are {', '.join(tiny_models())}"
        ) from None


def single_file_pipelines() -> dict[str, str]:
    """Every family's diffusers single-file model types -> the pipeline class that loads them."""
    return {t: p for f in FAMILIES.values() for t, p in f.single_file_types.items()}


def get_family(name: str) -> Family:
    """The registered family called ``name``; UnsupportedModelError names the valid ones otherwise."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise UnsupportedModelError(
            f"unknown model family {name!r}; known families: {', '.join(FAMILIES)}"
        ) from None


def detect_variant(pipe: Any) -> Variant:
    """The variant of a diffusers pipeline (its family's main variant when no other one matches)."""
    family = detect_family(pipe)
    denoiser = getattr(pipe, family.denoiser)
    config = dict(getattr(denoiser, "config", {}) or {})
    return family.variant_of(type(pipe).__name__, config)


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
        f"pass a pipeline of one of these families: {supported_titles()}"
    )
