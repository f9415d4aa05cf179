"""torchdeq's solver registry: ``get_solver(name)``, ``register_solver(name, fn)``.

Registered by default: ``anderson``, ``broyden``, ``fixed_point_iter``,
``simple_fixed_point_iter`` (deqkit's own implementations, with torchdeq's numbers).
"""

from __future__ import annotations

import difflib
import inspect
from typing import Callable

from ._solvers import anderson_solver, broyden_solver, fixed_point_iter, simple_fixed_point_iter
from .stat import SolverStat

__all__ = ["register_solver", "get_solver", "solver_stat_from_final_step", "SolverStat", "anderson_solver",
           "broyden_solver", "fixed_point_iter", "simple_fixed_point_iter"]

_solvers: dict[str, Callable] = {
    "anderson": anderson_solver,
    "broyden": broyden_solver,
    "fixed_point_iter": fixed_point_iter,
    "simple_fixed_point_iter": simple_fixed_point_iter,
}


def _suggest(name: str, names) -> str:
    close = difflib.get_close_matches(str(name), list(names), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def get_solver(key: str) -> Callable:
    """The solver function registered as ``key``; an unknown name raises ``ValueError``."""
    if key not in _solvers:
        raise ValueError(f"unknown solver {key!r}{_suggest(key, _solvers)}; registered: {sorted(_solvers)}")
    return _solvers[key]


def register_solver(solver_type: str, solver: Callable) -> None:
    """Register ``solver`` (torchdeq's call signature) under the name ``solver_type``."""
    if not callable(solver):
        raise TypeError(f"solver must be callable, got {type(solver).__name__}")
    _solvers[solver_type] = solver


def solver_options(solver: Callable) -> set | None:
    """The extra keyword options ``solver`` accepts, or None when it takes any (``**kwargs``)."""
    params = inspect.signature(solver).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return set(params) - {"func", "x0", "max_iter", "tol", "stop_mode", "indexing"}


def check_solver_options(name: str, options: dict) -> None:
    """Refuse options the solver registered as ``name`` does not take (torchdeq ignores them)."""
    accepted = solver_options(get_solver(name))
    if accepted is None:
        return
    unknown = sorted(set(options) - accepted)
    if unknown:
        hint = _suggest(unknown[0], accepted)
        raise TypeError(f"solver {name!r} got unknown option(s) {unknown}{hint}; it accepts {sorted(accepted)}")


def solver_stat_from_final_step(z, fz, nstep: int = 0) -> SolverStat:
    """``SolverStat`` of one pair ``(z, f(z))``."""
    return SolverStat.from_final_step(z, fz, nstep=nstep)
