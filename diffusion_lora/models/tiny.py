"""Built-in tiny random-weight pipelines of every supported family, for tests, docs and CI.

Each tiny model keeps the module layout of its real family — the same component names, block types,
attention projections (``to_q``/``to_k``/``to_v``/``to_out.0``, joint ``add_q_proj``/... for SD3 and
Flux, ``q_proj``/... in CLIP, ``q``/``k``/``v``/``o`` in T5), text-encoder stack and latent channels —
with hidden sizes of 32–96, so it builds in well under a second and a 2-step 32×32 generation runs in
about a second on a CPU. Weights are random: images are noise, but every code path runs.

The two CLIP encoders differ in width on purpose (a "CLIP-L" of 32 and a "CLIP-G" of 48 channels, as
768 vs 1280 in the real models), so that an adapter put on the wrong text encoder fails loudly.

The configs are plain data in each family's registry entry (``Family.tiny``, written in
``families/tiny.py``); :func:`build_tiny_pipeline` only interprets them.
The built pipeline records its name: ``pipe.name_or_path == "tiny-sd15"`` (``pipe.config._name_or_path``).
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import diffusers
import torch
import transformers
from diffusers import DiffusionPipeline

from ..errors import ModelLoadError
from ..families import ComponentSpec, PipelineSpec, tiny_models
from .llm_tokenizers import build_mistral_tokenizer, build_qwen_tokenizer
from .qwen_vl_processor import build_qwen3_vl_processor
from .tokenizers import (
    CLIP_MAX_LENGTH,
    build_clip_tokenizer,
    build_t5_tokenizer,
    clip_vocab_size,
    t5_vocab_size,
)

__all__ = ["TINY_MODELS", "TINY_SPECS", "TinyComponent", "TinySpec", "build_tiny_pipeline", "missing_classes"]

logger = logging.getLogger(__name__)


# The tiny pipelines are registry data (families/tiny.py); the names of the old spec classes stay.
TinyComponent = ComponentSpec
TinySpec = PipelineSpec
TINY_SPECS: Mapping[str, PipelineSpec] = MappingProxyType(
    {name: variant.tiny for name, (_, variant) in tiny_models().items()}
)
TINY_MODELS: tuple[str, ...] = tuple(TINY_SPECS)

_TOKENIZERS = {
    "CLIPTokenizer": build_clip_tokenizer,
    "T5TokenizerFast": build_t5_tokenizer,
    "Qwen2Tokenizer": build_qwen_tokenizer,
    "LlamaTokenizer": build_mistral_tokenizer,
    "Qwen3VLProcessor": build_qwen3_vl_processor,  # text-only stand-in: the real one needs torchvision
}
_SIZED_TEXT_ENCODERS = frozenset({"CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel"})
# A text-encoder config value "tokenizer:<what>" is filled from the pipeline's tokenizer: "tokenizer:len"
# (vocabulary size), "tokenizer:<attribute>" (e.g. pad_token_id) or "tokenizer:id:<token>".
_FROM_TOKENIZER = "tokenizer:"


def _text_config(component: ComponentSpec) -> transformers.PretrainedConfig:
    """The transformers config of a text encoder, with token ids that match the built-in tokenizers."""
    if component.cls.startswith("CLIP"):
        vocab = clip_vocab_size()
        # <|startoftext|>, <|endoftext|> are the two last ids; <|endoftext|> also pads.
        return transformers.CLIPTextConfig(
            **component.config,
            vocab_size=vocab,
            max_position_embeddings=CLIP_MAX_LENGTH,
            bos_token_id=vocab - 2,
            eos_token_id=vocab - 1,
            pad_token_id=vocab - 1,
        )
    return transformers.T5Config(
        **component.config,
        vocab_size=t5_vocab_size(),
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        is_encoder_decoder=False,
        use_cache=False,
    )


def _filled(value: Any, tokenizer: Any) -> Any:
    """``value`` with every "tokenizer:…" string (at any depth) replaced by what the tokenizer says."""
    if isinstance(value, Mapping):
        return {k: _filled(v, tokenizer) for k, v in value.items()}
    if not (isinstance(value, str) and value.startswith(_FROM_TOKENIZER)):
        return value
    what = value[len(_FROM_TOKENIZER) :]
    if what == "len":
        return len(tokenizer)
    if what.startswith("id:"):
        return tokenizer.convert_tokens_to_ids(what[3:])
    return getattr(tokenizer, what)


def _component_seed(seed: int, name: str) -> int:
    """A seed per component, so that each one's weights depend only on (seed, component name)."""
    return (seed * 0x9E3779B1 + zlib.crc32(name.encode())) % (2**63)


def _build_component(component: ComponentSpec, seed: int, tokenizer: Any = None) -> Any:
    """Instantiate one component; modules are initialised from ``torch.manual_seed`` of its seed.

    ``tokenizer`` is the pipeline's ``tokenizer`` component, for text-encoder configs that refer to it.
    """
    if component.cls in _TOKENIZERS:
        return _TOKENIZERS[component.cls]()
    torch.manual_seed(_component_seed(seed, component.name))
    if component.cls in _SIZED_TEXT_ENCODERS:
        return getattr(transformers, component.cls)(_text_config(component)).eval()
    if hasattr(transformers, component.cls):  # any other text encoder: its own config class
        model_cls = getattr(transformers, component.cls)
        return model_cls(model_cls.config_class(**_filled(component.config, tokenizer))).eval()
    obj = getattr(diffusers, component.cls)(**component.config)
    if isinstance(obj, torch.nn.Module):
        _vary_batch_norm_stats(obj, _component_seed(seed, component.name + ".batch_norm"))
        obj.eval()
    return obj


def _vary_batch_norm_stats(module: torch.nn.Module, seed: int) -> None:
    """Give BatchNorm running statistics (Flux.2's latent normalisation) non-trivial values.

    A fresh BatchNorm has mean 0 and variance 1, which would let a missing (de)normalisation pass
    every test unnoticed.
    """
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            with torch.no_grad():
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(1.0 + 0.5 * torch.rand(m.running_var.shape, generator=g))


def _pipeline(spec: PipelineSpec, components: dict[str, Any]) -> Any:
    return getattr(diffusers, spec.pipeline)(**components, **spec.pipeline_kwargs)


def _modular_pipeline(spec: PipelineSpec, components: dict[str, Any]) -> Any:
    """A diffusers modular pipeline from ``spec.blocks`` less ``spec.drop_blocks``, holding ``components``
    (components the spec leaves out, such as Flux.3's guider, are made by the blocks from their defaults)."""
    blocks = getattr(diffusers, str(spec.blocks))()
    for name in spec.drop_blocks:
        blocks.sub_blocks.pop(name)
    pipe = blocks.init_pipeline()
    pipe.update_components(**components)
    if type(pipe).__name__ != spec.pipeline:
        raise ModelLoadError(f"{spec.blocks} made a {type(pipe).__name__}, not the {spec.pipeline} the spec names")
    return pipe


def missing_classes(kind: str) -> list[str]:
    """The classes tiny model ``kind`` needs that the installed diffusers / transformers lack (Flux.3's
    pipeline and transformer arrived in diffusers 0.42): empty when it can be built."""
    spec = TINY_SPECS[kind]
    wanted = [spec.pipeline, *([spec.blocks] if spec.blocks else [])]
    wanted += [c.cls for c in spec.components if c.cls not in _TOKENIZERS]
    return [cls for cls in wanted if not hasattr(diffusers, cls) and not hasattr(transformers, cls)]


def build_tiny_pipeline(kind: str, seed: int = 0) -> DiffusionPipeline:
    """Build the tiny random-weight pipeline ``kind`` (one of :data:`TINY_MODELS`) on the CPU in float32.

    The same ``(kind, seed)`` gives bit-identical weights; another seed gives other weights. The
    global torch RNG state is left as it was. The name is recorded: ``pipe.name_or_path == kind``.

    Raises ModelLoadError for an unknown ``kind``, or one the installed libraries cannot build.
    """
    try:
        spec = TINY_SPECS[kind]
    except KeyError:
        raise ModelLoadError(
            f"unknown tiny model {kind!r}; the built-in tiny models are {', '.join(TINY_MODELS)}"
        ) from None
    missing = missing_classes(kind)
    if missing:
        raise ModelLoadError(
            f"{kind} needs {', '.join(missing)}, which diffusers {diffusers.__version__} / transformers "
            f"{transformers.__version__} do not have; upgrade diffusers to build it"
        )
    with torch.random.fork_rng(devices=[]):
        # tokenizers first: a text encoder's vocabulary size and token ids come from its tokenizer
        components = {c.name: _build_component(c, seed) for c in spec.components if c.cls in _TOKENIZERS}
        tokenizer = components.get("tokenizer")
        components.update(
            {c.name: _build_component(c, seed, tokenizer) for c in spec.components if c.cls not in _TOKENIZERS}
        )
        components = {c.name: components[c.name] for c in spec.components}
    pipe = _modular_pipeline(spec, components) if spec.blocks else _pipeline(spec, components)
    pipe.register_to_config(_name_or_path=kind)
    logger.debug("built tiny pipeline %s (seed %d)", kind, seed)
    return pipe
