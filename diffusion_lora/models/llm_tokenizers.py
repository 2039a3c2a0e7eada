"""Small chat tokenizers for the tiny models whose text encoder is a language model (Flux.2, Flux.3).

Flux.2 dev encodes prompts with Mistral Small, Flux.2 Klein and Flux.3 with Qwen3 (-VL); their
pipelines format each prompt with ``tokenizer.apply_chat_template`` and read hidden states of the
LLM. These tokenizers carry the same special tokens and a chat template of the same shape as the
real ones, over the built-in word list of :mod:`.tokenizers` (one token per listed word), built
offline and in memory.

- Qwen: byte-level BPE (``Qwen2Tokenizer``), ``<|im_start|>role\\n…<|im_end|>`` turns, the empty
  ``<think>`` block that ``enable_thinking=False`` adds, and Qwen3-VL's vision tokens.
- Mistral: SentencePiece-style BPE with byte fallback (``LlamaTokenizer``), ``[SYSTEM_PROMPT]…``
  and ``[INST]…[/INST]`` turns; message content may be a list of ``{"type": "text"}`` parts, as
  ``Flux2Pipeline`` sends it.
"""

from __future__ import annotations

import functools
import string

from transformers import AddedToken, LlamaTokenizer, Qwen2Tokenizer

from .tokenizers import bytes_to_unicode, tiny_words

__all__ = ["build_mistral_tokenizer", "build_qwen_tokenizer"]

_MAX_LENGTH = 131072  # the real models' context; padding is always to an explicit max_length
_QWEN_SPECIALS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>",
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
)
_QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for c in message['content'] %}{%- if c['type'] == 'text' %}{{- c['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)
_MISTRAL_SPECIALS = (
    "<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]",
)
_MISTRAL_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- set text = message['content'] if message['content'] is string else "
    "(message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('')) %}"
    "{%- if message['role'] == 'system' %}{{- '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{- '[INST]' + text + '[/INST]' }}"
    "{%- else %}{{- text + eos_token }}{%- endif %}"
    "{%- endfor %}"
)


def _word_chains(vocab: dict[str, int], start: str) -> list[tuple[str, str]]:
    """Add ``start + word`` prefixes of every listed word to ``vocab``; return the merges, in rank order.

    Each merge appends one character to a prefix, so a listed word after a space is one token.
    """
    merges: list[tuple[str, str]] = []
    for word in tiny_words():
        prefix = start
        for ch in word:
            merged = prefix + ch
            if merged not in vocab:
                vocab[merged] = len(vocab)
                merges.append((prefix, ch))
            prefix = merged
    return merges


@functools.lru_cache(maxsize=1)
def _qwen_tables() -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    chars = bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    merges = _word_chains(vocab, chars[ord(" ")])  # "Ġ": byte-level BPE's space
    for special in _QWEN_SPECIALS:
        vocab[special] = len(vocab)
    return tuple(vocab.items()), tuple(merges)


def build_qwen_tokenizer() -> Qwen2Tokenizer:
    """A fresh Qwen2/Qwen3 byte-level BPE tokenizer with a Qwen3 chat template (pad ``<|endoftext|>``)."""
    vocab, merges = _qwen_tables()
    tok = Qwen2Tokenizer(
        vocab=dict(vocab), merges=list(merges), unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        chat_template=_QWEN_CHAT_TEMPLATE, model_max_length=_MAX_LENGTH,
    )
    tok.add_special_tokens({"additional_special_tokens": [AddedToken(s, special=True) for s in _QWEN_SPECIALS[1:]]})
    return tok


@functools.lru_cache(maxsize=1)
def _mistral_tables() -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    vocab = {s: i for i, s in enumerate(_MISTRAL_SPECIALS)}
    for b in range(256):  # byte fallback for anything outside the word list
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for c in ["\u2581"] + [c for c in string.printable if not c.isspace()]:
        vocab.setdefault(c, len(vocab))
    merges = _word_chains(vocab, "\u2581")
    return tuple(vocab.items()), tuple(merges)


def build_mistral_tokenizer() -> LlamaTokenizer:
    """A fresh Mistral-style BPE tokenizer (byte fallback) with a Mistral Small chat template."""
    vocab, merges = _mistral_tables()
    tok = LlamaTokenizer(
        vocab=dict(vocab), merges=list(merges), unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        pad_token="<pad>", add_prefix_space=True, chat_template=_MISTRAL_CHAT_TEMPLATE,
        model_max_length=_MAX_LENGTH,
    )
    tok.add_special_tokens(
        {"additional_special_tokens": [AddedToken(s, special=True) for s in _MISTRAL_SPECIALS[4:]]}
    )
    return tok
