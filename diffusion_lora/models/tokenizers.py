"""Small tokenizers for the built-in tiny models, built offline and in memory.

Nothing is downloaded or read from disk. Both tokenizers share one built-in English word list
(:func:`tiny_words`), chosen so that the captions used in tests and samples ("a small red circle on a
white background", "a watercolor painting of a cat") tokenize to one token per word.

The CLIP tokenizer is a byte-level BPE laid out like OpenAI's: the 256 byte characters, the same with
the ``</w>`` end-of-word suffix, the merged tokens, then ``<|startoftext|>`` and ``<|endoftext|>`` as
the two highest ids (so the legacy "eos is the argmax id" pooling of CLIP also finds the eos token).

Every merge joins one character to a token that ends a word (``"c ircle</w>"``), so words are merged
right to left and exactly one merge applies at any time: a listed word always becomes a single
token, whatever other words are listed, and an unlisted word falls back to its suffix and characters.

Tokenizers are mutable objects (``add_tokens`` for textual inversion, ``model_max_length``), so each
call builds a fresh one; only the immutable vocabulary data is cached.
"""

from __future__ import annotations

import functools
import string

from transformers import CLIPTokenizer, T5TokenizerFast

__all__ = [
    "CLIP_BOS",
    "CLIP_EOS",
    "CLIP_MAX_LENGTH",
    "T5_MAX_LENGTH",
    "build_clip_tokenizer",
    "build_t5_tokenizer",
    "clip_vocab_size",
    "t5_vocab_size",
    "tiny_words",
]

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
CLIP_MAX_LENGTH = 77  # tokens, as in every Stable Diffusion / Flux CLIP text encoder
T5_MAX_LENGTH = 512  # tokens; T5 uses relative positions, so this only bounds padding
_END_OF_WORD = "</w>"
_T5_SPACE = "\u2581"  # SentencePiece's word-start marker

# The word list, grouped so that it is easy to extend. Letters only: CLIP's pre-tokenizer splits
# digits into single characters, which are tokens already.
_WORD_GROUPS: tuple[str, ...] = (
    # function words
    "a an the of on in at to with and or by for from over under above below near next behind "
    "between inside outside into onto is are it its this that there some many few no not very "
    "has have each all other same different one two three four five six seven eight nine ten zero",
    # colours
    "red green blue yellow orange purple pink brown black white gray grey cyan magenta violet "
    "gold golden silver beige teal navy maroon olive dark light bright pale colorful colored "
    "monochrome",
    # shapes
    "circle square triangle star hexagon pentagon octagon diamond heart cross ring oval "
    "rectangle line lines dot arrow spiral crescent moon shape shapes circles squares triangles "
    "stars hearts rings grid",
    # sizes
    "small large big tiny huge medium little giant long short tall wide thin thick",
    # positions
    "left right top bottom center centre middle corner corners side edge upper lower front back",
    # backgrounds and textures
    "background foreground plain empty blank solid striped stripes dotted dots outline outlined "
    "checkered checkerboard filled gradient textured texture pattern smooth rough wooden metal "
    "glass shiny matte noise noisy",
    # art styles
    "painting painted sketch watercolor pixel photo photograph style drawing drawn art artwork "
    "illustration cartoon anime realistic abstract oil pencil ink digital render rendered "
    "minimalist vintage retro portrait landscape flat vector comic lineart",
    # animals
    "cat dog bird fish horse cow pig sheep rabbit mouse lion tiger bear fox wolf owl duck frog "
    "snake butterfly elephant monkey",
    # objects
    "car house tree flower apple ball cup book chair table bottle hat box key clock lamp boat "
    "train plane bicycle sun cloud mountain river sea sky grass water fire snow road city "
    "building window door person man woman face",
    # descriptions and captions
    "image picture photo of high quality detailed simple beautiful old new round sharp soft "
    "hard blurry clear closeup view scene object objects group row pair",
    # common LoRA trigger words
    "sks ohwx",
)


@functools.lru_cache(maxsize=1)
def tiny_words() -> tuple[str, ...]:
    """The built-in word list: lower-case ASCII words, deduplicated and sorted."""
    words = {w for group in _WORD_GROUPS for w in group.split()}
    bad = sorted(w for w in words if not (w.isascii() and w.isalpha() and w.islower()))
    if bad:  # a programming error in _WORD_GROUPS, caught by the first call
        raise ValueError(f"tiny word list has non-lower-case-letter words: {bad}")
    return tuple(sorted(words))


def bytes_to_unicode() -> list[str]:
    """GPT-2's reversible map of the 256 byte values to printable unicode characters, in byte order."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return [mapping[b] for b in range(256)]


@functools.lru_cache(maxsize=1)
def _clip_tables() -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """(tokens in id order, merges as (left, right) pairs in rank order) of the tiny CLIP BPE."""
    chars = bytes_to_unicode()
    tokens: list[str] = chars + [c + _END_OF_WORD for c in chars]
    known = set(tokens)
    merges: list[tuple[str, str]] = []
    for word in tiny_words():
        suffix = word[-1] + _END_OF_WORD
        for i in range(len(word) - 2, -1, -1):
            merged = word[i] + suffix
            if merged not in known:
                known.add(merged)
                tokens.append(merged)
                merges.append((word[i], suffix))
            suffix = merged
    tokens += [CLIP_BOS, CLIP_EOS]
    return tuple(tokens), tuple(merges)


def clip_vocab_size() -> int:
    """Number of ids of the tiny CLIP tokenizer (the ``vocab_size`` of its text encoders)."""
    return len(_clip_tables()[0])


def build_clip_tokenizer() -> CLIPTokenizer:
    """A fresh CLIP BPE tokenizer over the built-in word list; ``model_max_length`` is 77.

    ``<|startoftext|>`` is id ``clip_vocab_size() - 2``, ``<|endoftext|>`` (also the pad and unknown
    token, as in Stable Diffusion 1.x) is id ``clip_vocab_size() - 1``.
    """
    tokens, merges = _clip_tables()
    return CLIPTokenizer(
        vocab={tok: i for i, tok in enumerate(tokens)},
        merges=list(merges),
        model_max_length=CLIP_MAX_LENGTH,
    )


@functools.lru_cache(maxsize=1)
def _t5_pieces() -> tuple[tuple[str, float], ...]:
    """(piece, log-probability) of the tiny T5 Unigram model, in id order."""
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), (_T5_SPACE, -4.0)]
    # Characters cost far more than whole words, so a listed word is always one piece.
    chars = [c for c in string.printable if not c.isspace()]
    pieces += [(c, -10.0) for c in chars]
    pieces += [(_T5_SPACE + c, -9.0) for c in chars]
    pieces += [(_T5_SPACE + w, -2.0) for w in tiny_words() if len(w) > 1]
    return tuple(pieces)


def t5_vocab_size() -> int:
    """Number of ids of the tiny T5 tokenizer (the ``vocab_size`` of its encoder)."""
    return len(_t5_pieces())


def build_t5_tokenizer() -> T5TokenizerFast:
    """A fresh T5 Unigram tokenizer over the built-in word list.

    ``<pad>`` is id 0, ``</s>`` id 1 and ``<unk>`` id 2, as in T5 v1.1; there are no sentinel
    ``<extra_id_*>`` tokens, so ``len(tokenizer) == t5_vocab_size()``.
    """
    return T5TokenizerFast(vocab=list(_t5_pieces()), extra_ids=0, model_max_length=T5_MAX_LENGTH)
