"""torchdeq's solvers as deqkit solvers (an adapter for comparisons and migration)."""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

import torch

from ._base import AbstractSolver

_NAMES = ("anderson", "broyden", "fixed_point_iter", "simple_fixed_point_iter")


def _import_torchdeq():
    try:
        return importlib.import_module("torchdeq.solver")
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "TorchDEQSolver needs the torchdeq package: pip install 'deqkit[torchdeq]' "
            "(or pip install torchdeq==0.1.0)"
        ) from err


@dataclasses.dataclass(frozen=True, init=False)
class TorchDEQSolver(AbstractSolver):
    """Run one of torchdeq's solvers inside deqkit, with its stats mapped to deqkit's record.

    torchdeq's solver runs its own loop (batch-wide stopping: the batch iterates until every
    sample is below ``tol``), so ``active_set`` and ``divergence`` do not apply; everything
    else (backward modes, the typed Solution, ``throw``) works as with deqkit's solvers.
    ``stats.nfev`` counts the calls torchdeq actually made; ``stats.steps`` is the first
    iteration at which each sample was below ``tol`` (or all iterations run).

    Args:
        name: ``"anderson"``, ``"broyden"``, ``"fixed_point_iter"`` or ``"simple_fixed_point_iter"``.
        **kwargs: passed to the torchdeq solver (e.g. ``m=6, lam=1e-4, tau=1.0`` for anderson,
            ``LBFGS_thres``, ``ls`` for broyden). Checked against its signature.

    Example:
        >>> import torch, deqkit
        >>> sol = deqkit.fixed_point(torch.cos, torch.zeros(2, 3), tol=1e-5,
        ...                          solver=deqkit.TorchDEQSolver("anderson", m=5))
        >>> round(float(sol.value[0, 0]), 4)
        0.7391
    """

    name: str
    kwargs: tuple

    def __init__(self, name: str, **kwargs: Any):
        if name not in _NAMES:
            raise ValueError(f"unknown torchdeq solver {name!r}; available: {', '.join(_NAMES)}")
        module = _import_torchdeq()
        import inspect

        fn = module.get_solver(name)
        accepted = set(inspect.signature(fn).parameters) - {"func", "x0", "max_iter", "tol", "stop_mode", "indexing"}
        unknown = sorted(set(kwargs) - accepted)
        if unknown:
            raise ValueError(
                f"unknown keyword(s) {unknown} for torchdeq's {name!r} solver; it accepts {sorted(accepted)}"
            )
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "kwargs", tuple(sorted(kwargs.items())))

    def step(self, z, fz, state, problem):  # pragma: no cover - the adapter runs torchdeq's own loop
        raise RuntimeError("TorchDEQSolver runs torchdeq's loop; it is driven through run()")

    def run(self, problem, z0, *, tol, stop_mode, max_steps):
        """Solve with torchdeq; return (best_z, residual, steps, trace).

        The trace is deqkit's own: the residual of every call torchdeq made, in ``stop_mode``
        (torchdeq's trace starts with a placeholder and is padded to ``max_iter``).
        """
        from .._loop import residual_norm

        fn = _import_torchdeq().get_solver(self.name)
        history = []

        def func(z):
            z = z.reshape(z0.shape)
            out = problem.f(z)
            history.append(residual_norm(z, out, stop_mode))
            return out

        z, _, info = fn(func, z0, max_iter=max_steps, tol=tol, stop_mode=stop_mode, **dict(self.kwargs))
        z = z.reshape(z0.shape)
        trace = torch.stack(history, dim=1)
        best = torch.cummin(trace, dim=1).values
        below = best <= tol
        steps = torch.where(below.any(dim=1), below.float().argmax(dim=1) + 1, torch.full_like(below[:, 0], trace.shape[1], dtype=torch.long))
        residual = info[f"{stop_mode}_lowest"].reshape(-1).to(device=trace.device, dtype=trace.dtype)
        return z, residual, steps.long(), trace
