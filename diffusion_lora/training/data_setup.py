"""From the config's data sections to a checked, bucketed dataset (class images generated if needed)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, DatasetError
from ..families import detect_family, detect_variant
from ..models.invoke import run_pipeline
from .captions import tag_frequency
from .conditioning import conditioner_for
from .dataset import BucketedDataset
from .files import own_folder, write_output, write_png
from .images import validate_images
from .pairs import pair_images
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


def _check_paired_settings(d: Any, pipe: Any) -> None:
    """ConfigError when the model needs control images the config does not give, or the config gives
    control images or masks the model does not use."""
    variant = detect_variant(pipe)
    condition = conditioner_for(detect_family(pipe), variant).image_condition
    if condition in ("reference", "control") and not d.control_folder and not (condition == "reference"
                                                                                and d.allow_unpaired):
        raise ConfigError(f"data.control_path: {variant.title} trains from paired images; set it to the folder of "
                          "control images (same file stems as the targets)"
                          + (", or set data.allow_unpaired = true to train text-to-image" if condition == "reference"
                             else ""))
    if d.allow_unpaired and condition == "control":
        raise ConfigError(f"data.allow_unpaired: {variant.title} needs a control image for every target (its input "
                          "layer takes one); set it to false and pair every image")
    if d.control_folder and condition not in ("reference", "control"):
        raise ConfigError(f"data.control_path: {variant.title} ({type(pipe).__name__}) takes no control images; "
                          "remove the setting or train a Kontext or Control model")
    if d.mask_path and condition != "fill":
        raise ConfigError(f"data.mask_path: {variant.title} ({type(pipe).__name__}) takes no masks; remove the "
                          "setting or train a Fill model")


def build_dataset(cfg: Any, pipe: Any, acc: Any) -> tuple[BucketedDataset, list[ImageItem]]:
    """Scan, check (every problem reported at once, before training; with ``data.skip_bad_images`` the
    bad ones logged and skipped) and bucket the training images; returns the dataset and its items."""
    d = cfg.data
    if not Path(d.path).is_dir():
        raise DatasetError(f"data.path: {d.path} is not a folder of training images")
    _check_paired_settings(d, pipe)
    items = scan_images(d.path, caption_extension=d.caption_extension, instance_prompt=d.instance_prompt,
                        default_repeats=d.repeats)
    if d.control_folder:
        setting = "data.control_path" if d.control_path else "data.control_dir"
        items = pair_images(items, d.path, d.control_folder, role="control", setting=setting,
                            allow_unpaired=d.allow_unpaired)
    if d.mask_path:
        items = pair_images(items, d.path, d.mask_path, role="mask", setting="data.mask_path")
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
