"""The options of a solve, checked once, and the checks for solver and backward-mode objects.

``fixed_point``, ``DEQ`` and ``Implicit`` (for its adjoint solve) share ``SolveOptions`` and
these checks, so an argument means the same thing, and is refused with the same message,
wherever it is given.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

STOP_MODES = ("abs", "rel")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_solver(solver: Any, name: str = "solver") -> None:
    """Refuse anything that is not a solver object (a class, a string, an object without step)."""
    if isinstance(solver, type):
        raise TypeError(f"{name} must be a solver object, not a class: use {name}={solver.__name__}()")
    if isinstance(solver, str):
        raise TypeError(
            f"{name} must be a solver object, got the string {solver!r}: use deqkit.solvers.get({solver!r}) "
            "to turn a name into a solver"
        )
    if not (callable(getattr(solver, "init", None)) and callable(getattr(solver, "step", None))):
        raise TypeError(f"{name} must have init() and step() methods (e.g. deqkit.Anderson()), got {solver!r}")


def check_backward(backward: Any) -> None:
    from ._backward import AbstractBackward

    if isinstance(backward, type):
        raise TypeError(f"backward must be a backward-mode object, not a class: use backward={backward.__name__}()")
    if not isinstance(backward, AbstractBackward):
        raise TypeError(f"backward must be a deqkit backward mode (Implicit, Phantom, Unrolled, OneStep), got {backward!r}")


@dataclasses.dataclass(frozen=True)
class SolveOptions:
    """How long to iterate and when to stop: everything of a solve but f, z0, solver and backward.

    Args:
        tol: per-sample tolerance on the residual, a finite number > 0; or ``None`` for a fixed
            number of iterations: every sample runs exactly ``max_steps`` iterations, nothing is
            tested for convergence, and the value is the last iterate's image (not the
            lowest-residual one). A sample then ends SUCCESS unless it went NONFINITE or DIVERGED.
        stop_mode: "rel" (``||f(z) - z|| / ||f(z)||``) or "abs" (``||f(z) - z||``).
        max_steps: calls of f per solve, an integer >= 1.
        active_set: call f only on the samples still iterating; every tensor in ``inputs`` is
            then per-sample (first dim = batch) and sliced with z.
        divergence: a sample whose absolute residual grows past this factor times its first
            value stops with DIVERGED (a number > 1), or ``None`` for never.
        trajectory: how many of the last iterates' images to keep, >= 0.
        check_every: test convergence every this many iterations (an integer >= 1). Each test
            copies the residual norms to the host, the loop's one synchronisation with the
            device; on accelerators where that wait is costly, a larger value lets the device
            run ahead. A sample then stops at the first tested iteration at or below ``tol``
            (up to ``check_every - 1`` iterations late), its best iterate is chosen among the
            tested ones, ``divergence`` is judged against its first tested residual, and the
            trace has one column per test. ``trajectory`` still keeps every iterate.
        throw: raise ``SolveError`` on NONFINITE or DIVERGED.
        throw_on_max_steps: also raise on MAX_STEPS.
    """

    tol: Optional[float] = 1e-4
    stop_mode: str = "rel"
    max_steps: int = 50
    active_set: bool = False
    divergence: Optional[float] = 1e4
    trajectory: int = 0
    check_every: int = 1
    throw: bool = True
    throw_on_max_steps: bool = False

    def __post_init__(self) -> None:
        if self.tol is not None and not (_is_number(self.tol) and self.tol > 0 and math.isfinite(self.tol)):
            raise ValueError(
                f"tol must be a finite number > 0, or None for a fixed number of iterations "
                f"(exactly max_steps), got {self.tol!r}"
            )
        if self.stop_mode not in STOP_MODES:
            raise ValueError(f"stop_mode must be one of {STOP_MODES}, got {self.stop_mode!r}")
        if isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int) or self.max_steps < 1:
            hint = ""
            if isinstance(self.max_steps, int) and not isinstance(self.max_steps, bool) and self.max_steps == 0:
                hint = (
                    ". For no solver iterations and k differentiated steps from z0 (torchdeq's "
                    "f_max_iter=0 with grad=k, GET's recipe) use backward=deqkit.Unrolled(), "
                    "max_steps=k, tol=None: the same values and gradients"
                )
            raise ValueError(f"max_steps must be an integer >= 1, got {self.max_steps!r}{hint}")
        if self.divergence is not None and not (_is_number(self.divergence) and self.divergence > 1):
            raise ValueError(f"divergence must be a number > 1, or None to never stop on divergence, got {self.divergence!r}")
        if isinstance(self.trajectory, bool) or not isinstance(self.trajectory, int) or self.trajectory < 0:
            raise ValueError(f"trajectory must be an integer >= 0, got {self.trajectory!r}")
        if isinstance(self.check_every, bool) or not isinstance(self.check_every, int) or self.check_every < 1:
            raise ValueError(f"check_every must be an integer >= 1 (test convergence every k iterations), got {self.check_every!r}")
        for name in ("active_set", "throw", "throw_on_max_steps"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")

    @property
    def fixed_steps(self) -> bool:
        """True when ``tol is None``: exactly ``max_steps`` iterations, the last one returned."""
        return self.tol is None
