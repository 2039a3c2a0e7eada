"""Paired training data: a control (reference) image, or a Fill mask, beside each target image.

The convention of ai-toolkit (``control_path``) and musubi-tuner (``control_directory``): a second
folder holds, for each target image, an image with the same file stem (any of the image extensions)
at the same place relative to the folder; captions stay next to the targets. Every pairing is
checked before training: a target without its control image is a DatasetError naming the file
(unless unpaired targets are allowed), two candidates with one stem are ambiguous, and a control
file (or a symlink) that resolves outside its folder is refused.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from ..errors import DatasetError
from .scan import IMAGE_EXTENSIONS, ImageItem


def pair_images(
    items: Sequence[ImageItem], data_root: str | os.PathLike[str], folder: str | os.PathLike[str], *, role: str,
    setting: str, allow_unpaired: bool = False,
) -> list[ImageItem]:
    """``items`` with ``role`` ("control" or "mask") set to the same-stem image under ``folder``.

    A target at ``<data_root>/a/b.png`` pairs with ``<folder>/a/b.<any image extension>``. Class
    (regularization) images are never paired. Raises DatasetError naming ``setting`` and the files
    when ``folder`` is not a folder, a target has no pair (unless ``allow_unpaired``), a stem has two
    candidates, or a candidate is not a regular file inside ``folder`` once symlinks are resolved.
    """
    base = Path(folder)
    if not base.is_dir():
        raise DatasetError(f"{setting}: {folder} is not a folder; point it at the folder of {role} images")
    real_base = os.path.realpath(base)
    root = Path(data_root)
    listings: dict[Path, dict[str, list[Path]]] = {}
    out: list[ImageItem] = []
    problems: list[str] = []
    for item in items:
        if item.is_class:
            out.append(item)
            continue
        where = base / item.path.parent.relative_to(root)
        if where not in listings:
            listings[where] = _images_by_stem(where)
        found = listings[where].get(item.path.stem, [])
        if len(found) > 1:
            problems.append(f"{item.path}: {len(found)} {role} images share its stem "
                            f"({', '.join(p.name for p in found)}); keep one")
            continue
        if not found:
            if not allow_unpaired:
                problems.append(f"{item.path}: no {role} image {where / item.path.stem}.* in {setting}")
            out.append(item)
            continue
        path = found[0]
        real = os.path.realpath(path)
        if os.path.commonpath([real, real_base]) != real_base:
            problems.append(f"{path}: resolves to {real}, outside {setting} ({folder}); copy the file there")
        elif not os.path.isfile(real):
            problems.append(f"{path}: not a regular file")
        else:
            out.append(replace(item, **{role: path}))
    if problems:
        listing = "\n".join(f"  {line}" for line in problems)
        hint = "" if allow_unpaired or role != "control" else (
            "; or set data.allow_unpaired = true to train unpaired targets without a reference")
        raise DatasetError(f"{len(problems)} problem(s) pairing {role} images:\n{listing}\n"
                           f"Add or fix the {role} images{hint}.")
    return out


def _images_by_stem(folder: Path) -> dict[str, list[Path]]:
    by_stem: dict[str, list[Path]] = {}
    try:
        with os.scandir(folder) as entries:
            names = sorted(e.name for e in entries if not e.name.startswith("."))
    except (FileNotFoundError, NotADirectoryError):
        return {}
    except OSError as exc:
        raise DatasetError(f"{folder}: cannot be listed ({exc.strerror or exc})") from None
    for name in names:
        path = folder / name
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            by_stem.setdefault(path.stem, []).append(path)
    return by_stem
