"""A torchdeq-style solver function run as one deqkit solve.

The layer's forward solves go through ``deqkit``'s ``solve``: deqkit checks f's output
(shape, dtype, device, no in-place change of its argument), computes parametrised weights
once per solve, and records calls of f; the solver function, called through the ``run`` hook
of deqkit's solver protocol, does the iterating (torchdeq's batch-wide rule) and its
``SolverStat`` and indexed states are handed back with the value.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import torch
from torch import Tensor

from deqkit import _solve
from deqkit._backward import OneStep
from deqkit._loop import LoopOutput
from deqkit._options import SolveOptions
from deqkit._result import Result
from deqkit.solvers import AbstractSolver


class _Engine(AbstractSolver):
    """One call's solver: the function, its options, and a slot for what it returns."""

    differentiable: ClassVar[bool] = False
    why_not_differentiable: ClassVar[str] = "the torchdeq-style solver runs without a graph"

    def __init__(self, fn: Callable, max_iter: int, tol: float, indexing, options: dict):
        self.fn, self.max_iter, self.tol, self.indexing, self.options = fn, max_iter, tol, indexing, options
        self.states: list = []
        self.info: Any = None

    def __repr__(self) -> str:
        return f"torchdeq-style solver {getattr(self.fn, '__name__', self.fn)!r}"

    def step(self, z, fz, state, problem):  # pragma: no cover - driven through run()
        raise RuntimeError("this solver runs its own loop through run()")

    def run(self, problem, z0: Tensor, options: SolveOptions) -> LoopOutput:
        value, states, info = self.fn(problem.f, z0, max_iter=self.max_iter, tol=self.tol,
                                      stop_mode=options.stop_mode, indexing=self.indexing, **self.options)
        self.states, self.info = list(states), info
        res_dtype = torch.promote_types(z0.dtype, torch.float32)
        batch = z0.shape[0]
        lowest = info.get(f"{options.stop_mode}_lowest")
        if lowest is None or lowest.numel() != batch:  # a user solver without per-sample stats
            lowest = torch.full((batch,), float("nan"), device=z0.device)
        lowest = lowest.to(device=z0.device, dtype=res_dtype)
        trace = info.get(f"{options.stop_mode}_trace")
        if trace is None or trace.dim() != 2 or trace.shape[0] != batch:
            trace = lowest.unsqueeze(1)
        status = torch.where(lowest < self.tol, int(Result.SUCCESS), int(Result.MAX_STEPS)).to(z0.device)
        status = torch.where(torch.isfinite(lowest) | torch.isnan(lowest), status, int(Result.NONFINITE))
        nstep = info.get("nstep")
        steps = (nstep.reshape(-1).long() if nstep is not None and nstep.numel() == batch
                 else torch.full((batch,), self.max_iter, dtype=torch.long)).to(z0.device)
        return LoopOutput(best_z=value, best_fz=value, residual=lowest, status=status, steps=steps,
                          trace=trace.to(device=z0.device, dtype=res_dtype), trajectory=(), nfev=problem.nfev,
                          sample_evals=problem.sample_evals)


def solve_like_torchdeq(fn: Callable, func: Callable, z0: Tensor, max_iter: int, tol: float, stop_mode: str,
                        indexing=None, **options):
    """``fn(func, z0, max_iter, tol, stop_mode, indexing, **options)`` run as a deqkit solve
    (without a graph): returns torchdeq's ``(z, states, info)``."""
    if int(max_iter) == 0:  # no iterations (GET's f_max_iter=0): nothing for deqkit's loop to drive
        with torch.no_grad():  # calling the function directly saves the solve's set-up, ~0.15 ms a step
            return fn(func, z0, max_iter=0, tol=tol, stop_mode=stop_mode, indexing=indexing, **options)
    engine = _Engine(fn, max_iter, tol, indexing, options)
    solve_options = SolveOptions(tol=tol, stop_mode=stop_mode, max_steps=max(int(max_iter), 1), divergence=None,
                                 throw=False)
    with torch.no_grad():
        solution = _solve.solve(lambda z: func(z), z0, (), engine, OneStep(), solve_options)
    return solution.value, engine.states, engine.info
