"""Flux.1 and Chroma LoRA key names: Black Forest Labs' original module names and diffusers' Flux/Chroma
transformers.

Flux LoRA files in the wild name the transformer's layers three ways, all read by
:func:`.flux_tensors.parse_flux`:

* kohya sd-scripts: ``lora_unet_<flat BFL name>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``
  (``lora_unet_double_blocks_0_img_attn_qkv``);
* OneTrainer: ``lora_transformer_<flat diffusers path>`` (``lora_transformer_transformer_blocks_0_attn_to_q``),
  same suffixes; ``lora_unet_<flat diffusers path>`` (our generic kohya writer) is read the same way;
* ComfyUI: ``diffusion_model.<dotted BFL name>.lora_A.weight`` / ``.lora_B.weight`` (or ``.lora_down`` /
  ``.lora_up``) and ``.alpha``; its trainer adds ``.diff_b``, the change of the layer's bias (split by
  rows like ``up`` for a fused layer).

BFL fuses layers diffusers keeps apart: ``img_attn.qkv`` is diffusers' ``to_q``/``to_k``/``to_v`` stacked
along the output rows, ``single_blocks.N.linear1`` is ``to_q``/``to_k``/``to_v``/``proj_mlp``, and
``final_layer.adaLN_modulation.1`` is ``norm_out.linear`` with its two output halves swapped (BFL computes
(shift, scale), diffusers' AdaLayerNormContinuous (scale, shift)). A LoRA on a fused layer is therefore a
row-split of its up-projection; the split sizes come from :class:`FluxDims`, i.e. from the model itself,
never from Flux.1-dev's 3072. Flat names are not reversible, so reading is a look-up in an index built
by flattening every known name (:func:`flux_index`). Mapping checked against diffusers 0.42's
``convert_flux_transformer_checkpoint_to_diffusers`` and ``_convert_kohya_flux_lora_to_diffusers``.

Chroma (ChromaTransformer2DModel) keeps Flux.1's block names but has no modulation layers (``img_mod``,
``txt_mod``, ``modulation``, ``final_layer.adaLN_modulation``) and no ``time_in``/``vector_in``/``guidance_in``;
instead a ``distilled_guidance_layer`` (the "approximator") computes every modulation at once. The table
lists both; :func:`flux_index` keeps only the names whose modules the model has, so one table serves both
(approximator names checked against diffusers' ``convert_chroma_transformer_checkpoint_to_diffusers``).
This module holds the names only; splitting and fusing the tensors is in :mod:`.flux_tensors`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from functools import lru_cache
from types import MappingProxyType

from ..errors import ConfigError, KeyMappingError
from .kohya import flatten

COMPONENT = "transformer"
KOHYA_PREFIX = "lora_unet_"
ONETRAINER_PREFIX = "lora_transformer_"
COMFYUI_PREFIX = "diffusion_model."
NETWORK_MODULE = "networks.lora_flux"  # what sd-scripts' Flux trainer writes in ss_network_module
DEFAULT_MLP_RATIO = 4.0  # diffusers' FluxSingleTransformerBlock hard-codes it; the config has no such key

Target = tuple[str, slice]  # (diffusers module path, rows of the BFL layer's output it gets)
ALL_ROWS = slice(None)  # the target gets every row: the layer is not fused
# (BFL suffix, ((diffusers suffix, row count: "inner", "mlp", or None for a layer that is not fused), ...))
_Parts = tuple[tuple[str, str | None], ...]
_DOUBLE: tuple[tuple[str, _Parts], ...] = (
    ("img_attn.qkv", (("attn.to_q", "inner"), ("attn.to_k", "inner"), ("attn.to_v", "inner"))),
    ("img_attn.proj", (("attn.to_out.0", None),)),
    ("img_mlp.0", (("ff.net.0.proj", None),)),
    ("img_mlp.2", (("ff.net.2", None),)),
    ("img_mod.lin", (("norm1.linear", None),)),  # (shift, scale, gate) ×2 in both: no swap
    ("txt_attn.qkv", (("attn.add_q_proj", "inner"), ("attn.add_k_proj", "inner"), ("attn.add_v_proj", "inner"))),
    ("txt_attn.proj", (("attn.to_add_out", None),)),
    ("txt_mlp.0", (("ff_context.net.0.proj", None),)),
    ("txt_mlp.2", (("ff_context.net.2", None),)),
    ("txt_mod.lin", (("norm1_context.linear", None),)),
)
_SINGLE: tuple[tuple[str, _Parts], ...] = (
    ("linear1", (("attn.to_q", "inner"), ("attn.to_k", "inner"), ("attn.to_v", "inner"), ("proj_mlp", "mlp"))),
    ("linear2", (("proj_out", None),)),
    ("modulation.lin", (("norm.linear", None),)),
)
_TOP: tuple[tuple[str, str], ...] = (
    ("img_in", "x_embedder"),
    ("txt_in", "context_embedder"),
    ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
    ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
    ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
    ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
    ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
    ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
    ("final_layer.linear", "proj_out"),
)
_ADALN = "final_layer.adaLN_modulation.1"
# Chroma's approximator: BFL name -> diffusers name; its N residual MLP layers are layers.N.{in,out}_layer
_APPROXIMATOR = "distilled_guidance_layer"
_APPROXIMATOR_ENDS = (("in_proj", "in_proj"), ("out_proj", "out_proj"))
_APPROXIMATOR_LAYER = (("in_layer", "linear_1"), ("out_layer", "linear_2"))

_FLAT_ROLES = {
    "lora_down.weight": "down",
    "lora_up.weight": "up",
    "alpha": "alpha",
    "dora_scale": "dora_scale",
    "diff_b": "diff_b",
}
_DOTTED_ROLES = (
    ("lora_A.weight", "down"),
    ("lora_B.weight", "up"),
    *_FLAT_ROLES.items(),
)


@dataclass(frozen=True)
class FluxDims:
    """The sizes that decide Flux's names and fused-layer splits.

    ``num_double_blocks`` / ``num_single_blocks``: diffusers' ``num_layers`` / ``num_single_layers``;
    ``inner_dim``: rows of each of q, k, v (heads × head dim); ``mlp_hidden_dim``: rows of a single
    block's ``proj_mlp``; ``num_approximator_layers``: Chroma's ``approximator_layers`` (0 for Flux.1).
    Flux.1-dev is (19, 38, 3072, 12288), Chroma1-HD (19, 38, 3072, 12288, 5).
    """

    num_double_blocks: int
    num_single_blocks: int
    inner_dim: int
    mlp_hidden_dim: int
    num_approximator_layers: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            minimum = 0 if f.name.startswith("num_") else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigError(f"FluxDims.{f.name} must be an integer ≥ {minimum}, got {value!r}")

    @classmethod
    def from_config(
        cls, config: Mapping[str, object], module_shapes: Mapping[str, tuple[int, int]] | None = None
    ) -> FluxDims:
        """Dims of a Flux/Chroma transformer from its config (``num_layers``, ``num_single_layers``,
        ``num_attention_heads``, ``attention_head_dim``; ``mlp_ratio`` if present, else diffusers' 4.0;
        Chroma's ``approximator_layers`` if present, else 0).

        ``module_shapes`` (module path → (out, in) of the real Linear layers) is preferred: the split
        sizes are then read from the first block's ``to_q`` and ``proj_mlp``. Raises ConfigError naming a
        missing config key, or when the layers disagree with the config.
        """
        try:
            num_double, num_single = int(config["num_layers"]), int(config["num_single_layers"])
            inner = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
        except KeyError as exc:
            raise ConfigError(
                f"Flux transformer config has no {exc.args[0]!r}; pass FluxTransformer2DModel's config"
            ) from None
        explicit_ratio = "mlp_ratio" in config
        mlp = int(inner * float(config["mlp_ratio"] if explicit_ratio else DEFAULT_MLP_RATIO))
        if module_shapes:
            rows = {path: int(shape[0]) for path, shape in module_shapes.items()}
            q = rows.get("transformer_blocks.0.attn.to_q", rows.get("single_transformer_blocks.0.attn.to_q", inner))
            if q != inner:
                raise ConfigError(f"config gives inner_dim {inner} but the first block's to_q has {q} output rows")
            shape_mlp = rows.get("single_transformer_blocks.0.proj_mlp", mlp)
            if explicit_ratio and shape_mlp != mlp:
                raise ConfigError(f"config mlp_ratio gives mlp_hidden_dim {mlp} but proj_mlp has {shape_mlp} rows")
            mlp = shape_mlp
        return cls(num_double, num_single, inner, mlp, int(config.get("approximator_layers", 0)))


def _targets(prefix: str, parts: _Parts, dims: FluxDims) -> tuple[Target, ...]:
    if len(parts) == 1 and parts[0][1] is None:
        return ((prefix + parts[0][0], ALL_ROWS),)
    out, start = [], 0
    for suffix, size in parts:
        rows = dims.inner_dim if size == "inner" else dims.mlp_hidden_dim
        out.append((prefix + suffix, slice(start, start + rows)))
        start += rows
    return tuple(out)


@lru_cache(maxsize=16)
def bfl_table(dims: FluxDims) -> Mapping[str, tuple[Target, ...]]:
    """Every BFL module name of a Flux transformer (dotted, ``double_blocks.0.img_attn.qkv``) → its targets.

    A target is (diffusers module path, rows of the BFL layer's output it gets). The diffusers module's
    output rows are its targets' row slices concatenated in order: q/k/v get consecutive thirds of
    ``qkv``, and ``norm_out.linear`` gets rows [inner:2·inner] then [0:inner] of ``adaLN_modulation.1``
    (the (shift, scale) → (scale, shift) swap). ``slice(None)``: all rows, the layer is not fused.
    The table holds every name of both layouts (Flux.1's modulation layers, Chroma's approximator when
    ``dims`` has approximator layers); a model lacks some of their modules, see :func:`flux_index`.
    """
    table: dict[str, tuple[Target, ...]] = {bfl: ((path, ALL_ROWS),) for bfl, path in _TOP}
    inner = dims.inner_dim
    table[_ADALN] = (("norm_out.linear", slice(inner, 2 * inner)), ("norm_out.linear", slice(0, inner)))
    if dims.num_approximator_layers:
        for bfl, path in _APPROXIMATOR_ENDS:
            table[f"{_APPROXIMATOR}.{bfl}"] = ((f"{_APPROXIMATOR}.{path}", ALL_ROWS),)
    for i in range(dims.num_approximator_layers):
        for bfl, path in _APPROXIMATOR_LAYER:
            table[f"{_APPROXIMATOR}.layers.{i}.{bfl}"] = ((f"{_APPROXIMATOR}.layers.{i}.{path}", ALL_ROWS),)
    for i in range(dims.num_double_blocks):
        for bfl, parts in _DOUBLE:
            table[f"double_blocks.{i}.{bfl}"] = _targets(f"transformer_blocks.{i}.", parts, dims)
    for i in range(dims.num_single_blocks):
        for bfl, parts in _SINGLE:
            table[f"single_blocks.{i}.{bfl}"] = _targets(f"single_transformer_blocks.{i}.", parts, dims)
    return MappingProxyType(table)


def bfl_targets(bfl_path: str, dims: FluxDims) -> list[Target] | None:
    """The diffusers module path(s) of BFL module ``bfl_path`` (dotted) and the rows of the BFL layer's
    output each gets (see :func:`bfl_table`); None when a Flux model of ``dims`` has no such module."""
    targets = bfl_table(dims).get(bfl_path)
    return list(targets) if targets is not None else None


@dataclass(frozen=True)
class FluxIndex:
    """File module name (prefix included, no ``.lora_down.weight``) → its targets in the model."""

    modules: Mapping[str, tuple[Target, ...]]

    def resolve(self, name: str) -> tuple[Target, ...] | None:
        """The targets of file module name ``name``, or None when the model has no such module."""
        return self.modules.get(name)


def flux_index(
    dims: FluxDims, module_paths: Sequence[str], table: Mapping[str, tuple[Target, ...]] | None = None
) -> FluxIndex:
    """Every name a Flux transformer's layers answer to in LoRA files, from ``module_paths`` (the
    transformer's Linear layer paths) and ``dims``; ``table`` is the BFL layout (Flux.1's
    :func:`bfl_table` by default, Flux.2's ``flux2_names.bfl2_table``).

    BFL names are listed only when all their diffusers modules exist (``guidance_in`` needs guidance
    embeds; Chroma has no modulation layers). Raises KeyMappingError if two modules flatten to the same name.
    """
    paths = set(module_paths)
    modules: dict[str, tuple[Target, ...]] = {}
    for bfl, targets in (bfl_table(dims) if table is None else table).items():
        if all(path in paths for path, _ in targets):
            _add(modules, KOHYA_PREFIX + flatten(bfl), targets)
            _add(modules, COMFYUI_PREFIX + bfl, targets)
    for path in module_paths:
        for prefix in (ONETRAINER_PREFIX, KOHYA_PREFIX):
            _add(modules, prefix + flatten(path), ((path, ALL_ROWS),))
        _add(modules, COMFYUI_PREFIX + path, ((path, ALL_ROWS),))  # diffusers names under ComfyUI's prefix
    return FluxIndex(MappingProxyType(modules))


def _add(modules: dict[str, tuple[Target, ...]], name: str, targets: tuple[Target, ...]) -> None:
    other = modules.setdefault(name, targets)
    if other != targets:
        raise KeyMappingError(
            f"Flux LoRA name {name!r} fits both {other[0][0]} and {targets[0][0]}; files cannot tell them apart"
        )


def split_key(key: str) -> tuple[str, str] | None:
    """(file module name, role) of a key, role in down/up/alpha/dora_scale; None for other keys."""
    if key.startswith(COMFYUI_PREFIX):
        for suffix, role in _DOTTED_ROLES:
            if key.endswith("." + suffix):
                return key[: -len(suffix) - 1], role
        return None
    name, _, suffix = key.partition(".")
    role = _FLAT_ROLES.get(suffix)
    return (name, role) if role is not None else None
