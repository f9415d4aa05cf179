"""Argument checks shared by every part of deqkit: one module, so an argument is accepted and
refused by the same rule, with the same message, wherever it is given.

Numbers follow Python's numeric tower (``numbers.Real``, ``numbers.Integral``), so numpy
scalars (``np.float32(1e-4)``, ``np.int64(10)``) are numbers; ``bool`` is not (``True`` as a
tolerance or a step count is a mistake, not a 1). Each check returns the value as a plain
Python ``float`` or ``int``, so that records built from it print, compare and pickle alike
whatever the caller passed. This module imports nothing else of deqkit.
"""

from __future__ import annotations

import math
import numbers
from typing import Any


def is_number(value: Any) -> bool:
    """A real number: int, float or a numpy scalar, but not a bool."""
    return isinstance(value, numbers.Real) and not _is_bool(value)


def is_integer(value: Any) -> bool:
    """An integer: int or a numpy integer, but not a bool."""
    return isinstance(value, numbers.Integral) and not _is_bool(value)


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool) or type(value).__name__ == "bool_"  # numpy's bool is not Integral, but say so


def integer(name: str, value: Any, minimum: int = 1, hint: str = "") -> int:
    """``value`` as an int, refused unless it is an integer >= ``minimum``."""
    if not is_integer(value) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}{hint}, got {value!r}")
    return int(value)


def positive(name: str, value: Any, allow_zero: bool = False) -> float:
    """``value`` as a float, refused unless it is a finite number > 0 (>= 0 with ``allow_zero``)."""
    ok = is_number(value) and math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)


def unit_interval(name: str, value: Any) -> float:
    """``value`` as a float, refused unless 0 < value <= 1 (a damping or mixing factor)."""
    if not is_number(value) or not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
    return float(value)


def above(name: str, value: Any, bound: float, hint: str = "") -> float:
    """``value`` as a float, refused unless it is a finite number > ``bound``."""
    if not (is_number(value) and math.isfinite(value) and value > bound):
        raise ValueError(f"{name} must be a number > {bound:g}{hint}, got {value!r}")
    return float(value)


def boolean(name: str, value: Any) -> bool:
    """``value`` refused unless it is True or False (a string "false" is not False)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def one_of(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def closest(name: str, known: list[str]) -> str:
    """`` (did you mean 'x'?)`` for the known name closest to ``name``, or '' when none is close."""
    import difflib

    match = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""
