"""From the config's data sections to a checked, bucketed dataset (class images generated if needed)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import DatasetError
from ..models.invoke import run_pipeline
from .captions import tag_frequency
from .dataset import BucketedDataset
from .files import own_folder, write_output, write_png
from .images import validate_images
from .scan import ImageItem, scan_images

logger = logging.getLogger(__name__)


def _class_items(cfg: Any, pipe: Any, acc: Any) -> list[ImageItem]:
    """DreamBooth class images: those in ``prior.class_dir``, topped up with base-model generations."""
    prior = cfg.prior
    if prior.num_images <= 0:
        return []
    if prior.class_dir:  # the user's folder, wherever it leads
        folder = Path(prior.class_dir)
        folder.mkdir(parents=True, exist_ok=True)
    else:
        folder = own_folder(Path(cfg.output.dir) / "class_images")
    have = scan_images(folder, instance_prompt=prior.class_prompt, is_class=True)
    missing = prior.num_images - len(have)
    if missing > 0 and acc.is_main_process:
        logger.info("generating %d class images for %r with the base model", missing, prior.class_prompt)
        for i in range(len(have), prior.num_images):
            generator = torch.Generator().manual_seed(cfg.train.seed * 7919 + i)
            side = cfg.data.resolution
            with torch.no_grad():
                image = run_pipeline(pipe, prior.class_prompt, generator=generator, height=side, width=side,
                                     num_inference_steps=cfg.sample.steps).images[0]
            write_output(folder / f"class_{i:05d}.txt", prior.class_prompt.encode("utf-8"), "class caption")
            write_png(image, folder / f"class_{i:05d}.png", "class image")
    acc.wait_for_everyone()
    return scan_images(folder, instance_prompt=prior.class_prompt, is_class=True)[: prior.num_images]


def build_dataset(cfg: Any, pipe: Any, acc: Any) -> tuple[BucketedDataset, list[ImageItem]]:
    """Scan, check (every problem reported at once, before training; with ``data.skip_bad_images`` the
    bad ones logged and skipped) and bucket the training images; returns the dataset and its items."""
    d = cfg.data
    if not Path(d.path).is_dir():
        raise DatasetError(f"data.path: {d.path} is not a folder of training images")
    items = scan_images(d.path, caption_extension=d.caption_extension, instance_prompt=d.instance_prompt,
                        default_repeats=d.repeats)
    items += _class_items(cfg, pipe, acc)
    good, problems = validate_images(items, min_side=d.min_bucket, skip_bad=d.skip_bad_images)
    for line in problems:
        logger.warning("skipped: %s", line)
    if not any(not i.is_class for i in good):
        raise DatasetError(f"data.path: no usable training images under {d.path}")
    # buckets = false: one square bucket of the training resolution
    low, high = (d.min_bucket, d.max_bucket) if d.buckets else (d.resolution, d.resolution)
    dataset = BucketedDataset(
        good, resolution=d.resolution, seed=cfg.train.seed, bucket_step=d.bucket_step,
        min_bucket=low, max_bucket=high, no_upscale=d.no_upscale, center_crop=d.center_crop,
        flip=d.flip, trigger_word=d.trigger_word, caption_dropout=d.caption_dropout,
        shuffle_caption=d.shuffle_captions, keep_tokens=d.keep_tokens,
    )
    return dataset, good


def tag_frequency_of(items: Sequence[ImageItem]) -> dict[str, dict[str, int]]:
    """kohya's ``ss_tag_frequency`` of the instance (not class) images."""
    by_folder: dict[str, list[str]] = {}
    for item in items:
        if not item.is_class:
            by_folder.setdefault(item.folder, []).append(item.caption)
    return tag_frequency(by_folder)
