"""Training images: finding them with their captions, loading them safely, checking them, and the bucketed dataset.

Flow: :func:`scan_images` → :func:`validate_images` (every problem at once, before training) →
:class:`BucketedDataset` + :func:`bucket_batches`. Augmentation randomness is a pure function of
``(seed, epoch, sample index)``, so a run resumed mid-epoch sees exactly the samples it would have.
"""

from __future__ import annotations

import bisect
import contextlib
import enum
import hashlib
import itertools
import json
import logging
import os
import random
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageMode, ImageOps

from ..errors import ConfigError, DatasetError
from .buckets import Size, assign_bucket, make_buckets, resize_and_crop
from .captions import process_caption
from .config import MAX_REPEATS
from .epochs import BucketSamples, EpochBatches
from .files import open_regular, read_bounded

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
DEFAULT_MAX_PIXELS = 178_956_970  # PIL's own Image.MAX_IMAGE_PIXELS default
# Decoded pixel data (pixels × the mode's bits per pixel) allowed per image: an 8-bit RGB photo of
# 89 megapixels; a small, well-compressed 16-bit or RGBA file must not inflate to gigabytes.
DEFAULT_MAX_DECODED_BYTES = 256 * 2**20
MAX_CAPTION_BYTES = 64 * 2**10  # far beyond any text encoder's context (CLIP 77 tokens, T5 512)
MAX_METADATA_BYTES = 64 * 2**20  # a metadata.jsonl
METADATA_FILE = "metadata.jsonl"
_REPEATS_FOLDER = re.compile(r"(\d+)_(.+)")
_EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class ImageItem:
    """One training image. ``folder`` names its concept (kohya's ``N_name`` → ``name``).

    ``problems`` holds what :func:`scan_images` found wrong (a caption that is not UTF-8, a symlink
    loop, a bad ``metadata.jsonl`` line) for :func:`validate_images` to report; an item with problems
    whose ``path`` is not a file is only a carrier for them (e.g. the looping link), never an image.
    """

    path: Path
    caption: str
    repeats: int
    folder: str
    is_class: bool = False
    problems: tuple[str, ...] = ()


# ----------------------------------------------------------------------------------------- scanning


@dataclass
class _ScanContext:
    root: Path
    caption_extension: str
    instance_prompt: str
    is_class: bool
    items: list[ImageItem]
    visited: set[tuple[int, int]]


def scan_images(
    root: str | os.PathLike[str],
    *,
    caption_extension: str = ".txt",
    instance_prompt: str = "",
    default_repeats: int = 1,
    is_class: bool = False,
) -> list[ImageItem]:
    """Every image under ``root`` (png/jpg/jpeg/webp/bmp, any case), sorted by path.

    Captions come from the image's same-stem ``caption_extension`` file, else from a
    ``metadata.jsonl`` (diffusers' imagefolder: ``file_name`` relative to that file's folder, ``text``)
    in its folder or one above it, else ``instance_prompt`` (also used for an empty caption file).
    A folder named ``N_name`` (kohya) gives everything below it ``repeats=N`` and ``folder="name"``;
    other items get ``default_repeats`` and their folder's path relative to ``root``. Sub-folders and
    symlinks are followed; hidden entries (``.name``) are skipped. Problems are not raised here but
    carried in :attr:`ImageItem.problems` for :func:`validate_images`.
    """
    root = Path(root)
    if not caption_extension.startswith("."):
        raise ConfigError(f"caption_extension: {caption_extension!r} must start with a dot, e.g. '.txt'")
    if default_repeats < 1:
        raise ConfigError(f"default_repeats: {default_repeats} must be 1 or more")
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder; point the dataset at the folder holding the images")
    ctx = _ScanContext(root, caption_extension, instance_prompt, is_class, [], set())
    root_key = _dir_key(root)
    ctx.visited.add(root_key)
    _scan_dir(ctx, root, (root_key,), default_repeats, None, {})
    return sorted(ctx.items, key=lambda item: str(item.path))


def _scan_dir(
    ctx: _ScanContext,
    directory: Path,
    ancestors: tuple[tuple[int, int], ...],
    repeats: int,
    folder: str | None,
    metadata: dict[str, str],
) -> None:
    metadata = {**metadata, **_read_metadata(ctx, directory)}
    try:
        with os.scandir(directory) as scan:
            entries = sorted((e for e in scan if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as exc:
        _add_problem(ctx, directory, f"folder cannot be listed ({exc})")
        return
    for entry in entries:
        path = Path(entry.path)
        if entry.is_symlink() and not os.path.exists(path):
            _add_problem(ctx, path, "broken or looping symlink; fix or remove it")
        elif entry.is_dir():
            _scan_subdir(ctx, path, ancestors, repeats, folder, metadata)
        elif path.suffix.lower() in IMAGE_EXTENSIONS and not entry.is_file():
            _add_problem(ctx, path, "not a regular file (a FIFO, device or socket); remove it")
        elif path.suffix.lower() in IMAGE_EXTENSIONS:
            label = folder if folder is not None else _relative_folder(ctx.root, directory)
            _add_image(ctx, path, repeats, label, metadata)


def _scan_subdir(
    ctx: _ScanContext,
    path: Path,
    ancestors: tuple[tuple[int, int], ...],
    repeats: int,
    folder: str | None,
    metadata: dict[str, str],
) -> None:
    key = _dir_key(path)
    if key in ancestors:
        _add_problem(ctx, path, f"symlink loop: leads back to {os.path.realpath(path)}; remove the link")
        return
    if key in ctx.visited:
        logger.warning("%s: folder already scanned through another path; its images are used once", path)
        return
    ctx.visited.add(key)
    match = _REPEATS_FOLDER.fullmatch(path.name)
    if match:
        repeats, folder = int(match[1]), match[2]
        if repeats < 1:
            _add_problem(ctx, path, "folder repeat count is 0; rename it with 1 or more (e.g. 1_name)")
            return
        if repeats > MAX_REPEATS:
            _add_problem(ctx, path, f"folder repeat count {repeats} is over the limit of {MAX_REPEATS}; rename "
                         "it with a smaller count (e.g. 10_name)")
            return
    _scan_dir(ctx, path, ancestors + (key,), repeats, folder, metadata)


def _add_image(ctx: _ScanContext, path: Path, repeats: int, folder: str, metadata: dict[str, str]) -> None:
    caption, problems = _read_caption(path.with_suffix(ctx.caption_extension))
    if caption is None:
        caption = metadata.get(os.path.normpath(path))
    if not caption:
        caption = ctx.instance_prompt
    ctx.items.append(ImageItem(path, caption, repeats, folder, ctx.is_class, tuple(problems)))


def _add_problem(ctx: _ScanContext, path: Path, reason: str) -> None:
    ctx.items.append(ImageItem(path, "", 1, path.parent.name, ctx.is_class, (reason,)))


def _read_caption(path: Path) -> tuple[str | None, list[str]]:
    """The caption file's stripped text (``None`` if there is no such file) and its problems."""
    try:
        data = read_bounded(path, MAX_CAPTION_BYTES, "caption file")
    except DatasetError as exc:
        return "", [f"caption file {exc}"]
    if data is None:
        return None, []
    try:
        return data.decode("utf-8-sig").strip(), []
    except UnicodeDecodeError as exc:
        problem = f"caption file {path} is not valid UTF-8 (byte {exc.start}); re-save it as UTF-8"
        return data.decode("utf-8", errors="replace").strip(), [problem]


def _read_metadata(ctx: _ScanContext, directory: Path) -> dict[str, str]:
    """``{normalized image path: text}`` from ``directory/metadata.jsonl``; bad lines become problems."""
    meta_path = directory / METADATA_FILE
    captions: dict[str, str] = {}
    try:
        data = read_bounded(meta_path, MAX_METADATA_BYTES, "metadata file")
        if data is None:
            return {}
        lines = data.decode("utf-8-sig").splitlines()
    except DatasetError as exc:
        _add_problem(ctx, meta_path, str(exc).removeprefix(f"{meta_path}: "))
        return {}
    except UnicodeDecodeError as exc:
        _add_problem(ctx, meta_path, f"cannot be read as UTF-8 text ({exc})")
        return {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            file_name, text = record["file_name"], record["text"]
            if not isinstance(file_name, str) or not isinstance(text, str):
                raise TypeError("file_name and text must be strings")
        except (ValueError, KeyError, TypeError) as exc:
            _add_problem(ctx, meta_path, f"line {number}: not a {{'file_name', 'text'}} JSON object ({exc})")
            continue
        if len(text.encode("utf-8", "surrogatepass")) > MAX_CAPTION_BYTES:
            _add_problem(ctx, meta_path, f"line {number}: the text is over the limit of {MAX_CAPTION_BYTES:,} "
                         "bytes for a caption; shorten it")
            continue
        image_path = directory / file_name
        if not image_path.is_file():
            _add_problem(ctx, meta_path, f"line {number}: file_name {file_name!r} does not exist")
            continue
        captions[os.path.normpath(image_path)] = text.strip()
    return captions


def _dir_key(path: Path) -> tuple[int, int]:
    stat = os.stat(path)  # follows symlinks: the identity of the folder actually reached
    return (stat.st_dev, stat.st_ino)


def _relative_folder(root: Path, directory: Path) -> str:
    relative = directory.relative_to(root).as_posix()
    return root.name if relative == "." else relative


# ------------------------------------------------------------------------------------------ loading


@contextlib.contextmanager
def _open_image(
    path: Path, max_pixels: int, max_bytes: int = DEFAULT_MAX_DECODED_BYTES
) -> Iterator[Image.Image]:
    """``path`` opened lazily (header only) as a regular file, refusing more than ``max_pixels`` pixels
    or ``max_bytes`` of decoded pixel data before any decoding; the image and file close on exit."""
    with open_regular(path) as fh:
        try:
            with warnings.catch_warnings():
                # Our own limit below replaces PIL's warning; PIL's global limit is left untouched.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(fh)
        except Image.DecompressionBombError as exc:
            raise DatasetError(f"{path}: refused as a decompression bomb ({exc})") from exc
        except (OSError, ValueError, SyntaxError) as exc:
            raise DatasetError(f"{path}: not a readable image ({exc}); re-export it or remove it") from exc
        with img:
            _check_limits(path, img, max_pixels, max_bytes)
            yield img


def _check_limits(path: Path, img: Image.Image, max_pixels: int, max_bytes: int) -> None:
    width, height = img.size
    if width * height > max_pixels:
        raise DatasetError(
            f"{path}: {width}x{height} = {width * height} pixels is over the limit of {max_pixels} "
            "(possible decompression bomb); shrink the image or raise max_pixels if it is genuine"
        )
    decoded = width * height * _bits_per_pixel(img.mode) // 8
    if decoded > max_bytes:
        raise DatasetError(
            f"{path}: {width}x{height} {img.mode} decodes to {decoded:,} bytes, over the limit of {max_bytes:,} "
            "(possible decompression bomb); shrink it or save it with 8 bits per channel"
        )


def _bits_per_pixel(mode: str) -> int:
    try:
        info = ImageMode.getmode(mode)
        return len(info.bands) * 8 * int(info.typestr[-1])
    except (KeyError, ValueError, AttributeError):
        return 128  # an unknown mode: assume the widest (4 × 32-bit float)


def _decode(path: Path, img: Image.Image) -> Image.Image:
    try:
        img.load()
        return _to_rgb(ImageOps.exif_transpose(img))
    except Exception as exc:  # PIL's decoders raise many types (OSError, SyntaxError, zlib.error, ...)
        raise DatasetError(
            f"{path}: cannot be decoded ({type(exc).__name__}: {exc}); the file is corrupt or truncated"
        ) from exc


def load_image(path: str | os.PathLike[str], *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The image at ``path`` as 8-bit RGB, upright per its EXIF orientation.

    Transparency is composited on white; grayscale, 16-bit and 32-bit gray are scaled to 8 bits;
    CMYK and other modes are converted. An image over ``max_pixels`` pixels, or one that cannot be
    read or decoded, raises :class:`DatasetError` naming the path.
    """
    path = Path(path)
    with _open_image(path, max_pixels) as img:
        return _decode(path, img)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        return Image.fromarray(_gray_to_uint8(np.asarray(img)), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _gray_to_uint8(values: np.ndarray) -> np.ndarray:
    """Scale high-depth gray to 0..255: float in [0, 1] or [0, 255]; integers as 16-bit unless all ≤ 255.

    Converted a band of rows at a time, so the float64 work space stays small whatever the image size.
    """
    is_float = values.dtype.kind == "f"
    peak = float(values.max()) if values.size else 0.0
    out = np.empty(values.shape, dtype=np.uint8)
    rows = max(1, (1 << 16) // max(1, values.shape[-1] if values.ndim > 1 else values.size))
    for top in range(0, max(1, values.shape[0]), rows):
        band = values[top : top + rows].astype(np.float64)
        if is_float and peak <= 1.0:
            band = band * 255.0
        elif peak > 255:
            band = np.clip(band, 0, 65535) / 257.0
        out[top : top + rows] = np.clip(np.rint(band), 0, 255)
    return out


def image_size(path: str | os.PathLike[str], *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Size:
    """``(width, height)`` of the image as :func:`load_image` returns it (EXIF rotation applied), from the header."""
    path = Path(path)
    with _open_image(path, max_pixels) as img:
        width, height = img.size
        # A PNG's EXIF may sit after the pixel data, and PIL would decode the whole image to find it.
        if img.format == "PNG" and "exif" not in img.info:
            return (width, height)
        try:
            orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
        except Exception:  # noqa: BLE001 - bad EXIF: load_image/validate_images report it when decoding
            orientation = 1
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


# --------------------------------------------------------------------------------------- validation


def validate_images(
    items: Iterable[ImageItem], *, min_side: int, skip_bad: bool, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[list[ImageItem], list[str]]:
    """Check every item before training; returns ``(good items, problem lines)``.

    Each image is opened and decoded once. Problems: unreadable, corrupt or truncated files; a side
    under a quarter of ``min_side`` (and under 2 pixels, whatever ``min_side``); over ``max_pixels``;
    the items' own :attr:`ImageItem.problems`. Each is a ``"path: reason"`` line. Unless ``skip_bad``,
    any problem raises one :class:`DatasetError` listing all of them.
    """
    if min_side < 0:
        raise ConfigError(f"min_side: {min_side} must be 0 or more")
    good: list[ImageItem] = []
    problems: list[str] = []
    for item in items:
        found = [f"{item.path}: {reason}" for reason in item.problems]
        if not item.problems or item.path.is_file():
            image_problem = _check_image(item.path, min_side, max_pixels)
            if image_problem:
                found.append(image_problem)
        if found:
            problems.extend(found)
        else:
            good.append(item)
    if problems and not skip_bad:
        listing = "\n".join(f"  {line}" for line in problems)
        raise DatasetError(
            f"{len(problems)} problem(s) in the training images:\n{listing}\n"
            "Fix or remove these files, or skip them (skip_bad=True)."
        )
    return good, problems


def _check_image(path: Path, min_side: int, max_pixels: int) -> str | None:
    smallest = max(2.0, min_side / 4)
    try:
        with _open_image(path, max_pixels) as img:
            width, height = img.size
            if min(width, height) < smallest:
                return (
                    f"{path}: {width}x{height} pixels is too small (each side must be at least "
                    f"{smallest:g}, a quarter of the smallest bucket side {min_side}); use a larger image"
                )
            _decode(path, img)
    except DatasetError as exc:
        return str(exc)
    return None


# ------------------------------------------------------------------------------------------ dataset


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A stable 64-bit seed for one sample of one epoch (same in every process and Python version)."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class BucketedDataset(torch.utils.data.Dataset):
    """Samples of aspect-ratio-bucketed images: each item appears ``item.repeats`` times per epoch.

    Index ``i`` in ``range(len(self))`` is one *sample*: repeats of an item are distinct samples with
    their own augmentation. ``__getitem__`` returns ``pixel_values`` (float ``[3, H, W]`` in [-1, 1],
    ``(W, H)`` = ``bucket``), ``caption``, SDXL's ``original_size`` / ``crop_top_left`` /
    ``target_size``, ``is_class``, ``path`` and ``bucket``. Its randomness (crop, flip, caption) comes
    only from ``random.Random(sample_seed(seed, epoch, i))``. DataLoader workers copy the dataset:
    call :meth:`set_epoch` before creating each epoch's iterator (not with persistent workers).
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
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        if not items:
            raise DatasetError("no training images; check the dataset folder and its image extensions")
        self.items = list(items)
        self.seed, self.epoch = seed, 0
        self.center_crop, self.flip, self.max_pixels = center_crop, flip, max_pixels
        self.caption_options: dict[str, Any] = {
            "trigger_word": trigger_word,
            "dropout": caption_dropout,
            "shuffle": shuffle_caption,
            "keep_tokens": keep_tokens,
        }
        process_caption("", rng=random.Random(0), **self.caption_options)  # raises ConfigError on bad options
        grid = make_buckets(resolution, bucket_step, min_bucket, max_bucket)
        self.item_buckets: list[Size] = [
            assign_bucket(image_size(item.path, max_pixels=max_pixels), grid, no_upscale=no_upscale, step=bucket_step)
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

    def sample_bucket(self, index: int) -> Size:
        """The ``(width, height)`` bucket of sample ``index``."""
        return self.item_buckets[self.item_index(index)]

    def __getitem__(self, index: int) -> dict[str, Any]:
        item_idx = self.item_index(index)
        item, bucket = self.items[item_idx], self.item_buckets[item_idx]
        rng = random.Random(sample_seed(self.seed, self.epoch, index))
        prepared = resize_and_crop(
            load_image(item.path, max_pixels=self.max_pixels), bucket, center=self.center_crop, rng=rng
        )
        image, (top, left) = prepared.image, prepared.crop_top_left
        if self.flip and rng.random() < 0.5:
            image = ImageOps.mirror(image)
            left = prepared.resized_size[1] - left - bucket[0]  # the same crop, seen in the mirrored image
        options = dict(self.caption_options)
        if item.is_class:
            options["trigger_word"] = ""
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)
        return {
            "pixel_values": (pixels / 127.5 - 1.0).contiguous(),
            "caption": process_caption(item.caption, rng=rng, **options),
            "original_size": prepared.original_size,
            "crop_top_left": (top, left),
            "target_size": prepared.target_size,
            "is_class": item.is_class,
            "path": str(item.path),
            "bucket": bucket,
        }


def bucket_batches(
    dataset: BucketedDataset, batch_size: int, *, seed: int, epoch: int, drop_last: bool = False
) -> EpochBatches:
    """One epoch's batches of sample indices: each batch from one bucket, every sample exactly once.

    Samples are shuffled within their bucket and the batches shuffled across buckets, deterministically
    from ``(seed, epoch)``. ``drop_last`` drops each bucket's incomplete last batch. The batches are
    computed when indexed (:class:`~.epochs.EpochBatches`): memory grows with the number of images,
    not with their repeats.
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
    return EpochBatches(buckets, keys, sample_seed(seed, epoch, -1), batch_size, drop_last)


# -------------------------------------------------------------------------------------- fingerprints


def augmentation_fingerprint(**settings: Any) -> str:
    """sha256 of the settings that change what an image becomes (resolution, crop, flip, ...).

    Values may be JSON scalars, lists/tuples/dicts of them, paths and enums. ``repeats`` is refused:
    it changes how often an image is seen, not what it becomes, and must not invalidate a cache.
    """
    if "repeats" in settings:
        raise ConfigError("repeats: does not change an image's content; leave it out of the fingerprint")

    def encode(value: Any) -> Any:
        if isinstance(value, enum.Enum):
            return value.value
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        raise TypeError(type(value).__name__)

    try:
        text = json.dumps(settings, sort_keys=True, default=encode)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"augmentation settings: a value cannot be fingerprinted ({exc})") from exc
    return hashlib.sha256(text.encode()).hexdigest()


def item_fingerprint(item: ImageItem, augmentation: str = "") -> str:
    """sha256 of the image file's bytes, the caption and ``augmentation`` (see :func:`augmentation_fingerprint`).

    Independent of the path and of repeats, so a renamed or re-counted image keeps its cache entries.
    """
    file_hash = hashlib.sha256()
    try:
        with open_regular(item.path) as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                file_hash.update(chunk)
    except OSError as exc:
        raise DatasetError(f"{item.path}: cannot be read for fingerprinting ({exc})") from exc
    record = json.dumps({"image": file_hash.hexdigest(), "caption": item.caption, "augmentation": augmentation})
    return hashlib.sha256(record.encode()).hexdigest()
