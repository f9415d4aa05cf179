"""The command-line layer: the options of a config class (``config.py``), and the run of a subcommand.

Each field of a config dataclass is written once, with :func:`config.option`;
:func:`add_config_arguments` turns the fields into options: ``--num-pairs`` for
``num_pairs``, ``--cond/--no-cond`` for a bool, a repeatable ``--solver-arg KEY=VALUE`` for a
dict, a repeatable ``--baseline`` for a list. ``--help`` shows every default, the bounds of
every number and the choices. Validation is the config layer's, so a config from the command
line, from ``--config`` or from a checkpoint is checked alike. Every subcommand also gets:

- ``--config run/config.json``: start from a saved config (a run's ``config.json`` replays
  it); options given on the command line override its values;
- ``--dry-run``: check everything a run would check before its work (the config, the
  threads, the files it reads, the solver's arguments), print the resolved config as JSON
  and exit;
- ``--threads N``: torch CPU threads for this process (1 to the usable CPUs; not part of
  the config).

A subcommand module then needs only::

    def add_arguments(parser):
        cli.add_config_arguments(parser, MyConfig)

    def main(args):
        return cli.run(MyConfig, args, body, check=preflight)  # body(config) -> exit status
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from typing import Any, Callable, Optional, TypeVar

from . import config as cfg
from . import fileio, runtime

C = TypeVar("C")
option = cfg.option
flag_of = cfg.flag_of


def _base_type(annotation: Any) -> Any:
    """int for int, Optional[int] and Annotated[int, ...]; the origin (dict, list) for generics."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _base_type(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0]) if len(args) == 1 else str
    return origin or annotation


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _default_of(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def _range_text(meta: typing.Mapping[str, Any]) -> str:
    low = f">= {meta['ge']:g}" if "ge" in meta else (f"> {meta['gt']:g}" if "gt" in meta else "")
    high = f"<= {meta['le']:g}" if "le" in meta else (f"< {meta['lt']:g}" if "lt" in meta else "")
    return ", ".join(p for p in (low, high) if p)


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One option per field of ``cls``, plus ``--config``, ``--dry-run`` and ``--threads``.

    Options that are not given stay out of the namespace (their default is the dataclass's),
    so :func:`config_from_args` can tell them from values in a ``--config`` file.
    """
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        meta = field.metadata
        kind = _base_type(hints[field.name])
        default = _default_of(field)
        choices = meta.get("choices")
        choices = list(choices()) if callable(choices) else (list(choices) if choices is not None else None)
        text = meta.get("help", "")
        if default is dataclasses.MISSING:
            shown = "required, unless --config gives it"
        elif meta.get("default_text") or default is None or default == {} or default == []:
            shown = f"default: {meta.get('default_text') or 'none'}"
        else:
            shown = f"default: {default}"
        if choices:
            text = f"{text}; one of {', '.join(map(str, choices))}" if text else f"one of {', '.join(map(str, choices))}"
        if _range_text(meta):
            text = f"{text}; {_range_text(meta)}"
        help_text = f"{text} ({shown})".replace("%", "%%")  # argparse %-formats help
        kwargs: dict[str, Any] = dict(dest=field.name, default=argparse.SUPPRESS, help=help_text)
        names = [flag_of(field), *meta.get("aliases", ())]
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind is dict:
            kwargs.update(action="append", metavar="KEY=VALUE")
        elif kind is list:
            kwargs.update(action="append")
        else:
            kwargs.update(type=kind if kind in (int, float) else str, choices=choices)
            if choices:
                kwargs["metavar"] = field.name.upper()
        parser.add_argument(*names, **kwargs)
    parser.add_argument("--config", default=None, metavar="JSON",
                        help="start from this saved config (e.g. a run's config.json); options given here override it "
                             "(default: none)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check everything a run checks before its work, print the resolved config and exit "
                             "(default: off)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads for this process, from 1 to the usable CPUs; not part of the config "
                             "(default: torch's choice)")


def config_from_args(cls: type[C], args: argparse.Namespace, base: C | None = None) -> C:
    """The config of ``args``: the dataclass's defaults (or ``base``'s values), then
    ``--config``'s values, then the options given on the command line. Raises ValueError
    (one line) naming a bad or missing option."""
    values: dict[str, Any] = cfg.to_dict(base) if base is not None else {}
    source = None
    if getattr(args, "config", None):
        source = f"--config {args.config!r}"
        saved = fileio.read_json(args.config, "config")
        if not isinstance(saved, dict):
            raise cfg.ConfigError(f"{source}: expected a JSON object of settings")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(saved) - names)
        if unknown:
            raise cfg.ConfigError(f"{source}: unknown settings {unknown} for {cls.__name__}")
        values.update(saved)
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if not hasattr(args, field.name):
            continue
        value = getattr(args, field.name)
        if _base_type(hints[field.name]) is dict:
            parsed = {}
            for item in value:
                if "=" not in item:
                    raise cfg.ConfigError(f"{flag_of(field)} expects KEY=VALUE, got {item!r}")
                key, text = item.split("=", 1)
                parsed[key] = _parse_value(text)
            value = parsed
        values[field.name] = value
    missing = [flag_of(f) for f in dataclasses.fields(cls) if _default_of(f) is dataclasses.MISSING and f.name not in values]
    if missing:
        raise cfg.ConfigError(f"{', '.join(missing)} required (on the command line or in --config)")
    return cfg.build(cls, values, source)


def run(cls: type[C], args: argparse.Namespace, body: Callable[[C], int], base: C | None = None,
        check: Optional[Callable[[C], None]] = None) -> int:
    """Build the config (see :func:`config_from_args`), check ``--threads``, run ``check(config)``
    (what a run verifies before its work: files, solver arguments, ...), honour ``--dry-run``,
    then apply ``--threads`` and run ``body(config)``."""
    config = config_from_args(cls, args, base)
    threads = getattr(args, "threads", None)
    if threads is not None:
        runtime.check_threads(threads)
    if check is not None:
        check(config)
    if args.dry_run:
        print(json.dumps(cfg.to_dict(config), indent=2, sort_keys=True))
        return 0
    runtime.set_threads(threads)
    return int(body(config) or 0)
