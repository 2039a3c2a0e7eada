"""Caption processing with kohya's semantics: comma-separated tags, kept tokens, shuffle, trigger word, dropout."""

from __future__ import annotations

import random
from collections.abc import Mapping

from ..errors import ConfigError


def split_tags(caption: str) -> list[str]:
    """The caption's comma-separated tags, stripped, empty ones dropped."""
    return [tag.strip() for tag in caption.split(",") if tag.strip()]


def process_caption(
    caption: str,
    *,
    trigger_word: str = "",
    dropout: float = 0.0,
    shuffle: bool = False,
    keep_tokens: int = 0,
    rng: random.Random,
) -> str:
    """The caption one training step sees.

    With probability ``dropout`` the whole caption becomes ``""`` (kohya's caption dropout, which
    trains the unconditional prediction). Otherwise the ``trigger_word`` is made the first tag — moved
    there if the caption has it already, never duplicated — and always stays first: it counts as one of
    the ``keep_tokens`` leading tags. With ``shuffle`` the tags after the kept ones are shuffled. A
    caption that is neither shuffled nor given a trigger word is returned stripped but otherwise as
    written; a processed one is re-joined with ``", "``.

    ``rng`` is the only randomness used: one draw for dropout (when ``dropout > 0``) and one shuffle
    (when ``shuffle``), so a seeded ``rng`` gives a reproducible caption.
    """
    if not 0.0 <= dropout <= 1.0:
        raise ConfigError(f"dropout: {dropout} is not a probability; use a value in [0, 1]")
    if keep_tokens < 0:
        raise ConfigError(f"keep_tokens: {keep_tokens} must be 0 or more")
    trigger = trigger_word.strip()
    if "," in trigger:
        raise ConfigError(f"trigger_word: {trigger_word!r} contains a comma; a trigger word is one tag")
    if dropout > 0.0 and rng.random() < dropout:
        return ""
    if not shuffle and not trigger:
        return caption.strip()
    tags = split_tags(caption)
    n_keep = keep_tokens
    if trigger:
        tags = [trigger] + [tag for tag in tags if tag != trigger]
        n_keep = max(n_keep, 1)
    if shuffle:
        rest = tags[n_keep:]
        rng.shuffle(rest)
        tags = tags[:n_keep] + rest
    return ", ".join(tags)


def tag_frequency(captions_by_folder: Mapping[str, list[str]]) -> dict[str, dict[str, int]]:
    """Tag counts per folder, as kohya writes them in ``ss_tag_frequency``: ``{folder: {tag: count}}``.

    As kohya counts them: tags stripped and lower-cased, empty ones skipped, a tag counted each time
    it appears.
    """
    frequency: dict[str, dict[str, int]] = {}
    for folder, captions in captions_by_folder.items():
        counts = frequency.setdefault(folder, {})
        for caption in captions:
            for tag in split_tags(caption):
                tag = tag.lower()
                counts[tag] = counts.get(tag, 0) + 1
    return frequency
