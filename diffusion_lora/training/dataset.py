"""The bucketed dataset and its batches: each image repeated as its folder says, each batch from one
aspect-ratio bucket.

Augmentation randomness is a pure function of ``(seed, epoch, sample index)``, so a run resumed
mid-epoch sees exactly the samples it would have.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import random
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from ..errors import ConfigError, DatasetError
from .buckets import Prepared, Size, assign_bucket, make_buckets, resize_and_crop
from .captions import process_caption
from .config import MAX_REPEATS
from .epochs import BucketSamples, EpochBatches
from .images import image_size, load_image
from .scan import ImageItem


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A stable 64-bit seed for one sample of one epoch (same in every process and Python version)."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class BucketedDataset(torch.utils.data.Dataset):
    """Samples of aspect-ratio-bucketed images: each item appears ``item.repeats`` times per epoch.

    Index ``i`` in ``range(len(self))`` is one *sample*: repeats of an item are distinct samples with
    their own augmentation. ``__getitem__`` returns ``pixel_values`` (float ``[3, H, W]`` in [-1, 1],
    ``(W, H)`` = ``bucket``), ``caption``, SDXL's ``original_size`` / ``crop_top_left`` /
    ``target_size``, ``is_class``, ``path`` and ``bucket``; for a paired item also ``control_values``
    (like ``pixel_values``) and ``mask_values`` (``[1, H, W]``, 1 = repaint), on the target's pixel grid.
    Its randomness (crop, flip, caption) comes only from ``random.Random(sample_seed(seed, epoch, i))``.
    DataLoader workers copy the dataset: call :meth:`set_epoch` before creating each epoch's iterator
    (not with persistent workers).
    Class (regularization) images never get the trigger word.
    """

    def __init__(
        self,
        items: Sequence[ImageItem],
        *,
        resolution: int,
        seed: int = 0,
        bucket_step: int = 64,
        min_bucket: int = 256,
        max_bucket: int = 2048,
        no_upscale: bool = False,
        center_crop: bool = True,
        flip: bool = False,
        trigger_word: str = "",
        caption_dropout: float = 0.0,
        shuffle_caption: bool = False,
        keep_tokens: int = 0,
    ) -> None:
        if not items:
            raise DatasetError("no training images; check the dataset folder and its image extensions")
        self.items = list(items)
        self.seed, self.epoch = seed, 0
        self.center_crop, self.flip = center_crop, flip
        self.caption_options: dict[str, Any] = {
            "trigger_word": trigger_word,
            "dropout": caption_dropout,
            "shuffle": shuffle_caption,
            "keep_tokens": keep_tokens,
        }
        process_caption("", rng=random.Random(0), **self.caption_options)  # raises ConfigError on bad options
        grid = make_buckets(resolution, bucket_step, min_bucket, max_bucket)
        self.item_buckets: list[Size] = [
            assign_bucket(image_size(item.path), grid, no_upscale=no_upscale, step=bucket_step)
            for item in self.items
        ]
        for item in self.items:
            if not 1 <= item.repeats <= MAX_REPEATS:
                raise DatasetError(f"{item.path}: repeats is {item.repeats}; it must be in [1, {MAX_REPEATS}]")
        self._ends = list(itertools.accumulate(item.repeats for item in self.items))

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentations ``__getitem__`` reproduces."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self._ends[-1]

    def item_index(self, index: int) -> int:
        """The index in :attr:`items` of sample ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample index {index} out of range for {len(self)} samples")
        return bisect.bisect_right(self._ends, index)

    def samples_of(self, item_idx: int) -> range:
        """The sample indices of item ``item_idx`` (one per repeat)."""
        return range(self._ends[item_idx] - self.items[item_idx].repeats, self._ends[item_idx])

    def possible_captions(self) -> set[str] | None:
        """Every caption a step can see, or None when they change from step to step (shuffled tags)."""
        if self.caption_options["shuffle"]:
            return None
        captions = set()
        for item in self.items:
            options = dict(self.caption_options, dropout=0.0)
            if item.is_class:
                options["trigger_word"] = ""
            captions.add(process_caption(item.caption, rng=random.Random(0), **options))
        if self.caption_options["dropout"] > 0:
            captions.add("")
        return captions

    def __getitem__(self, index: int) -> dict[str, Any]:
        item_idx = self.item_index(index)
        item, bucket = self.items[item_idx], self.item_buckets[item_idx]
        rng = random.Random(sample_seed(self.seed, self.epoch, index))
        prepared = resize_and_crop(
            load_image(item.path), bucket, center=self.center_crop, rng=rng
        )
        image, (top, left) = prepared.image, prepared.crop_top_left
        flipped = self.flip and rng.random() < 0.5
        if flipped:
            image = ImageOps.mirror(image)
            left = prepared.resized_size[1] - left - bucket[0]  # the same crop, seen in the mirrored image
        options = dict(self.caption_options)
        if item.is_class:
            options["trigger_word"] = ""
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)
        extra = {}
        if item.control is not None:
            control = _aligned(load_image(item.control), prepared, bucket, flipped)
            extra["control_values"] = _to_tensor(control) / 127.5 - 1.0
        if item.mask is not None:
            mask = _aligned(load_image(item.mask).convert("L"), prepared, bucket, flipped)
            extra["mask_values"] = (_to_tensor(mask) >= 127.5).float()  # binarized like diffusers' mask_processor
        return {
            **extra,
            "pixel_values": (pixels / 127.5 - 1.0).contiguous(),
            "caption": process_caption(item.caption, rng=rng, **options),
            "original_size": prepared.original_size,
            "crop_top_left": (top, left),
            "target_size": prepared.target_size,
            "is_class": item.is_class,
            "path": str(item.path),
            "bucket": bucket,
        }


def _aligned(img: Image.Image, prepared: Prepared, bucket: Size, flipped: bool) -> Image.Image:
    """A control image or mask on the target's pixel grid: resized to the target's resized size, cropped
    and mirrored as the target was, so that pixel (y, x) of both shows the same place."""
    new_h, new_w = prepared.resized_size
    if img.size != (new_w, new_h):
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    top, left = prepared.crop_top_left
    img = img.crop((left, top, left + bucket[0], top + bucket[1]))
    return ImageOps.mirror(img) if flipped else img


def _to_tensor(img: Image.Image) -> torch.Tensor:
    """[C, H, W] float32 in [0, 255]."""
    values = np.asarray(img, dtype=np.float32)
    return torch.from_numpy(values[..., None] if values.ndim == 2 else values).permute(2, 0, 1).contiguous()


def bucket_batches(dataset: BucketedDataset, batch_size: int, *, seed: int, epoch: int) -> EpochBatches:
    """One epoch's batches of sample indices: each batch from one bucket, every sample exactly once.

    Samples are shuffled within their bucket and the batches shuffled across buckets, deterministically
    from ``(seed, epoch)``; a bucket's last batch may be smaller. The batches are computed when indexed
    (:class:`~.epochs.EpochBatches`): memory grows with the number of images, not with their repeats.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size: {batch_size} must be 1 or more")
    groups: dict[Size, list[int]] = {}
    for item_idx, bucket in enumerate(dataset.item_buckets):
        groups.setdefault(bucket, []).append(item_idx)
    buckets = [
        BucketSamples([dataset.samples_of(i).start for i in members], [dataset.items[i].repeats for i in members])
        for _, members in sorted(groups.items())
    ]
    keys = [sample_seed(seed, epoch, -2 - b) for b in range(len(buckets))]  # indices no sample uses
    return EpochBatches(buckets, keys, sample_seed(seed, epoch, -1), batch_size)


def micro_batches(dataset: BucketedDataset, batch_size: int, seed: int, skip: int = 0) -> Iterator[list[int]]:
    """The endless, deterministic stream of micro-batches (epoch after epoch), from micro-batch ``skip`` on."""
    per_epoch = len(bucket_batches(dataset, batch_size, seed=seed, epoch=0))  # the same every epoch
    epoch, first = divmod(skip, per_epoch)
    while True:
        dataset.set_epoch(epoch)
        batches = bucket_batches(dataset, batch_size, seed=seed, epoch=epoch)
        for i in range(first, len(batches)):
            yield batches[i]
        epoch, first = epoch + 1, 0
