"""Checks a run makes before it spends time: folders it will write, the model's native size, and the
metadata the adapter file will carry (which would otherwise fail only at the final save)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from typing import Any

from ..errors import ConfigError
from ..models.loading import native_size
from .config import LatentCache, TextCache, TrainConfig
from .data_setup import tag_frequency_of

logger = logging.getLogger(__name__)


def native_resolution(pipe: Any) -> int:
    """The image side the pipeline generates by default (a multiple of 8 within 32–4096), as diffusers does."""
    size = native_size(pipe)
    if size is None:
        raise ConfigError("data.resolution: the model does not say its native image size; set data.resolution")
    return min(4096, max(32, size // 8 * 8))


def check_folders(cfg: TrainConfig) -> None:
    """The folders the run writes to must be (or become) folders: checked before the model loads, not at
    the first write. ``data.path`` must be a folder too."""
    folders = {"output.dir": cfg.output.dir}
    if cfg.cache.latents is LatentCache.DISK or cfg.text_cache is TextCache.DISK:
        folders["cache.dir" if cfg.cache.dir else "output.dir"] = cfg.cache_dir
    if cfg.prior.num_images > 0 and cfg.prior.class_dir:
        folders["prior.class_dir"] = cfg.prior.class_dir
    for key, folder in folders.items():
        if os.path.lexists(folder) and not os.path.isdir(folder):
            raise ConfigError(f"{key}: {folder} exists and is not a folder; name a folder (it is created if missing)")
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"{key}: cannot create the folder {folder} ({exc.strerror or exc})") from exc
    if not os.path.isdir(cfg.data.path):
        raise ConfigError(f"data.path: {cfg.data.path} is not a folder of training images")


# safetensors refuses a header over 100 MB (tensor entries included); readers parse JSON values of up
# to 16 MiB. The training metadata gets a budget well inside both.
_MAX_METADATA_BYTES = 32 * 2**20
_MAX_TAG_FREQUENCY_CHARS = 4 * 2**20


def training_metadata(cfg: TrainConfig, items: Sequence[Any]) -> dict[str, str]:
    """The ``ss_*``/``diffusion_lora.*`` keys of the adapter file, within the size a file can carry
    (ConfigError now, rather than a failed save after training)."""
    meta = {
        "ss_steps": str(cfg.train.steps),
        "ss_resolution": f"({cfg.data.resolution}, {cfg.data.resolution})",
        "modelspec.resolution": f"{cfg.data.resolution}x{cfg.data.resolution}",  # what was used, not the family's
        "ss_num_train_images": str(len(items)),
        "ss_tag_frequency": _tag_frequency_json(items),
        "ss_learning_rate": str(cfg.train.learning_rate),
        "diffusion_lora.train_config": json.dumps(cfg.to_dict(), sort_keys=True),
        "diffusion_lora.dataset_size": str(len(items)),
    }
    if cfg.model.quantize is not None:  # QLoRA: the base it was trained on was quantized this way
        meta["diffusion_lora.base_quantize"] = cfg.model.quantize.value
    size = len(json.dumps(meta).encode("utf-8", "surrogatepass"))
    if size > _MAX_METADATA_BYTES:
        biggest = max(meta, key=lambda k: len(meta[k]))
        raise ConfigError(
            f"the adapter file's training metadata would be {size:,} bytes ({biggest}: {len(meta[biggest]):,}), "
            f"over the {_MAX_METADATA_BYTES:,} an adapter file may carry; shorten the longest settings "
            "(data.instance_prompt, data.trigger_word, sample.prompts)"
        )
    return meta


def _tag_frequency_json(items: Sequence[Any]) -> str:
    """kohya's ``ss_tag_frequency`` as JSON; when too big to share, only each folder's most frequent tags."""
    frequency = tag_frequency_of(items)
    text = json.dumps(frequency)
    most = keep = max((len(tags) for tags in frequency.values()), default=0)
    while len(text) > _MAX_TAG_FREQUENCY_CHARS and keep > 0:
        keep //= 2
        text = json.dumps({folder: dict(sorted(tags.items(), key=lambda kv: (-kv[1], kv[0]))[:keep])
                           for folder, tags in frequency.items()})
    if keep < most:
        logger.warning("ss_tag_frequency keeps only the %d most frequent tags of each folder (the full list "
                       "is too big for the file's metadata)", keep)
    return text
