"""The one iteration loop that drives every solver.

It owns what every solver needs and none should copy: the step budget, the per-sample
stopping rule, convergence masks (a finished sample stops changing), active-set evaluation,
non-finite and divergence detection, each sample's best iterate, the residual trace and the
stats record. A solver only proposes the next iterate (see ``solvers.AbstractSolver``). The map
as the steps see it is ``Problem`` (``_problem.py``); the per-sample records are the ``Ledger``
(``_ledger.py``). Every operation on the iterates is out of place, so the same loop serves
``Unrolled`` under autograd.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor

from ._context import host_side
from ._ledger import Ledger, LoopOutput, Reference
from ._options import SolveOptions
from ._problem import Problem

__all__ = ["LoopOutput", "Problem", "iterate"]


@host_side  # its stopping rule branches on host arrays; f and the solver's step are compiled apart
def iterate(solver: Any, problem: Problem, z0: Tensor, options: SolveOptions, start: Optional[Tensor] = None,
            reference: Optional[Reference] = None) -> LoopOutput:
    """Run ``solver`` from ``z0`` until every sample has stopped or ``max_steps`` have run.

    A solve that continues another's (``Fallback``) passes ``start = f(z0)`` when it has it (no
    call) and the other loop's ``reference``, so divergence and escapes are judged against the
    samples' first tests, not against the restart.

    Convergence is tested every ``check_every`` iterations and at the last: each test is the
    loop's one wait for the device (the residual norms go to the host). With
    ``active_set=True`` stopped samples are not evaluated, and when the solver can select rows
    of its state the working tensors shrink to the samples still iterating.
    """
    z = z0
    fz = problem.evaluate(z, None) if start is None else start
    state = solver.init(z, fz, problem)
    book = Ledger(problem, options, z, fz, compactable=problem.active_set and solver.selects_rows, reference=reference)
    for it in range(1, options.max_steps + 1):
        book.count_step()
        last = it == options.max_steps
        if last or it % options.check_every == 0:
            if book.judge(z, fz, *problem.norms(z, fz)) or last:
                break
            z, fz, state = book.settle(z, fz, state, solver)
        else:
            book.keep(z, fz)
        z_next, state = solver.step(z, fz, state, problem)
        _check_step(solver, z_next, z)
        z = book.merge(z, z_next)
        fz = problem.evaluate(z, fz)
    return book.finish()


def _check_step(solver: Any, z_next: Tensor, z: Tensor) -> None:
    if z_next.shape != z.shape or z_next.dtype != z.dtype:
        raise RuntimeError(
            f"solver {solver!r} returned an iterate of shape {tuple(z_next.shape)} and dtype "
            f"{z_next.dtype}; expected {tuple(z.shape)} and {z.dtype}"
        )
