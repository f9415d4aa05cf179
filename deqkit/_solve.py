"""``fixed_point``: the functional entry point every other part of deqkit is built on."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from . import _parametrize
from ._backward import AbstractBackward, Implicit, check_backward
from ._context import HOST_SIDE, mark_host_side, solve_scope, under_functorch
from ._ledger import LoopOutput
from ._options import SolveOptions, options_from
from ._problem import Problem
from ._result import BackwardLog, Result, Solution, SolveError, Stats, describe_failure, worst
from .solvers import Anderson
from .solvers._base import AbstractSolver, as_solver

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from ._options import OptionOverrides

DEFAULT_SOLVER = Anderson()  # immutable records, shared by every call that takes the defaults
DEFAULT_BACKWARD = Implicit()


def check_start(z0: Any) -> None:
    if not isinstance(z0, Tensor):
        raise TypeError(f"z0 must be a torch.Tensor, got {type(z0).__name__}")
    if under_functorch(z0):
        raise RuntimeError(
            "fixed_point cannot run inside torch.func transforms (vmap, grad, jacrev, ...): its per-sample "
            "stopping needs concrete residuals. The batch dimension already vectorises the solve: pass "
            "the batch as dim 0, and take gradients with torch.autograd (backward=Implicit() or others)."
        )
    if z0.dim() < 1 or z0.shape[0] == 0:
        raise ValueError(f"z0 must have a non-empty batch dimension first, got shape {tuple(z0.shape)}")
    if not z0.is_floating_point():
        raise TypeError(f"z0 must be a floating-point tensor, got dtype {z0.dtype}")
    # A non-finite z0 is refused after the solve (see _solve): any NaN or Inf in it makes its
    # sample's first residual non-finite, so checking there costs no pass over z0 and no wait
    # for the device in the common case.


def _refuse_a_non_finite_start(z0: Tensor, status: Tensor) -> None:
    if bool((status == Result.NONFINITE).any()) and not bool(torch.isfinite(z0).all()):
        raise ValueError("z0 contains NaN or Inf; start the solve from a finite tensor")


def fixed_point(
    f: Callable[..., Tensor],
    z0: Tensor,
    *,
    inputs: Sequence[Any] = (),
    solver: Any = None,
    backward: Optional[AbstractBackward] = None,
    options: Optional[SolveOptions] = None,
    **overrides: "Unpack[OptionOverrides]",
) -> Solution:
    """Solve ``z = f(z, *inputs)`` per sample, starting from ``z0``, and return a ``Solution``.

    The batch is dim 0; each sample stops on its own once its residual is at most ``tol``
    (``"abs"``: ``||f(z) - z||``; ``"rel"``: that over ``||f(z)||``, L2 norms over all other
    dims) and stays fixed from then on. Each sample's best iterate ``z_k`` (lowest residual) is
    kept; the value returned is its image ``f(z_k)``.

    Args:
        f: the map; called as ``f(z, *inputs)``, it must return z's shape, dtype and device
            (under autocast its output is cast back to z0's dtype), and must not change its
            arguments in place (checked). Its exceptions reach the caller with their own type.
        z0: the starting point, shape (B, ...), finite.
        inputs: extra arguments of f. With ``active_set=True`` every tensor here is per-sample
            (first dim B) and is sliced with z; shared tensors go in f's closure or module.
        solver: how to step (default ``Anderson()``); any object with ``init``/``step``, or a
            solver with its own loop through the ``run`` hook (``TorchDEQSolver``).
        backward: how to differentiate (default ``Implicit()``); it decides the gradient of
            ``Solution.value`` and of every tensor in ``Solution.trajectory``, never their values.
        options: a ``SolveOptions`` record (default ``SolveOptions()``); the keyword arguments
            below replace its fields for this call.

    Keyword Args:
        tol (float | None): the tolerance on each sample's residual, a finite number > 0; or ``None`` for a
            fixed number of iterations: exactly ``max_steps`` for every sample, no stopping
            test, the last iterate's image returned.
        stop_mode (str): "rel" (``||f(z) - z|| / ||f(z)||``) or "abs" (``||f(z) - z||``).
        max_steps (int): the iteration budget (calls of f) per solve, >= 1.
        active_set (bool): call f only on the samples still iterating. Only for maps without
            cross-sample coupling (no batch norm).
        divergence (float | None): a sample whose absolute residual ``||f(z) - z||`` grows past this factor
            times its first value stops with DIVERGED (None: never), whatever ``stop_mode``.
        trajectory (int): keep the images ``f(z_k)`` of the last ``trajectory`` iterates in
            ``Solution.trajectory`` (oldest first), each with the backward mode's gradient at
            its own iterate (deep supervision / fixed-point correction).
        check_every (int): test convergence every this many iterations (default every one). Each
            test is one wait for the device (the residual norms go to the host); on a GPU a
            larger value lets it run ahead, at up to ``check_every - 1`` extra iterations.
        escape (float | None): with stop_mode "rel", a sample whose relative test passes only
            because ``||f(z)||`` grew past this factor times its first value (its absolute
            residual not below half its largest) ends ESCAPED, not SUCCESS (None: never).
        throw (bool): raise ``SolveError`` on ESCAPED, DIVERGED or NONFINITE (else return the code).
        throw_on_max_steps (bool): also raise when a sample ends with MAX_STEPS.

    Numbers may be Python or numpy scalars. The value depends only on (f, z0, inputs, solver,
    options): never on grad mode (``torch.no_grad()``, ``torch.inference_mode()``), on
    ``train()``/``eval()`` or on the backward mode.

    Example:
        >>> import torch, deqkit
        >>> x = torch.randn(8, 4)
        >>> sol = deqkit.fixed_point(lambda z, x: 0.5 * torch.tanh(z) + x, torch.zeros(8, 4),
        ...                          inputs=(x,), solver=deqkit.Anderson(m=5), tol=1e-6)
        >>> sol.result.name, sol.value.shape, bool(sol.stats.converged.all())
        ('SUCCESS', torch.Size([8, 4]), True)
    """
    if not callable(f):
        raise TypeError(f"f must be callable, got {type(f).__name__}")
    check_start(z0)
    if isinstance(inputs, Tensor) or not isinstance(inputs, (tuple, list)):
        raise TypeError(f"inputs must be a tuple of f's extra arguments, e.g. inputs=(x,), got {type(inputs).__name__}")
    return solve(f, z0, tuple(inputs), solver, backward, options_from(options, dict(overrides)))


def solve(f: Callable[..., Tensor], z0: Tensor, inputs: tuple[Any, ...], solver: Any, backward: Any,
          options: SolveOptions) -> Solution:
    """``fixed_point`` with its options as one checked ``SolveOptions`` record (used by ``DEQ``);
    ``solver``/``backward`` None take the defaults."""
    if HOST_SIDE:  # checked here, not in the call: a compiled model would break its graph at the call
        mark_host_side()
    solver = as_solver(DEFAULT_SOLVER if solver is None else solver)
    backward = DEFAULT_BACKWARD if backward is None else backward
    check_backward(backward)
    backward.check(solver, options)
    with solve_scope(z0.shape[0]):
        return _solve(f, z0, inputs, solver, backward, options)


def _solve(f: Callable[..., Tensor], z0: Tensor, inputs: tuple[Any, ...], solver: AbstractSolver,
           backward: AbstractBackward, options: SolveOptions) -> Solution:
    record = backward.records_forward and torch.is_grad_enabled()
    attach = torch.is_grad_enabled() and not record
    call = backward.wrap(f) if record else _parametrize.fill_with_graph(f) if attach else f
    problem = Problem(f, z0, inputs, active_set=options.active_set, call=call)
    log = BackwardLog()

    with _parametrize.solve_cache():
        with contextlib.nullcontext() if record else torch.no_grad():
            out = solver.run(problem, z0 if record else z0.detach(), options)
        _refuse_a_non_finite_start(z0, out.status)
        value, kept = out.best_fz, tuple(fz for _, fz in out.trajectory)
        nfev, sample_evals = out.nfev, out.sample_evals
        if attach:
            graph_problem = Problem(f, z0, inputs)  # whole-batch calls for the graph
            value, kept = _attach(backward, graph_problem, out, log, options.throw)
            nfev += graph_problem.nfev
            sample_evals += graph_problem.sample_evals

    status = out.status
    stats = Stats(
        nfev=nfev,
        steps=out.steps.detach(),
        residual=out.residual.detach(),
        converged=(status == Result.SUCCESS) & (not options.fixed_steps),
        status=status.detach(),
        trace=out.trace,
        stop_mode=options.stop_mode,
        tol=options.tol,
        sample_evals=sample_evals,
        backward=log,
        finished_by=torch.zeros_like(status) if out.finished_by is None else out.finished_by,
        nfev_by_solver=out.nfev_by_solver or (out.nfev,),
    )
    solution = Solution(value=value, result=worst(status), stats=stats, trajectory=kept)
    failed = solution.result >= Result.ESCAPED or (options.throw_on_max_steps and solution.result == Result.MAX_STEPS)
    if options.throw and failed:
        raise SolveError(describe_failure(status, out.residual, options.tol, options.stop_mode), solution)
    return solution


def _attach(backward: AbstractBackward, problem: Problem, out: LoopOutput, log: BackwardLog,
            throw: bool) -> tuple[Tensor, tuple[Tensor, ...]]:
    """The value and every kept iterate with the mode's gradient, each at its own point; values
    stay the forward's, bit for bit. The value is often also the last kept iterate and gets one
    graph: (iterate, attached) pairs are compared by identity (a list, not a dict keyed by
    id(), which torch.compile would recompile for at every call)."""
    attached: list[tuple[Tensor, Tensor]] = []

    def attach_to(z: Tensor, fz: Tensor) -> Tensor:
        for seen, result in attached:
            if seen is fz:
                return result
        result = backward.attach(problem.f, z, fz, log, throw)
        attached.append((fz, result))
        return result

    value = attach_to(out.best_z, out.best_fz)
    return value, tuple(attach_to(z, fz) for z, fz in out.trajectory)
