"""Sample prompts that carry image inputs: ``"make it winter --image ref.png"``.

Flux.1 Kontext samples need the image to edit, Fill an image and a mask, Control a control image. As in
sd-scripts' and ai-toolkit's sample prompts (``--ctrl_img``), they are options written after the prompt:
``--image PATH``, ``--mask PATH``, ``--control_image PATH`` (paths relative to the working folder).
"""

from __future__ import annotations

import re
from typing import Any

from ..errors import ConfigError
from ..models.image_inputs import image_inputs
from ..models.invoke import check_image_inputs

_OPTIONS = {"image": "image", "mask": "mask_image", "control_image": "control_image"}
_OPTION = re.compile(r"\s--([a-z_]+)\s+(\S+)")


def split_sample_prompt(text: str) -> tuple[str, dict[str, str]]:
    """(prompt, {pipeline argument: path}) of a sample prompt; ConfigError names an unknown option."""
    paths: dict[str, str] = {}
    for m in _OPTION.finditer(text):
        option, path = m.group(1), m.group(2)
        if option not in _OPTIONS:
            raise ConfigError(f"sample.prompts: {text!r}: unknown option --{option}; the options are "
                              + ", ".join(f"--{o} PATH" for o in _OPTIONS))
        if _OPTIONS[option] in paths:
            raise ConfigError(f"sample.prompts: {text!r}: --{option} is given twice")
        paths[_OPTIONS[option]] = path
    return _OPTION.sub("", text).strip(), paths


def sample_plans(pipe: Any, prompts: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """Each sample prompt without its options, with its image inputs read and checked against the pipeline's
    variant (ConfigError naming the prompt for a missing, foreign or unreadable image)."""
    plans = []
    for text in prompts:
        prompt, paths = split_sample_prompt(text)
        try:
            images = image_inputs(paths)
            check_image_inputs(pipe, images)
        except ConfigError as exc:
            raise ConfigError(f"sample.prompts: {text!r}: {exc}") from None
        plans.append((prompt, images))
    return plans
