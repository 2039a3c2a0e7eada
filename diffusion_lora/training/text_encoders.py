"""Encode every caption once, then free the text encoders for the rest of the run.

The text encoders of today's models are as large as the denoiser or larger (Flux.1's T5-XXL 4.7 B,
Flux.2 dev's Mistral Small 24 B, Klein's Qwen3 4 B / 8 B). A LoRA that does not train them only ever
needs their outputs for a fixed set of captions, so the run encodes that set up front into the text
cache and empties the encoders' weights (zero-size tensors on the same device, so the pipeline's
device and dtype stay what they were): their memory is returned, and the denoiser trains as if they
had never been loaded (kohya's ``--cache_text_encoder_outputs``). Layer shapes are read before that,
for saving the adapter.

Sample images need the encoders too. Before freeing, each sample prompt goes once through the
pipeline's own ``encode_prompt`` exactly as a sample call makes it (the call is stopped when the denoiser
is first called, so every encoding of the call is recorded: Flux.2 Klein's base model encodes the
negative prompt in a second call); afterwards the pipeline's ``encode_prompt`` answers those same calls
from the recording.
A call that was not recorded fails with a clear error instead of running a freed encoder.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from ..errors import ConfigError, DiffusionLoraError
from ..families import Family

logger = logging.getLogger(__name__)


class _Recorded(Exception):
    """Stops a sample call once its prompts are encoded (nothing is denoised while recording)."""


def _call_key(args: tuple, kwargs: dict) -> str:
    return repr((args, sorted(kwargs.items())))


class _RecordedEncodePrompt:
    """A pipeline's ``encode_prompt`` that records calls (then stops them) or replays them."""

    def __init__(self, original: Callable[..., Any]) -> None:
        self.original = original
        self.recorded: dict[str, Any] = {}
        self.recording = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        key = _call_key(args, kwargs)
        if self.recording:
            self.recorded[key] = self.original(*args, **kwargs)
            return copy.deepcopy(self.recorded[key])
        if key not in self.recorded:
            raise DiffusionLoraError(
                "train: a sample prompt that was not encoded before the text encoders were freed; set "
                "cache.text_encoders = \"keep\" to sample other prompts during training"
            )
        return copy.deepcopy(self.recorded[key])  # the pipeline may change what it gets in place


def can_free(pipe: Any, train_text_encoder: bool, text_cached: bool, captions: set[str] | None) -> str | None:
    """Why the text encoders must stay loaded, or None when the run can free them."""
    if train_text_encoder:
        return "lora.text_encoder trains them"
    if not text_cached:
        return "cache.text is off"
    if captions is None:
        return "captions change from step to step (data.shuffle_captions)"
    if not callable(getattr(pipe, "encode_prompt", None)):
        return f"{type(pipe).__name__} encodes prompts inside its blocks, not through encode_prompt"
    return None


def check_free_request(reason: str | None, setting: str) -> bool:
    """Whether to free, for ``cache.text_encoders = setting`` ("auto", "free" or "keep")."""
    if setting == "keep":
        return False
    if reason is None:
        return True
    if setting == "free":
        raise ConfigError(f"cache.text_encoders = \"free\": the text encoders are needed because {reason}; "
                          "use \"auto\" or \"keep\"")
    logger.info("keeping the text encoders loaded: %s", reason)
    return False


def _empty(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            tensor.data = tensor.data.new_empty((0,))


def free_text_encoders(
    pipe: Any, family: Family, encode_caption: Callable[[str], Any], captions: Iterable[str],
    sample_calls: Sequence[Callable[[], Any]],
) -> tuple[str, ...]:
    """Encode ``captions`` (into the text cache, through ``encode_caption``) and record every sample call's
    prompt encoding, then empty the text encoders' weights. Returns the freed components."""
    with torch.no_grad():
        for caption in sorted(captions):
            encode_caption(caption)
    recorder = _RecordedEncodePrompt(pipe.encode_prompt)
    object.__setattr__(pipe, "encode_prompt", recorder)

    def stop(*_: Any) -> None:
        raise _Recorded

    hook = getattr(pipe, family.denoiser).register_forward_pre_hook(stop)
    try:
        for call in sample_calls:
            try:
                with torch.no_grad():
                    call()
            except _Recorded:
                pass
    finally:
        hook.remove()
    recorder.recording = False
    freed = []
    for name in family.text_encoders:
        encoder = getattr(pipe, name, None)
        if isinstance(encoder, torch.nn.Module):
            _empty(encoder)
            freed.append(name)
    logger.info("encoded %d caption(s) and %d sample call(s); freed text encoder(s) %s",
                len(set(captions)), len(sample_calls), ", ".join(freed))
    return tuple(freed)
