"""Finding the training images under a folder, with their captions and kohya repeat counts.

Captions come from a same-stem text file, a ``metadata.jsonl`` (diffusers' imagefolder) or the
instance prompt. What is wrong with a file or folder (a caption that is not UTF-8, a symlink loop, a
bad ``metadata.jsonl`` line) is carried in :attr:`ImageItem.problems`, for
:func:`~.images.validate_images` to report together with the image problems.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, DatasetError
from .config import MAX_REPEATS
from .files import read_bounded

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
MAX_CAPTION_BYTES = 64 * 2**10  # far beyond any text encoder's context (CLIP 77 tokens, T5 512)
MAX_METADATA_BYTES = 64 * 2**20  # a metadata.jsonl
METADATA_FILE = "metadata.jsonl"
_REPEATS_FOLDER = re.compile(r"(\d+)_(.+)")


@dataclass(frozen=True)
class ImageItem:
    """One training image. ``folder`` names its concept (kohya's ``N_name`` → ``name``).

    ``problems`` holds what :func:`scan_images` found wrong (a caption that is not UTF-8, a symlink
    loop, a bad ``metadata.jsonl`` line) for :func:`~.images.validate_images` to report; an item with problems
    whose ``path`` is not a file is only a carrier for them (e.g. the looping link), never an image.
    """

    path: Path
    caption: str
    repeats: int
    folder: str
    is_class: bool = False
    problems: tuple[str, ...] = ()
    control: Path | None = None  # its paired control/reference image (training.pairs)
    mask: Path | None = None  # its paired inpainting mask, white = repaint (training.pairs)


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
    carried in :attr:`ImageItem.problems` for :func:`~.images.validate_images`.
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
