"""The original Stability (SGM / LDM) names of diffusers UNet modules.

kohya trains SDXL on the original UNet, so SDXL files name UNet layers ``input_blocks.4.1…``,
``middle_block.1…`` and ``output_blocks.3.1…`` instead of diffusers' ``down_blocks.1.attentions.0…``.
This module maps a diffusers module path to its SGM path, forwards only: the SGM index of a block is
computed from a :class:`UNetLayout` (block counts, layers per block, which blocks have attentions),
so the same code names the real SDXL UNet and the tiny test one.

The SGM layout, with L = layers per block:

* ``input_blocks.0.0`` = ``conv_in``; down block i, layer j → ``input_blocks[1 + i·(L+1) + j]`` with
  ``.0`` the resnet and ``.1`` the attention; the downsampler of block i → ``input_blocks[(i+1)·(L+1)].0.op``
  (the last down block has none);
* ``middle_block``: resnet, attention, resnet (``.0``, ``.1``, ``.2``);
* up block i, layer j (L+1 layers) → ``output_blocks[i·(L+1) + j]``, ``.0`` resnet, ``.1`` attention;
  the upsampler sits after them in the block's last layer (``.2.conv``, or ``.1.conv`` without attention);
* resnet parts: ``conv1`` = ``in_layers.2``, ``time_emb_proj`` = ``emb_layers.1``, ``conv2`` =
  ``out_layers.3``, ``conv_shortcut`` = ``skip_connection``; ``time_embed.0/2``, ``label_emb.0.0/2``
  and ``out.2`` (``conv_out``) outside the blocks. Attention internals keep their diffusers names.

This is the mapping of diffusers' ``_maybe_map_sgm_blocks_to_diffusers`` and of the original UNet in
kohya's ``sdxl_original_unet``, written forwards.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import UnsupportedModelError

_RESNET_PARTS = {
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_OUTSIDE_BLOCKS = {
    "conv_in": "input_blocks.0.0",
    "conv_out": "out.2",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}
_DOWN = re.compile(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)")
_DOWNSAMPLER = re.compile(r"down_blocks\.(\d+)\.downsamplers\.0\.conv")
_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")
_UP = re.compile(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)")
_UPSAMPLER = re.compile(r"up_blocks\.(\d+)\.upsamplers\.0\.conv")


@dataclass(frozen=True)
class UNetLayout:
    """The block layout of a diffusers ``UNet2DConditionModel``, as far as SGM naming needs it.

    ``down_attentions[i]`` / ``up_attentions[i]``: whether down/up block i has attentions (diffusers
    order: up block 0 is the deepest); ``layers_per_block``: resnets per down block (up blocks have one
    more); ``mid_attention``: whether the mid block interleaves attentions with its resnets.
    """

    layers_per_block: int
    down_attentions: tuple[bool, ...]
    up_attentions: tuple[bool, ...]
    mid_attention: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.layers_per_block, bool) or not isinstance(self.layers_per_block, int):
            raise UnsupportedModelError(f"layers_per_block must be an integer, got {self.layers_per_block!r}")
        if self.layers_per_block < 1:
            raise UnsupportedModelError(f"layers_per_block must be at least 1, got {self.layers_per_block}")
        if not self.down_attentions or len(self.down_attentions) != len(self.up_attentions):
            raise UnsupportedModelError(
                f"a UNet needs as many up blocks as down blocks (at least one), got "
                f"{len(self.down_attentions)} down and {len(self.up_attentions)} up"
            )

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> UNetLayout:
        """The layout of a UNet from its config (``down_block_types``, ``up_block_types``,
        ``layers_per_block``, ``mid_block_type``); a per-block ``layers_per_block`` must be uniform,
        since SGM numbering assumes it is."""
        layers = config.get("layers_per_block", 2)
        if isinstance(layers, Sequence):
            if len(set(layers)) != 1:
                raise UnsupportedModelError(
                    f"layers_per_block {tuple(layers)} differs per block; the SGM block numbering "
                    f"(input_blocks/output_blocks) only exists for a uniform layers_per_block"
                )
            layers = layers[0]
        mid = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
        return cls(
            layers_per_block=layers,
            down_attentions=tuple(_has_attention(t) for t in config["down_block_types"]),
            up_attentions=tuple(_has_attention(t) for t in config["up_block_types"]),
            mid_attention=mid is not None and _has_attention(mid),
        )

    @property
    def num_blocks(self) -> int:
        return len(self.down_attentions)


def _has_attention(block_type: str) -> bool:
    # CrossAttnDownBlock2D, AttnUpBlock2D, SimpleCrossAttn…, UNetMidBlock2DCrossAttn; UNetMidBlock2D
    # is built without attention by UNet2DConditionModel.
    return "Attn" in block_type


def _inner(kind: str, rest: str) -> str | None:
    """The part of a resnet/attention path inside its SGM sub-block; None for unmapped resnet parts."""
    if kind == "attentions":
        return rest
    return _RESNET_PARTS.get(rest)


def sgm_path(path: str, layout: UNetLayout) -> str | None:
    """The SGM path of diffusers UNet module ``path``, or None when it has no SGM counterpart.

    ``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`` → (L = 2)
    ``input_blocks.4.1.transformer_blocks.0.attn1.to_q``.
    """
    if path in _OUTSIDE_BLOCKS:
        return _OUTSIDE_BLOCKS[path]
    L, n = layout.layers_per_block, layout.num_blocks
    if m := _DOWN.fullmatch(path):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), _inner(m[2], m[4])
        if i >= n or j >= L or rest is None or (kind == "attentions" and not layout.down_attentions[i]):
            return None
        return f"input_blocks.{1 + i * (L + 1) + j}.{0 if kind == 'resnets' else 1}.{rest}"
    if m := _DOWNSAMPLER.fullmatch(path):
        i = int(m[1])
        return f"input_blocks.{(i + 1) * (L + 1)}.0.op" if i < n - 1 else None
    if m := _MID.fullmatch(path):
        kind, k, rest = m[1], int(m[2]), _inner(m[1], m[3])
        if rest is None or (kind == "attentions" and not layout.mid_attention):
            return None
        if layout.mid_attention:
            return f"middle_block.{2 * k + (kind == 'attentions')}.{rest}"
        return f"middle_block.{k}.{rest}"
    if m := _UP.fullmatch(path):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), _inner(m[2], m[4])
        if i >= n or j > L or rest is None or (kind == "attentions" and not layout.up_attentions[i]):
            return None
        return f"output_blocks.{i * (L + 1) + j}.{0 if kind == 'resnets' else 1}.{rest}"
    if m := _UPSAMPLER.fullmatch(path):
        i = int(m[1])
        if i >= n - 1:
            return None
        return f"output_blocks.{i * (L + 1) + L}.{2 if layout.up_attentions[i] else 1}.conv"
    return None
