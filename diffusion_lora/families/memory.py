"""What a training step keeps in memory per denoiser block, as data: the inputs of ``train --estimate``.

Activation memory is counted per block (the unit diffusers' gradient checkpointing wraps) as *values per
token per channel*: a block of width ``W`` run on ``T`` tokens in a ``s``-byte compute dtype keeps
``kept · T · W · s`` bytes for its backward without checkpointing, and ``inputs · T · W · s`` (its
checkpointed inputs) with it. Being per channel, one coefficient serves every width of a block class
(Flux.1-dev and Chroma, SD3 medium and 3.5 large). The numbers were measured on this project's CPU
runner with ``bench/memory_probe.py`` (peak RSS of one fwd+bwd+AdamW step of real-width, reduced-depth
models, random bf16 weights, glibc trimming forced; see ``bench/bench_memory.py`` for the table): the
per-block slope between two depths, divided by ``T · W · s``. A denoiser with no block listed here cannot be
sized (the estimate says so).

Keyed by diffusers class names and by :class:`~.kinds.Conditioning`, never by a family's name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from .kinds import Conditioning


@dataclass(frozen=True)
class BlockCost:
    """One block class's activation memory, in values per token per channel (see the module doc).

    ``width`` is the attribute path (on the block) of its channel count. ``tokens`` says which tokens the
    block runs on: ``"joint"`` (image + text, transformers), ``"image"`` (UNet levels: the latent pixels of
    the block's resolution level). ``measured`` says whether ``kept`` was measured (True) or copied from
    a block of the same structure (False). ``kept`` excludes the LoRA layers' own saved inputs, which the
    estimate adds per targeted Linear (float32 LoRA on a 16-bit model keeps a float32 copy of each input)."""

    kept: float
    width: str
    inputs: float = 1.0
    tokens: str = "joint"
    measured: bool = True
    streams: int = 1  # 2: a double-stream block, whose image and text layers come in pairs (to_q / add_q_proj)
    extra: float = 0.65  # what a step holds beyond the saved activations, x the largest block's kept (see below)


# Measured (bench/memory_probe.py, CPU peak RSS, real widths, 1-2 blocks of each kind; slopes between depths):
# Flux.1-dev width 3072 at 1024 image + 512 text tokens (at 256 + 128 tokens the slopes were 10-15 % lower);
# Flux.2 Klein 4B width 3072 at 256 + 128 tokens (its 1+1-block step at 1024 + 512 tokens then came out within
# 1 %); SDXL widths 320/640/1280 in float32 at 256 px (bf16 convolutions are too slow on this CPU; the bf16 run
# at 512 px came out within 5 %).
_FLUX_DOUBLE = BlockCost(kept=13.4, width="attn.to_q.in_features", inputs=1.05, streams=2)
_FLUX_SINGLE = BlockCost(kept=12.8, width="attn.to_q.in_features", inputs=1.0)

BLOCK_COSTS: Mapping[str, BlockCost] = MappingProxyType({
    "FluxTransformerBlock": _FLUX_DOUBLE,
    "FluxSingleTransformerBlock": _FLUX_SINGLE,
    # Chroma's blocks are Flux.1's without the modulation Linears (same activations per token)
    "ChromaTransformerBlock": BlockCost(kept=_FLUX_DOUBLE.kept, width=_FLUX_DOUBLE.width, measured=False, streams=2),
    "ChromaSingleTransformerBlock": BlockCost(kept=_FLUX_SINGLE.kept, width=_FLUX_SINGLE.width, measured=False),
    # Flux.2: SwiGLU MLP of ratio 3, fused qkv+mlp projection in single blocks
    "Flux2TransformerBlock": BlockCost(kept=16.6, width="attn.to_q.in_features", inputs=1.05, streams=2,
                                       extra=1.45),
    "Flux2SingleTransformerBlock": BlockCost(kept=18.3, width="attn.to_qkv_mlp_proj.in_features", extra=1.45),
    # Flux.3 (Flux.2-like blocks) and SD3's MMDiT blocks (Flux.1-like): copied, not measured
    "Flux3SingleTransformerBlock": BlockCost(kept=18.3, width="attn.to_q.in_features", measured=False, extra=1.45),
    "Flux3ModeTransformerBlock": BlockCost(kept=16.6, width="attn.to_q.in_features", measured=False, extra=1.45),
    "JointTransformerBlock": BlockCost(kept=13.4, width="attn.to_q.in_features", inputs=1.05, measured=False,
                                       streams=2),
    # UNets: every resnet and every transformer layer at its level's resolution
    "ResnetBlock2D": BlockCost(kept=8.0, width="conv1.out_channels", inputs=1.0, tokens="image"),
    "BasicTransformerBlock": BlockCost(kept=20.7, width="attn1.to_q.in_features", inputs=1.0, tokens="image"),
})

# ``BlockCost.extra``: what a step holds beyond the blocks' saved activations, as a multiple of the largest
# block's kept bytes (LoRA copies included): the gradient buffers of the block whose backward runs, the
# embedders' and final layer's activations, the float32 loss. With checkpointing that block's activations
# are recomputed first, so the peak adds (1 + extra) x its kept. Fitted per block class on the 1+1-block runs.


# Linears fed by the timestep embedding (adaLN modulation, a resnet's time projection), by module-name suffix:
# their input never requires a gradient, so autograd keeps nothing of them (see DEQUANTIZED_WEIGHTS_KEPT).
TIME_EMBEDDING_LINEARS = ("norm.linear", "norm1.linear", "norm1_context.linear", "time_emb_proj")

# torchao's weight-only tensors (int8, fp8) run F.linear through __torch_function__: autograd records the
# dequantize and then a plain linear, which keeps the dequantized (16-bit) weight for the input's gradient.
# Every such Linear whose input requires a gradient keeps one (measured: 0.568 GB on the 1+1-block Flux.1 model,
# exactly its non-modulation Linears after the first LoRA layer). bitsandbytes' nf4 autograd function keeps the
# packed weight only. Modes listed here pay it: per block without checkpointing, one block's worth with it.
DEQUANTIZED_WEIGHTS_KEPT = ("int8", "fp8")


@dataclass(frozen=True)
class SequenceTokens:
    """Tokens a denoiser step sees: ``text`` context tokens joined to the image stream (0 for UNets, whose
    cross-attention context does not add tokens) and ``image_factor`` image sequences (Kontext's reference
    image doubles them)."""

    text: int
    image_factor: int = 1
    context: int = 0  # tokens of a cross-attention context (UNets: CLIP's 77)


SEQUENCE_TOKENS: Mapping[Conditioning, SequenceTokens] = MappingProxyType({
    Conditioning.UNET: SequenceTokens(0, context=77),
    Conditioning.SDXL: SequenceTokens(0, context=77),
    Conditioning.SD3: SequenceTokens(77 + 256),  # CLIP 77 + T5 256 (the pipeline's max_sequence_length)
    Conditioning.FLUX: SequenceTokens(512),  # T5 512
    Conditioning.FLUX_KONTEXT: SequenceTokens(512, image_factor=2),
    Conditioning.FLUX_FILL: SequenceTokens(512),
    Conditioning.FLUX_CONTROL: SequenceTokens(512),
    Conditioning.FLUX2: SequenceTokens(512),
    Conditioning.FLUX3: SequenceTokens(512),  # captions keep their own length; 512 as an upper bound
    Conditioning.CHROMA: SequenceTokens(512),
})

# Hub ids of published models -> (family, variant): what ``train --estimate`` sizes when the model is
# neither on disk nor in the Hugging Face cache (the estimate never downloads).
PUBLISHED_REPOS: Mapping[str, tuple[str, str]] = MappingProxyType({
    "runwayml/stable-diffusion-v1-5": ("sd1", "sd1"),
    "stable-diffusion-v1-5/stable-diffusion-v1-5": ("sd1", "sd1"),
    "CompVis/stable-diffusion-v1-4": ("sd1", "sd1"),
    "stabilityai/stable-diffusion-2-1": ("sd2", "sd2"),
    "stabilityai/stable-diffusion-xl-base-1.0": ("sdxl", "sdxl"),
    "stabilityai/stable-diffusion-3-medium-diffusers": ("sd3", "sd3"),
    "stabilityai/stable-diffusion-3.5-large": ("sd3", "sd35-large"),
    "stabilityai/stable-diffusion-3.5-large-turbo": ("sd3", "sd35-large"),
    "stabilityai/stable-diffusion-3.5-medium": ("sd3", "sd35-medium"),
    "black-forest-labs/FLUX.1-dev": ("flux1", "flux1"),
    "black-forest-labs/FLUX.1-schnell": ("flux1", "flux1"),
    "black-forest-labs/FLUX.1-Kontext-dev": ("flux1", "flux1-kontext"),
    "black-forest-labs/FLUX.1-Fill-dev": ("flux1", "flux1-fill"),
    "black-forest-labs/FLUX.1-Depth-dev": ("flux1", "flux1-control"),
    "black-forest-labs/FLUX.1-Canny-dev": ("flux1", "flux1-control"),
    "lodestones/Chroma1-HD": ("chroma", "chroma"),
    "black-forest-labs/FLUX.2-dev": ("flux2", "flux2"),
    "black-forest-labs/FLUX.2-klein-4B": ("flux2", "flux2-klein"),
    "black-forest-labs/FLUX.2-klein-base-4B": ("flux2", "flux2-klein"),
    "black-forest-labs/FLUX.2-klein-9B": ("flux2", "flux2-klein-9b"),
    "black-forest-labs/FLUX.2-klein-base-9B": ("flux2", "flux2-klein-9b"),
    "black-forest-labs/flux-3-image-klein": ("flux3", "flux3-distilled"),
    "black-forest-labs/flux-3-image-klein-base": ("flux3", "flux3"),
})

# The VAE when a published layout does not include one: every family's published VAE (SD, SDXL, SD3, Flux.1,
# Flux.2) has 83-84 M parameters.
PUBLISHED_VAE_PARAMS = 84_000_000
