"""``fixed_point``: the functional entry point every other part of deqkit is built on."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from torch.nn.utils import parametrize

from ._context import solve_scope
from ._backward import AbstractBackward, Implicit, Unrolled
from ._loop import Problem, iterate
from ._result import Result, Solution, SolveError, Stats, describe_failure, worst
from .solvers import Anderson, TorchDEQSolver

_STOP_MODES = ("abs", "rel")


def _validate(f, z0, solver, backward, tol, stop_mode, max_steps, divergence, trajectory) -> None:
    if not callable(f):
        raise TypeError(f"f must be callable, got {type(f).__name__}")
    if not isinstance(z0, Tensor):
        raise TypeError(f"z0 must be a torch.Tensor, got {type(z0).__name__}")
    if z0.dim() < 1 or z0.shape[0] == 0:
        raise ValueError(f"z0 must have a non-empty batch dimension first, got shape {tuple(z0.shape)}")
    if not z0.is_floating_point():
        raise TypeError(f"z0 must be a floating-point tensor, got dtype {z0.dtype}")
    if not bool(torch.isfinite(z0).all()):
        raise ValueError("z0 contains NaN or Inf; start the solve from a finite tensor")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0:
        raise ValueError(f"tol must be a number > 0, got {tol!r}")
    if stop_mode not in _STOP_MODES:
        raise ValueError(f"stop_mode must be one of {_STOP_MODES}, got {stop_mode!r}")
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps must be an integer >= 1, got {max_steps!r}")
    if divergence is not None and not (isinstance(divergence, (int, float)) and divergence > 1):
        raise ValueError(f"divergence must be a number > 1 or None, got {divergence!r}")
    if isinstance(trajectory, bool) or not isinstance(trajectory, int) or trajectory < 0:
        raise ValueError(f"trajectory must be an integer >= 0, got {trajectory!r}")
    if isinstance(solver, type):
        raise TypeError(f"solver must be a solver object, not a class: use solver={solver.__name__}()")
    if not (hasattr(solver, "init") and hasattr(solver, "step")):
        raise TypeError(f"solver must have init() and step() methods, got {solver!r}")
    if isinstance(backward, type):
        raise TypeError(f"backward must be a backward-mode object, not a class: use backward={backward.__name__}()")
    if not isinstance(backward, AbstractBackward):
        raise TypeError(
            f"backward must be one of deqkit.Implicit/Phantom/Unrolled/OneStep, got {backward!r}"
        )


def fixed_point(
    f: Callable[..., Tensor],
    z0: Tensor,
    *,
    inputs: Sequence[Any] = (),
    solver: Any = None,
    backward: AbstractBackward | None = None,
    tol: float = 1e-4,
    stop_mode: str = "rel",
    max_steps: int = 50,
    active_set: bool = False,
    divergence: float | None = 1e4,
    trajectory: int = 0,
    throw: bool = True,
    throw_on_max_steps: bool = False,
) -> Solution:
    """Solve ``z = f(z, *inputs)`` per sample, starting from ``z0``, and return a ``Solution``.

    The batch is dim 0; each sample stops on its own once its residual is at most ``tol``
    (``"abs"``: ``||f(z) - z||``; ``"rel"``: that over ``||f(z)||``, L2 norms over all other
    dims) and stays fixed from then on. Each sample's best iterate ``z_k`` (lowest residual) is
    kept; the value returned is its image ``f(z_k)``.

    Args:
        f: the map; called as ``f(z, *inputs)``, it must return z's shape, dtype and device
            (under autocast its output is cast back to z0's dtype).
        z0: the starting point, shape (B, ...), finite.
        inputs: extra arguments of f. Pass per-sample inputs here, not in a closure, when
            ``active_set=True``: their rows are sliced along with z's.
        solver: how to step (default ``Anderson()``); any object with ``init``/``step``.
        backward: how to differentiate (default ``Implicit()``).
        tol: the tolerance on each sample's residual, > 0.
        stop_mode: "rel" (``||f(z) - z|| / ||f(z)||``) or "abs" (``||f(z) - z||``).
        max_steps: the iteration budget (calls of f) per solve, >= 1.
        active_set: call f only on the samples still iterating. Only for maps without
            cross-sample coupling (no batch norm).
        divergence: a sample whose absolute residual ``||f(z) - z||`` grows past this factor
            times its first value stops with DIVERGED (None: never), whatever ``stop_mode``.
        trajectory: keep the last ``trajectory`` images ``f(z_k)`` in ``Solution.trajectory``
            (with gradients under ``Unrolled``; ``Phantom`` returns its own steps).
        throw: raise ``SolveError`` on NONFINITE or DIVERGED (else return the code).
        throw_on_max_steps: also raise when a sample ends with MAX_STEPS.

    Example:
        >>> import torch, deqkit
        >>> x = torch.randn(8, 4)
        >>> sol = deqkit.fixed_point(lambda z, x: 0.5 * torch.tanh(z) + x, torch.zeros(8, 4),
        ...                          inputs=(x,), solver=deqkit.Anderson(m=5), tol=1e-6)
        >>> sol.result.name, sol.value.shape, bool(sol.stats.converged.all())
        ('SUCCESS', torch.Size([8, 4]), True)
    """
    solver = Anderson() if solver is None else solver
    backward = Implicit() if backward is None else backward
    _validate(f, z0, solver, backward, tol, stop_mode, max_steps, divergence, trajectory)
    if isinstance(inputs, Tensor) or not isinstance(inputs, (tuple, list)):
        raise TypeError(f"inputs must be a tuple of f's extra arguments, e.g. inputs=(x,), got {type(inputs).__name__}")
    with solve_scope(z0.shape[0]):
        return _solve(f, z0, tuple(inputs), solver, backward, tol, stop_mode, max_steps,
                      active_set, divergence, trajectory, throw, throw_on_max_steps)


def _solve(f, z0, inputs, solver, backward, tol, stop_mode, max_steps, active_set, divergence,
           trajectory, throw, throw_on_max_steps) -> Solution:

    problem = Problem(
        f, z0, inputs, active_set=active_set,
        checkpoint=isinstance(backward, Unrolled) and backward.checkpoint,
    )
    record = backward.records_forward and torch.is_grad_enabled()
    grad_ctx = contextlib.nullcontext() if record else torch.no_grad()

    # Parametrised weights (deqkit.nn.apply_norm) are computed once per solve, not once per
    # iteration. The cache must not outlive the forward solve: under no_grad it holds weights
    # without a graph, and the backward mode's own calls below need them with theirs.
    with grad_ctx, parametrize.cached():
        if isinstance(solver, TorchDEQSolver):
            best_z, residual, steps, trace = solver.run(problem, z0.detach() if not record else z0, tol=tol, stop_mode=stop_mode, max_steps=max_steps)
            best_fz = problem.f(best_z)
            status = torch.where(residual <= tol, int(Result.SUCCESS), int(Result.MAX_STEPS))
            status = torch.where(torch.isfinite(residual), status, int(Result.NONFINITE))
            kept = ()
        else:
            out = iterate(
                solver, problem, z0 if record else z0.detach(),
                tol=tol, stop_mode=stop_mode, max_steps=max_steps,
                divergence=divergence, trajectory=trajectory,
            )
            best_z, best_fz, residual, status, steps, trace, kept = (
                out.best_z, out.best_fz, out.residual, out.status, out.steps, out.trace, out.trajectory,
            )

    stats = Stats(
        nfev=problem.nfev,
        steps=steps.detach(),
        residual=residual.detach(),
        converged=(status == Result.SUCCESS),
        status=status.detach(),
        trace=trace,
        stop_mode=stop_mode,
        tol=float(tol),
        sample_evals=problem.sample_evals,
    )
    value = best_fz
    if torch.is_grad_enabled() and not backward.records_forward:
        attach_problem = Problem(f, z0, inputs)  # whole-batch calls for the graph
        with parametrize.cached():  # a fresh cache: these weights carry their graph
            value, extra = backward.attach(attach_problem.f, best_z, best_fz, stats, throw)
        if extra:
            kept = extra[-trajectory:] if trajectory else ()
        object.__setattr__(stats, "nfev", stats.nfev + attach_problem.nfev)
        object.__setattr__(stats, "sample_evals", stats.sample_evals + attach_problem.sample_evals)

    solution = Solution(value=value, result=worst(status), stats=stats, trajectory=tuple(kept))
    if throw and (solution.result >= Result.DIVERGED or (throw_on_max_steps and solution.result == Result.MAX_STEPS)):
        raise SolveError(describe_failure(status, residual, tol, stop_mode), solution)
    return solution
