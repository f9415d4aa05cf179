"""The options of a solve: one checked record, declared once.

``fixed_point``, ``DEQ`` and ``Implicit`` (for its adjoint solve) all build a ``SolveOptions``,
so an option means the same thing, and is refused with the same message, wherever it is given.
``fixed_point`` and ``DEQ`` take ``options=`` and keyword overrides of its fields
(``OptionOverrides`` types them for mypy and IDEs; a test keeps it equal to the fields).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, TypedDict

from . import _checks

STOP_MODES = ("abs", "rel")


class OptionOverrides(TypedDict, total=False):
    """The fields of ``SolveOptions``, as keyword arguments of ``fixed_point`` and ``DEQ``."""

    tol: Optional[float]
    stop_mode: str
    max_steps: int
    active_set: bool
    divergence: Optional[float]
    escape: Optional[float]
    trajectory: int
    check_every: int
    throw: bool
    throw_on_max_steps: bool


@dataclasses.dataclass(frozen=True)
class SolveOptions:
    """How long to iterate and when to stop: everything of a solve but f, z0, solver and backward.

    Numbers may be Python or numpy scalars; they are stored as ``float``/``int``.

    Args:
        tol: per-sample tolerance on the residual, a finite number > 0; or ``None`` for a fixed
            number of iterations: every sample runs exactly ``max_steps`` iterations, nothing is
            tested for convergence, and the value is the last iterate's image (not the
            lowest-residual one). A sample then ends SUCCESS unless it went NONFINITE or DIVERGED
            (nothing is tested, so nothing can escape).
        stop_mode: "rel" (``||f(z) - z|| / ||f(z)||``) or "abs" (``||f(z) - z||``).
        max_steps: calls of f per solve, an integer >= 1.
        active_set: call f only on the samples still iterating; every tensor in ``inputs`` is
            then per-sample (first dim = batch) and sliced with z.
        divergence: a sample whose absolute residual grows past this factor times its first
            value stops with DIVERGED (a number > 1), or ``None`` for never.
        escape: with ``stop_mode="rel"``, a sample whose relative test passes while ``||f(z)||``
            has grown past this factor times its first value and its absolute residual
            ``||f(z) - z||`` has not fallen below half its largest value ends ESCAPED, not SUCCESS:
            its relative residual fell only because the iterate ran away (a number > 1; ``None``
            for never). An absolute residual below the round-off of ``||f(z)||`` counts as not
            fallen. See docs/stability.md for the measurements behind the thresholds.
        trajectory: how many of the last iterates' images to keep, >= 0.
        check_every: test convergence every this many iterations (an integer >= 1). Each test
            copies the residual norms to the host, the loop's one synchronisation with the
            device; on accelerators where that wait is costly, a larger value lets the device
            run ahead. A sample then stops at the first tested iteration at or below ``tol``
            (up to ``check_every - 1`` iterations late), its best iterate is chosen among the
            tested ones, ``divergence`` is judged against its first tested residual, and the
            trace has one column per test. ``trajectory`` still keeps every iterate.
        throw: raise ``SolveError`` on ESCAPED, DIVERGED or NONFINITE.
        throw_on_max_steps: also raise on MAX_STEPS.

    Example:
        >>> import deqkit
        >>> opts = deqkit.SolveOptions(tol=1e-6, max_steps=100)
        >>> opts.replace(max_steps=20).max_steps, opts.max_steps
        (20, 100)
    """

    tol: Optional[float] = 1e-4
    stop_mode: str = "rel"
    max_steps: int = 50
    active_set: bool = False
    divergence: Optional[float] = 1e4
    escape: Optional[float] = 10.0
    trajectory: int = 0
    check_every: int = 1
    throw: bool = True
    throw_on_max_steps: bool = False

    def __post_init__(self) -> None:
        # Each field is checked and stored as a plain float/int/bool while the record is built.
        checked = {
            "tol": None if self.tol is None else _tolerance(self.tol),
            "stop_mode": _checks.one_of("stop_mode", self.stop_mode, STOP_MODES),
            "max_steps": _max_steps(self.max_steps),
            "divergence": None if self.divergence is None else _checks.above(
                "divergence", self.divergence, 1, ", or None to never stop on divergence"),
            "escape": None if self.escape is None else _checks.above(
                "escape", self.escape, 1, ", or None to never judge escapes"),
            "trajectory": _checks.integer("trajectory", self.trajectory, minimum=0),
            "check_every": _checks.integer("check_every", self.check_every, hint=" (test convergence every k iterations)"),
        }
        for name in ("active_set", "throw", "throw_on_max_steps"):
            checked[name] = _checks.boolean(name, getattr(self, name))
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    @property
    def fixed_steps(self) -> bool:
        """True when ``tol is None``: exactly ``max_steps`` iterations, the last one returned."""
        return self.tol is None

    def replace(self, **overrides: Any) -> "SolveOptions":
        """A copy with some fields replaced; an unknown name is refused, naming the closest field."""
        unknown = [name for name in overrides if name not in FIELDS]
        if unknown:
            name = unknown[0]
            raise TypeError(f"unknown solve option {name!r}{_checks.closest(name, list(FIELDS))}; the options are {', '.join(FIELDS)}")
        return dataclasses.replace(self, **overrides) if overrides else self


FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(SolveOptions))


def options_from(options: Optional[SolveOptions], overrides: dict[str, Any]) -> SolveOptions:
    """``options`` (default: ``SolveOptions()``) with keyword overrides applied and checked."""
    if options is None:
        options = DEFAULT_OPTIONS
    elif not isinstance(options, SolveOptions):
        raise TypeError(f"options must be a deqkit.SolveOptions, got {type(options).__name__}")
    return options.replace(**overrides)


def _tolerance(tol: Any) -> float:
    if not (_checks.is_number(tol) and math.isfinite(tol) and tol > 0):
        raise ValueError(
            f"tol must be a finite number > 0, or None for a fixed number of iterations (exactly max_steps), got {tol!r}"
        )
    return float(tol)


def _max_steps(value: Any) -> int:
    if _checks.is_integer(value) and value == 0:
        raise ValueError(
            "max_steps must be an integer >= 1, got 0. For no solver iterations and k differentiated steps "
            "from z0 (torchdeq's f_max_iter=0 with grad=k, GET's recipe) use backward=deqkit.Unrolled(), "
            "max_steps=k, tol=None: the same values and gradients"
        )
    return _checks.integer("max_steps", value)


DEFAULT_OPTIONS = SolveOptions()
