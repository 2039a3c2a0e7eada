"""A small typed-config engine: frozen dataclass sections read from TOML, every value checked.

A config is a :class:`ConfigRoot` dataclass whose fields are :class:`Section` dataclasses, one per
TOML table; a section's fields are declared with :func:`setting`, which attaches a :class:`Rule`
(range, multiple-of, a custom check). :func:`load` reads a TOML file (or a nested mapping), applies
``section.key=value`` overrides and constructs the root. Every problem is a
:class:`~diffusion_lora.errors.ConfigError` that names the dotted key: an unknown key (with a
did-you-mean suggestion), a wrong type (``bool`` is not an integer; an integer is a fine float), a
value out of range, a missing required key. Enum fields take their members' string values.
"""

from __future__ import annotations

import difflib
import enum
import functools
import math
import os
import tomllib
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar, TypeVar, get_args, get_origin, get_type_hints

from ..errors import ConfigError

__all__ = ["ConfigRoot", "Rule", "Section", "did_you_mean", "load", "setting", "toml_value"]


@dataclass(frozen=True)
class Rule:
    """Range of a numeric field (applied to each element of a list) plus an optional whole-value check
    that returns a problem description or None."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    multiple_of: int | None = None
    check: Callable[[Any], str | None] | None = None
    required_help: str = ""

    def bounds(self) -> str:
        parts = [f"{op} {b}" for op, b in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
                 if b is not None]
        return " and ".join(parts)


def setting(default: Any = MISSING, *, factory: Any = MISSING, **rule: Any) -> Any:
    """A section field with a :class:`Rule`; no default and no factory means required."""
    return field(default=default, default_factory=factory, metadata={"rule": Rule(**rule)})


class Section:
    """Base of the section dataclasses: coerces and checks every field after construction."""

    SECTION: ClassVar[str]

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in fields(self):  # type: ignore[arg-type]
            key = f"{self.SECTION}.{f.name}"
            value = _convert(getattr(self, f.name), hints[f.name], key)
            object.__setattr__(self, f.name, value)
            _check_rule(value, f.metadata["rule"], key)


class ConfigRoot:
    """Base of a whole config, a dataclass whose fields are sections: construction checks that each
    is its section's class, then :meth:`check` (the rules across sections)."""

    def __post_init__(self) -> None:
        for name, cls in _section_types(type(self)).items():
            value = getattr(self, name)
            if not isinstance(value, cls):
                raise ConfigError(f"{name}: expected a {cls.__name__}, got {_show(value)}")
        self.check()

    def check(self) -> None:
        """Rules that involve several settings; a ConfigError naming them. None by default."""

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Nested plain data (enums as strings, unset optional values left out): JSON- and TOML-able."""
        return {
            f.name: {k.name: _plain(v) for k in fields(s) if (v := getattr(s, k.name)) is not None}
            for f in fields(self) for s in [getattr(self, f.name)]  # type: ignore[arg-type]
        }

    def to_toml(self) -> str:
        """A TOML document that loads back to an equal config."""
        blocks = [
            "\n".join([f"[{name}]"] + [f"{k} = {toml_value(v)}" for k, v in body.items()])
            for name, body in self.to_dict().items()
        ]
        return "\n\n".join(blocks) + "\n"


Root = TypeVar("Root", bound=ConfigRoot)


# ---------------------------------------------------------------- types and ranges


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


@functools.cache
def _section_types(root: type[ConfigRoot]) -> dict[str, type[Section]]:
    hints = _hints(root)
    return {f.name: hints[f.name] for f in fields(root)}  # type: ignore[arg-type]


_NOUNS = {bool: ("a boolean (true or false)", "booleans"), int: ("an integer", "integers"),
          float: ("a number", "numbers"), str: ("a string", "strings")}


def _describe(hint: Any) -> str:
    if get_origin(hint) is types.UnionType:
        return " or ".join(_describe(a) for a in get_args(hint) if a is not type(None))
    if get_origin(hint) is list:
        return "a list of " + _NOUNS[get_args(hint)[0]][1]
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in hint)
    return _NOUNS[hint][0]


def _show(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _convert(value: Any, hint: Any, key: str) -> Any:
    """``value`` as ``hint`` (ints become floats, strings become enum members), or a ConfigError."""
    origin = get_origin(hint)
    if origin is types.UnionType:
        return _convert_union(value, hint, key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_describe(hint)}, got {_show(value)}")
        return [_convert(v, get_args(hint)[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return _convert_enum(value, hint, key)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{key}: {value!r} is not a finite number")
        return number
    if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return str(value) if hint is str else value
    raise ConfigError(f"{key}: expected {_describe(hint)}, got {_show(value)}")


def _convert_union(value: Any, hint: Any, key: str) -> Any:
    args = get_args(hint)
    if value is None and type(None) in args:
        return None
    real = [a for a in args if a is not type(None)]
    if len(real) == 1:  # an optional setting: the one type's own message is the useful one
        return _convert(value, real[0], key)
    for arg in args:
        is_list = get_origin(arg) is list
        if is_list and isinstance(value, (list, tuple)):
            return _convert(value, arg, key)  # its element errors are the useful ones
        if arg is not type(None) and not is_list:
            try:
                return _convert(value, arg, key)
            except ConfigError:
                pass
    raise ConfigError(f"{key}: expected {_describe(hint)}, got {_show(value)}")


def _convert_enum(value: Any, hint: type[enum.Enum], key: str) -> enum.Enum:
    if isinstance(value, hint):
        return value
    if isinstance(value, str):
        try:
            return hint(value)
        except ValueError:
            raise ConfigError(f"{key}: expected {_describe(hint)}, got {value!r}"
                              f"{did_you_mean(value, [m.value for m in hint], listing='', cutoff=0.5)}") from None
    raise ConfigError(f"{key}: expected {_describe(hint)}, got {_show(value)}")


def _check_rule(value: Any, rule: Rule, key: str) -> None:
    if value is None:
        return
    if rule.check is not None and (problem := rule.check(value)):
        raise ConfigError(f"{key}: {problem}")
    items = enumerate(value) if isinstance(value, list) else [(None, value)]
    for i, v in items:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        k = key if i is None else f"{key}[{i}]"
        if ((rule.ge is not None and v < rule.ge) or (rule.gt is not None and v <= rule.gt)
                or (rule.le is not None and v > rule.le) or (rule.lt is not None and v >= rule.lt)):
            raise ConfigError(f"{k}: {v!r} is out of range; expected a value {rule.bounds()}")
        if rule.multiple_of and v % rule.multiple_of:
            raise ConfigError(f"{k}: {v!r} is not a multiple of {rule.multiple_of}")


def did_you_mean(word: str, options: Iterable[str], listing: str = "choose from", cutoff: float = 0.6) -> str:
    """``"; did you mean X?"`` for the closest option, else ``"; <listing> a, b, c"`` (nothing if no listing)."""
    options = list(options)
    close = difflib.get_close_matches(word, options, n=1, cutoff=cutoff)
    if close:
        return f"; did you mean {close[0]}?"
    return f"; {listing} {', '.join(options)}" if listing else ""


# ---------------------------------------------------------------- loading


def load(root: type[Root], source: str | os.PathLike[str] | Mapping[str, Any], overrides: Sequence[str] = ()) -> Root:
    """A checked ``root`` config from a TOML file path or a nested mapping, after ``overrides``
    (``"section.key=value"``, the value parsed as TOML or taken as a bare string) are applied."""
    raw = _read(source)
    for text in overrides:
        section, key, value = _parse_override(root, text)
        body = raw.setdefault(section, {})
        if not isinstance(body, dict):
            raise ConfigError(f"{section}: expected a table ([{section}]), got {_show(body)}")
        body[key] = value
    return _from_mapping(root, raw)


def _read(source: Any) -> dict[str, Any]:
    if isinstance(source, Mapping):
        return {k: dict(v) if isinstance(v, Mapping) else v for k, v in source.items()}
    if not isinstance(source, (str, os.PathLike)):
        raise ConfigError(f"config: expected a TOML file path or a mapping, got {_show(source)}")
    path = os.fspath(source)
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: invalid TOML: the file is not UTF-8 text") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file: {e.strerror or e}") from None


def _section_class(root: type[ConfigRoot], section: Any) -> type[Section]:
    types_ = _section_types(root)
    if section not in types_:
        raise ConfigError(f"{section}: unknown section{did_you_mean(str(section), types_, 'valid sections are')}")
    return types_[section]


def _field_of(cls: type[Section], key: Any) -> Any:
    known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    if key not in known:
        hint = did_you_mean(str(key), known, listing="valid keys are")
        raise ConfigError(f"{cls.SECTION}.{key}: unknown key{hint}")
    return known[key]


def _from_mapping(root: type[Root], raw: Mapping[str, Any]) -> Root:
    sections: dict[str, Any] = {}
    for name in raw:
        _section_class(root, name)
    for name, cls in _section_types(root).items():
        body = raw.get(name, {})
        if not isinstance(body, Mapping):
            raise ConfigError(f"{name}: expected a table ([{name}]), got {_show(body)}")
        for key in body:
            _field_of(cls, key)
        for f in fields(cls):  # type: ignore[arg-type]
            if f.default is MISSING and f.default_factory is MISSING and f.name not in body:
                raise ConfigError(f"{name}.{f.name}: required key is missing; set it to "
                                  f"{f.metadata['rule'].required_help}")
        sections[name] = cls(**body)
    return root(**sections)


def _parse_override(root: type[ConfigRoot], text: str) -> tuple[str, str, Any]:
    dotted, eq, value_text = text.partition("=")
    section, dot, key = dotted.strip().partition(".")
    if not eq or not dot or not section or not key or "." in key:
        raise ConfigError(f"override {text!r}: expected section.key=value, e.g. train.steps=20")
    try:
        _field_of(_section_class(root, section), key)
    except ConfigError as e:
        raise ConfigError(f"{e} (in override {text!r})") from None
    hint = _hints(_section_class(root, section))[key]
    return section, key, _parse_value(value_text.strip(), hint)


def _parse_value(text: str, hint: Any) -> Any:
    """A TOML value; text that is not one, or that a string setting would reject as another type
    (``output.name=2024``), is taken as a bare string."""
    try:
        doc = tomllib.loads(f"v = {text}")
    except tomllib.TOMLDecodeError:
        return text
    if set(doc) != {"v"}:
        return text
    value = doc["v"]
    accepts = get_args(hint) if get_origin(hint) is types.UnionType else (hint,)
    wants_str = any(a is str or (isinstance(a, type) and issubclass(a, enum.Enum)) for a in accepts)
    if wants_str and not isinstance(value, (str, list)):
        return text
    return value


# ---------------------------------------------------------------- TOML writing


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def toml_value(value: Any) -> str:
    """``value`` (bool, int, float, string, enum, or a list of them) written as a TOML value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, str):
        return '"' + "".join(
            _ESCAPES.get(c) or (f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c) for c in value
        ) + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {_show(value)} as TOML")
