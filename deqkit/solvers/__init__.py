"""Fixed-point solvers, and the registry that names them at the command-line edge.

Inside code, pass solver objects (``deqkit.Anderson(m=5)``); the registry turns a name from a
command line or a config file into one: ``deqkit.solvers.get("anderson", m=5)``.
"""

from __future__ import annotations

from typing import Any, Callable

from ._anderson import Anderson, AndersonState
from ._base import AbstractSolver, SolverLike, select_rows
from ._broyden import Broyden, BroydenState
from ._fallback import Fallback
from ._fixed_point import FixedPoint
from ._newton_krylov import NewtonKrylov
from ._torchdeq import TorchDEQSolver

_REGISTRY: dict[str, Callable[..., Any]] = {}


def register(name: str, cls: Callable[..., Any], *, overwrite: bool = False) -> None:
    """Make ``get(name, **kw)`` return ``cls(**kw)``. ``cls`` builds an object with init/step.

    Raises ValueError if ``name`` is taken (unless ``overwrite=True``) or is not a string.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a solver name must be a non-empty string, got {name!r}")
    if not callable(cls):
        raise TypeError(f"register({name!r}, ...) needs a class or factory, got {cls!r}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"a solver named {name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[name] = cls


def available() -> list[str]:
    """The registered solver names, sorted."""
    return sorted(_REGISTRY)


def get(name: str, **kwargs: Any) -> Any:
    """Build the solver registered as ``name`` with hyperparameters ``kwargs``.

    Example:
        >>> import deqkit
        >>> deqkit.solvers.get("anderson", m=3)
        Anderson(m=3, beta=1.0, lam=0.0001, restart=4.0)
    """
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown solver {name!r}; available: {', '.join(available())}") from None
    return cls(**kwargs)


def _torchdeq(name: str) -> Callable[..., TorchDEQSolver]:
    def build(**kwargs: Any) -> TorchDEQSolver:
        return TorchDEQSolver(name, **kwargs)

    build.__name__ = f"torchdeq_{name}"
    return build


register("fixed_point", FixedPoint)
register("anderson", Anderson)
register("broyden", Broyden)
register("newton_krylov", NewtonKrylov)
def _fallback(solvers: Any) -> Fallback:
    """``Fallback`` from a list of names (``"anderson"``), ``{"name": ..., **hyperparameters}``
    dicts or solver objects: the form a command line or a config file gives."""
    if isinstance(solvers, str) or not hasattr(solvers, "__iter__"):
        raise TypeError(f"fallback needs solvers=[...], a list of solver names, dicts or objects; got {solvers!r}")
    chain = []
    for item in solvers:
        if isinstance(item, str):
            chain.append(get(item))
        elif isinstance(item, dict):
            kwargs = dict(item)
            chain.append(get(kwargs.pop("name"), **kwargs))
        else:
            chain.append(item)
    return Fallback(*chain)


register("fallback", _fallback)
register("torchdeq_anderson", _torchdeq("anderson"))
register("torchdeq_broyden", _torchdeq("broyden"))
register("torchdeq_fixed_point_iter", _torchdeq("fixed_point_iter"))

__all__ = [
    "select_rows",
    "AbstractSolver",
    "Anderson",
    "AndersonState",
    "Broyden",
    "BroydenState",
    "Fallback",
    "FixedPoint",
    "NewtonKrylov",
    "SolverLike",
    "TorchDEQSolver",
    "available",
    "get",
    "register",
]
