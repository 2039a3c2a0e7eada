"""AUTOMATIC1111 ``<lora:…>`` prompt tags: parsing them, and resolving them to adapters safely.

A1111's extra-network syntax is ``<TYPE:NAME:ARG:ARG…>``; an ARG is positional or ``key=value``.
For ``lora`` (and ``lyco``, which A1111's built-in Lora extension registers as an alias) the
positional ARGs are the text-encoder weight, the UNet weight (default: the text-encoder weight)
and the DyLoRA rank; ``te=``, ``unet=`` and ``dyn=`` name them. A tag of another type, an empty
name, ``dyn`` (no DyLoRA here) or an unknown argument is an error, never text left in the prompt.

A prompt comes from anyone who can type one, so a tag is not a path: it names a loaded adapter,
or a ``.safetensors`` file inside one of the ``--lora-dir`` folders (a relative path without ``..``
whose real location, after symlinks, is still inside that folder). ``load_lora``/``--lora`` remain
the way to load a file from anywhere.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from .adapters import list_loras, load_lora
from .errors import ConfigError
from .families import detect_family
from .formats.adapter_files import default_adapter_name

_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]*)>")  # A1111's re_extra_net, allowing an empty body to refuse it
_LORA_TYPES = ("lora", "lyco")
_MAX_POSITIONAL = 3  # te, unet, dyn


@dataclass(frozen=True)
class LoraTag:
    """One ``<lora:NAME:TE_WEIGHT:UNET_WEIGHT>`` tag of a prompt.

    ``weight`` applies to the denoiser (A1111's UNet weight); ``text_encoder_weight`` to the text
    encoders, None when it equals ``weight`` (the usual one-weight tag).
    """

    target: str
    weight: float
    text_encoder_weight: float | None = None

    def as_text(self) -> str:
        """The tag in A1111's syntax (the form written back into the PNG parameters)."""
        if self.text_encoder_weight is None:
            return f"<lora:{self.target}:{self.weight:g}>"
        return f"<lora:{self.target}:{self.text_encoder_weight:g}:{self.weight:g}>"


def _number(tag: str, what: str, raw: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise ConfigError(f"prompt tag {tag!r}: {what} {raw.strip()!r} is not a number") from None
    if not math.isfinite(value):
        raise ConfigError(f"prompt tag {tag!r}: {what} must be a finite number, got {raw.strip()!r}")
    return value


def _parse_tag(tag: str, kind: str, body: str) -> LoraTag:
    if kind.lower() not in _LORA_TYPES:
        raise ConfigError(
            f"prompt tag {tag!r}: <{kind}:…> networks are not supported (only <lora:…> and <lyco:…>); "
            "remove the tag"
        )
    name, *args = body.split(":")
    if not name.strip():
        raise ConfigError(f"prompt tag {tag!r}: the adapter name is empty; write <lora:NAME:WEIGHT>")
    positional: list[str] = []
    named: dict[str, str] = {}
    for arg in args:
        key, eq, value = arg.partition("=")
        if eq:
            named[key.strip()] = value
        else:
            positional.append(arg)
    unknown = sorted(set(named) - {"te", "unet", "dyn"})
    if unknown or len(positional) > _MAX_POSITIONAL:
        extra = f"unknown argument(s) {', '.join(unknown)}" if unknown else f"{len(positional)} weights"
        raise ConfigError(
            f"prompt tag {tag!r}: {extra}; A1111's form is <lora:NAME:TE_WEIGHT:UNET_WEIGHT> or te=/unet="
        )
    if len(positional) > 2 or "dyn" in named:
        raise ConfigError(f"prompt tag {tag!r}: dyn (a DyLoRA rank) is not supported; remove it")
    te = _number(tag, "weight", positional[0]) if positional else 1.0
    te = _number(tag, "te weight", named["te"]) if "te" in named else te
    unet = _number(tag, "unet weight", positional[1]) if len(positional) > 1 else te
    unet = _number(tag, "unet weight", named["unet"]) if "unet" in named else unet
    parsed = LoraTag(name.strip(), unet, None if te == unet else te)
    _relative_target(parsed)  # an absolute path or '..' is refused here, before any model loads
    return parsed


def parse_lora_tags(prompt: str) -> tuple[str, list[LoraTag]]:
    """Split A1111 ``<lora:…>``/``<lyco:…>`` tags out of a prompt; weights default to 1.

    Raises ConfigError for a tag that cannot be honoured (see the module docstring), so nothing a
    user wrote as a tag silently stays in the prompt text.
    """
    tags = [_parse_tag(m.group(0), m.group(1), m.group(2)) for m in _EXTRA_NETWORK.finditer(prompt)]
    text = _EXTRA_NETWORK.sub("", prompt)
    clean = re.sub(r"\s+,", ",", re.sub(r"\s{2,}", " ", text)).strip().strip(",").strip()
    return clean, tags


def tag_weight(pipe: Any, tag: LoraTag) -> float | dict[str, float]:
    """The adapter weight a tag asks for: a number, or per-component when the text encoders differ."""
    if tag.text_encoder_weight is None:
        return tag.weight
    encoders = [c for c in detect_family(pipe).text_encoders if getattr(pipe, c, None) is not None]
    return {"default": tag.weight, **{c: tag.text_encoder_weight for c in encoders}}


def _relative_target(tag: LoraTag) -> PurePosixPath:
    target = tag.target
    pure = PurePosixPath(target.replace("\\", "/"))
    if pure.is_absolute() or PureWindowsPath(target).drive or ".." in pure.parts or not pure.parts:
        raise ConfigError(
            f"prompt tag <lora:{target}:…>: a tag names a loaded adapter or a file inside --lora-dir "
            "(a name or relative path without '..'); load a file from elsewhere with --lora PATH"
        )
    name = pure.name if pure.suffix == ".safetensors" else pure.name + ".safetensors"
    return pure.with_name(name)


def find_in_lora_dirs(tag: LoraTag, lora_dirs: Sequence[str | os.PathLike]) -> Path:
    """The one real ``.safetensors`` file a tag names inside the ``lora_dirs`` (symlinks resolved).

    A candidate whose real path leaves its folder is refused; a name found in two folders is
    ambiguous and refused too, rather than silently taking one of them.
    """
    relative = _relative_target(tag)
    found: list[Path] = []
    for folder in lora_dirs:
        try:
            root = Path(folder).resolve()
            candidate = root / relative
            if not candidate.exists():
                continue
            real = candidate.resolve()
        except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop on older Pythons
            raise ConfigError(f"prompt tag <lora:{tag.target}:…>: cannot look in {folder}: {exc}") from None
        if not real.is_relative_to(root):
            raise ConfigError(
                f"prompt tag <lora:{tag.target}:…>: {candidate} leads outside {folder} (a symlink); "
                "tags only load files inside --lora-dir"
            )
        if real.is_file() and real not in found:
            found.append(real)
    if len(found) > 1:
        raise ConfigError(
            f"prompt tag <lora:{tag.target}:…> is ambiguous: {' and '.join(map(str, found))} both match; "
            "rename one or load the one you mean with --lora PATH"
        )
    if not found:
        where = ", ".join(map(str, lora_dirs)) or "no --lora-dir given"
        raise ConfigError(
            f"prompt tag <lora:{tag.target}:…>: no loaded adapter of that name and no file {relative} "
            f"in the lora folders ({where}); add --lora-dir or load the file with --lora PATH"
        )
    return found[0]


def _same_file(a: str | None, b: Path) -> bool:
    if not a:
        return False
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def resolve_tag(pipe: Any, tag: LoraTag, lora_dirs: Sequence[str | os.PathLike]) -> str:
    """The name of the adapter a tag refers to, loading its file from ``lora_dirs`` if needed.

    A file whose adapter name (its stem, as in A1111) is already taken by an adapter from another
    file is refused: using the loaded one would silently apply the wrong adapter.
    """
    loaded: Mapping[str, str | None] = {info.name: info.file for info in list_loras(pipe)}
    if tag.target in loaded:
        return tag.target
    path = find_in_lora_dirs(tag, lora_dirs)
    name = default_adapter_name(path)
    if name in loaded:
        if _same_file(loaded[name], path):
            return name
        source = loaded[name] or "memory (not loaded from a file)"
        raise ConfigError(
            f"prompt tag <lora:{tag.target}:…> names {path}, but the adapter {name!r} already loaded comes "
            f"from {source}; two different files cannot share the name {name!r} — rename one of them"
        )
    return load_lora(pipe, path, name=name, weight=tag_weight(pipe, tag))
