"""The typed configuration layer: each subcommand's settings as one validated dataclass.

A config class is written once, with :func:`option` for every field (its default, help and
bounds) and :func:`settings` as its decorator, which makes it a pydantic dataclass in strict
mode. Whatever builds a config (the command line, a ``--config`` file, a checkpoint, code)
gets the same checks before any work: exact types (``"false"`` is not a boolean, ``true`` is
not an integer, ``"80"`` is not a number, a string is not a list), the bounds of every
number, finite floats, no unknown keys; then the class's ``__post_init__`` for rules across
fields. A failure is a :class:`ConfigError` (a ValueError) whose message is one line naming
each bad field with its command-line flag::

    >>> from examples.get_distillation.train import TrainConfig
    >>> build(TrainConfig, {"pairs": "p", "out": "o", "batch": True})
    Traceback (most recent call last):
    ...
    examples.get_distillation.config.ConfigError: TrainConfig: batch (--batch): expected an integer, got True

pydantic (rather than jsonargparse or tyro) because it validates a dataclass from any source
without owning the command line: ``cli.py`` keeps generating the argparse options from the
same fields, and checkpoints and ``--config`` files go through the same validator.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import types
import typing
from typing import Any, Optional, TypeVar

import pydantic
import pydantic.dataclasses

from . import fileio

C = TypeVar("C")

# bounds shared by many fields
MAX_STEPS = 10**9          # optimizer steps, pairs, samples: beyond any run of this example
MAX_SEED = 2**32 - 1       # torch, NumPy and the derived seeds (seed * 1_000_003 + step) stay in range
MAX_BATCH = 2**20
BOUNDS = ("ge", "gt", "le", "lt")
STRICT = pydantic.ConfigDict(strict=True, extra="forbid", validate_assignment=True)


class ConfigError(ValueError):
    """A config that does not validate; the message is one line naming every bad field."""


def option(default: Any = dataclasses.MISSING, *, help: str, choices: Any = None, flag: str | None = None,
           aliases: tuple[str, ...] = (), default_text: str | None = None,
           default_factory: Any = dataclasses.MISSING, ge: float | None = None, gt: float | None = None,
           le: float | None = None, lt: float | None = None) -> Any:
    """A config field with its command-line description and bounds.

    ``choices``: a sequence, or a callable returning one (evaluated when the parser is
    built, e.g. a registry's names); ``flag``: the option name when it is not
    ``--field-name``; ``aliases``: more names for it; ``default_text``: how ``--help`` shows
    the default (e.g. "all pairs" for None); ``ge``/``gt``/``le``/``lt``: bounds of a number.
    """
    metadata = {"help": help, "choices": choices, "flag": flag, "aliases": aliases, "default_text": default_text,
                **{k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _constrained(hint: Any, meta: typing.Mapping[str, Any]) -> Any:
    """``hint`` with the field's bounds (and, for floats, finiteness); Optional[X] bounds X."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1 and len(args) == 2:
            return Optional[_constrained(inner[0], meta)]
    kw = {k: meta[k] for k in BOUNDS if k in meta}
    if hint is float:
        kw["allow_inf_nan"] = False
    if hint is int or hint is float:
        return typing.Annotated[hint, pydantic.Field(**kw)] if kw else hint
    if kw:
        raise TypeError(f"bounds {kw} on a field of type {hint}")
    return hint


def settings(cls: type[C]) -> type[C]:
    """Make ``cls`` (fields from :func:`option`) a strictly validated pydantic dataclass."""
    hints = typing.get_type_hints(cls)
    for name, hint in hints.items():
        value = cls.__dict__.get(name)
        meta = value.metadata if isinstance(value, dataclasses.Field) else {}
        cls.__annotations__[name] = _constrained(hint, meta)
    made: Any = pydantic.dataclasses.dataclass(cls, config=STRICT)
    init, setattr_ = made.__init__, made.__setattr__

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            init(self, *args, **kwargs)
        except pydantic.ValidationError as exc:
            raise ConfigError(describe(made, exc)) from None

    @functools.wraps(setattr_)
    def __setattr__(self: Any, name: str, value: Any) -> None:
        try:
            setattr_(self, name, value)
        except pydantic.ValidationError as exc:
            raise ConfigError(describe(made, exc)) from None

    made.__init__, made.__setattr__ = __init__, __setattr__
    return made


def flag_of(field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


_KINDS = {"int_type": "an integer", "float_type": "a number", "bool_type": "true or false", "string_type": "a string",
          "list_type": "a list", "dict_type": "a JSON object", "none_required": "null"}


def describe(cls: type, exc: pydantic.ValidationError) -> str:
    """One line naming each field that failed, with its flag, what it needs and what it got."""
    flags = {f.name: flag_of(f) for f in dataclasses.fields(cls)}
    parts = []
    for error in exc.errors(include_url=False):
        loc = [str(p) for p in error["loc"]]
        name = loc[0] if loc else None
        if error["type"] == "value_error":  # raised by __post_init__: its message names the field
            parts.append(str(error.get("ctx", {}).get("error", error["msg"])))
            continue
        where = f"{'.'.join(loc)} ({flags[name]})" if name in flags else ".".join(loc) or cls.__name__
        kind = _KINDS.get(error["type"])
        if error["type"] == "unexpected_keyword_argument":
            parts.append(f"unknown setting {name!r}")
        elif error["type"] == "missing_argument":
            parts.append(f"{where} is required")
        elif kind is not None:
            parts.append(f"{where}: expected {kind}, got {error['input']!r}")
        else:
            parts.append(f"{where}: {error['msg'][0].lower()}{error['msg'][1:]}, got {error['input']!r}")
    seen: list[str] = []
    for p in parts:  # Optional[X] reports X's and None's failures: keep the first
        if not any(p.split(":")[0] == s.split(":")[0] for s in seen):
            seen.append(p)
    return f"{cls.__name__}: " + "; ".join(seen)


def build(cls: type[C], values: dict[str, Any], source: str | None = None) -> C:
    """``cls(**values)``, or a :class:`ConfigError` (one line; ``source`` says where the values
    came from, e.g. a file)."""
    try:
        return cls(**values)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}" if source else str(exc)) from None


def replace(config: C, **changes: Any) -> C:
    """A copy of ``config`` with ``changes``, validated like any config."""
    return build(type(config), {**to_dict(config), **changes})


def to_dict(config: Any) -> dict[str, Any]:
    """A config as a JSON-ready dict (paths become strings, tuples lists)."""
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"config must be a dataclass instance, got {type(config).__name__}")
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def from_dict(cls: type[C], data: Any, source: str | None = None) -> C:
    """Rebuild a config from a dict (settings added since it was written take their
    defaults); unknown keys and bad values are a ConfigError naming them."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source or cls.__name__}: expected a JSON object of settings, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{source + ': ' if source else ''}unknown settings {unknown} for {cls.__name__}")
    return build(cls, data, source)


def save(path: str | os.PathLike, config: Any) -> None:
    fileio.atomic_write_json(path, to_dict(config))


def load(cls: type[C], path: str | os.PathLike) -> C:
    return from_dict(cls, fileio.read_json(path, "config"), repr(str(path)))
