"""``Fallback``: samples one solver fails are solved again by the next."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from .._ledger import LoopOutput
from .._loop import iterate
from .._options import SolveOptions
from .._result import Result
from ._base import AbstractSolver, as_solver


@dataclasses.dataclass(frozen=True, init=False)
class Fallback(AbstractSolver):
    """Run ``first``; the samples it fails are solved again, from their best iterate, by the next
    solver, and so on down the chain.

    A sample fails when it ends MAX_STEPS, ESCAPED, DIVERGED or NONFINITE; it goes on from its best
    iterate, or from ``z0`` if it escaped (its best is where it ran away), and divergence and
    escapes stay judged against its first test, whichever solver runs. The samples a solver
    finishes keep its answer bit for bit: value, residual, status, steps, trace and trajectory;
    a later solver never touches them (with ``active_set=True`` it does not even evaluate them).
    Each solver gets the whole ``max_steps`` budget; a sample's ``steps`` add up over the solvers
    that worked on it, and the trace has the columns of each run one after the other.
    ``Stats.finished_by`` says which solver (its index in the chain) gave each sample its answer,
    and ``Stats.nfev_by_solver`` how many calls of f each made. When the first solver finishes
    every sample, the chain costs nothing more.

    This is the advice DEQ users get by hand ("wrap the solve in try/except and switch to
    Broyden") as a solver: ``Fallback(Anderson(), Broyden())`` keeps Anderson's speed and lets
    Broyden rescue the samples where Anderson stalls. It works with every backward mode (the
    gradient flows through the runs under ``Unrolled``), ``active_set``, ``check_every``,
    ``DEQ`` and the registry (``deqkit.solvers.get("fallback", solvers=["anderson", "broyden"])``);
    compile its solvers (``Fallback(compiled(Anderson()), compiled(Broyden()))``), not the chain.

    Args:
        first: the solver that runs first (any solver; it may run a loop of its own).
        *then: the solvers that take over the failed samples, in order: solvers that step in
            the shared loop (a solver with a loop of its own, such as ``TorchDEQSolver``,
            cannot continue from other solvers' iterates).

    Example:
        >>> import torch, deqkit
        >>> f = lambda z: 0.999 * z + 0.001  # contracts slowly: plain iteration runs out of steps
        >>> sol = deqkit.fixed_point(f, torch.zeros(3, 2, dtype=torch.float64), tol=1e-9, max_steps=30,
        ...                          solver=deqkit.Fallback(deqkit.FixedPoint(), deqkit.Anderson()))
        >>> sol.result.name, sol.stats.finished_by.tolist(), len(sol.stats.nfev_by_solver)
        ('SUCCESS', [1, 1, 1], 2)
    """

    solvers: tuple[Any, ...]

    def __init__(self, first: Any, *then: Any):
        if not then:
            raise TypeError("Fallback needs at least two solvers: Fallback(first, next, ...)")
        for i, solver in enumerate((first, *then)):
            adapted = as_solver(solver, f"Fallback's solver {i}")
            if i and adapted.own_loop:
                raise ValueError(
                    f"Fallback cannot hand failed samples to {solver!r}: it runs a loop of its own from its own start, "
                    "so it cannot continue from another solver's iterates. Put it first, or use a solver that steps."
                )
        object.__setattr__(self, "solvers", (first, *then))

    def __repr__(self) -> str:
        return f"Fallback({', '.join(map(repr, self.solvers))})"

    @property
    def differentiable(self) -> bool:  # type: ignore[override]
        """Whether ``Unrolled`` can differentiate through every solver of the chain."""
        return all(as_solver(s).differentiable for s in self.solvers)

    @property
    def why_not_differentiable(self) -> str:  # type: ignore[override]
        for solver in map(as_solver, self.solvers):
            if not solver.differentiable:
                return f"{solver!r} in the chain: {solver.why_not_differentiable}"
        return ""

    def step(self, z: Tensor, fz: Tensor, state: Any, problem: Any) -> tuple[Tensor, Any]:
        raise RuntimeError("Fallback runs its solvers' loops; it is driven through run()")

    def run(self, problem: Any, z0: Tensor, options: SolveOptions) -> LoopOutput:
        chain = [as_solver(s) for s in self.solvers]
        out = chain[0].run(problem, z0, options)
        finished_by = torch.zeros_like(out.status)
        nfev = [out.nfev]
        for index, solver in enumerate(chain[1:], start=1):
            failed = out.status != int(Result.SUCCESS)
            if not bool(failed.any()):
                break
            before = problem.nfev
            problem.restart()
            # The failed samples go on from their best iterate, except those that escaped: their
            # "best" is where they ran away, so they start again from z0. Escapes and divergence
            # are judged against each sample's first test, whichever solver runs.
            escaped = out.status == int(Result.ESCAPED)
            if bool(escaped.any()):
                z, start = torch.where(escaped.reshape((-1,) + (1,) * (z0.dim() - 1)), z0, out.best_z), None
            else:
                z, start = out.best_z, out.best_fz
            again = iterate(solver, problem, z, options, start=start, reference=out.reference)
            out = _merge(out, again, failed, options.trajectory, retested=start is not None)
            finished_by = torch.where(failed, index, finished_by)
            nfev.append(problem.nfev - before)
        nfev += [0] * (len(chain) - len(nfev))
        return dataclasses.replace(out, finished_by=finished_by, nfev_by_solver=tuple(nfev))


def _merge(out: LoopOutput, again: LoopOutput, failed: Tensor, keep: int, retested: bool) -> LoopOutput:
    """``out`` with the rows of the ``failed`` samples from ``again``, the next solver's run
    from their best iterates (``retested``: its first test re-tested that start, no call of f:
    one step less)."""
    def rows(a: Tensor, b: Tensor) -> Tensor:
        return torch.where(failed.reshape((-1,) + (1,) * (a.dim() - 1)), a, b)

    trajectory: tuple[tuple[Tensor, Tensor], ...] = ()
    if keep:
        chain = (out.trajectory + again.trajectory)[-keep:]  # the failed samples' path goes on
        own = out.trajectory  # the others keep theirs, padded at the front to the same length
        own = (own[:1] * (len(chain) - len(own))) + own
        trajectory = tuple((rows(c[0], o[0]), rows(c[1], o[1])) for c, o in zip(chain, own))
    return dataclasses.replace(
        again,
        best_z=rows(again.best_z, out.best_z),
        best_fz=rows(again.best_fz, out.best_fz),
        residual=rows(again.residual, out.residual),
        status=rows(again.status, out.status),
        steps=out.steps + torch.where(failed, again.steps - int(retested), 0),
        trace=torch.cat([out.trace, again.trace], dim=1),
        trajectory=trajectory,
    )
