"""A text-only stand-in for transformers' ``Qwen3VLProcessor``, for the tiny Flux.3 pipeline.

The real processor cannot be built without torchvision (its video processor needs it), and the tiny
models must build offline with the project's own dependencies. Flux.3's text step
(``Flux3TextEncoderStep._get_qwen3_vl_prompt_embeds``) uses exactly two members of the processor:
``apply_chat_template(..., tokenize=False)`` and ``tokenizer(...)``. This class has those, over the
built-in Qwen tokenizer (:func:`.llm_tokenizers.build_qwen_tokenizer`, which carries Qwen3-VL's vision
tokens), plus the token look-ups the tiny text encoder's config is filled from.
"""

from __future__ import annotations

from typing import Any

from .llm_tokenizers import build_qwen_tokenizer

__all__ = ["TinyQwen3VLProcessor", "build_qwen3_vl_processor"]


class TinyQwen3VLProcessor:
    """The text half of a Qwen3-VL processor: a chat template and a tokenizer (no image or video input)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.chat_template = tokenizer.chat_template

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any:
        return self.tokenizer.apply_chat_template(conversation, **kwargs)

    def __len__(self) -> int:
        return len(self.tokenizer)

    def convert_tokens_to_ids(self, tokens: Any) -> Any:
        return self.tokenizer.convert_tokens_to_ids(tokens)

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.eos_token_id


def build_qwen3_vl_processor() -> TinyQwen3VLProcessor:
    """A fresh stand-in processor over the built-in Qwen tokenizer."""
    return TinyQwen3VLProcessor(build_qwen_tokenizer())
