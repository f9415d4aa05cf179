"""Backward modes: how a gradient gets through the fixed point.

Each mode is a frozen record of hyperparameters that owns everything about how the forward
solve is recorded: whether the forward iterations themselves run under autograd
(``records_forward``), how each call of f is wrapped while they do (``wrap``), which solvers
and options it can honour (``check``), and, for modes that do not record the forward, the
gradient it gives a tensor the solve returns (``attach``). ``fixed_point`` asks these
questions and names no concrete mode.

The rules every mode keeps:

* The value is the solve's: ``attach`` returns a tensor equal, bit for bit, to the forward
  value it is given; the mode only decides its gradient. So a solve returns the same value
  with or without autograd, in ``train()`` or ``eval()``.
* ``Solution.value`` and every tensor in ``Solution.trajectory`` carry the mode's gradient,
  each at its own iterate.
* Higher-order gradients are exact for the mode's own surrogate (``Unrolled``: the iterations
  run; ``OneStep``: one call of f; ``Phantom``: its damped steps) or refused (``Implicit``
  raises under ``create_graph=True``).
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import warnings
from typing import Any, Callable, Optional, cast

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from . import _checks, _parametrize
from ._context import Replay, under_functorch
from ._options import SolveOptions
from ._problem import Problem
from ._result import BackwardLog, BackwardStats, Result, worst
from .solvers import Anderson
from .solvers._base import as_solver, set_fields

Call = Callable[[Tensor], Tensor]


class AbstractBackward(abc.ABC):
    """Base class of the backward modes; the contract between a mode and the solve.

    A mode of your own subclasses this and implements ``surrogate`` (or sets
    ``records_forward = True``): ``attach`` then gives every returned tensor the surrogate's
    gradient with the solve's value.
    """

    #: True when the forward iterations themselves run under autograd (the value's graph is
    #: the solver's own arithmetic), so nothing is attached afterwards.
    records_forward: bool = False

    def check(self, solver: Any, options: SolveOptions) -> None:
        """Raise ValueError, naming the combination, if this mode cannot give its gradient
        for a solve with ``solver`` and ``options``. Called before the solve starts."""

    def wrap(self, f: Callable[..., Tensor]) -> Callable[..., Tensor]:
        """How each call ``f(z, *inputs)`` of the forward loop is made (default: as it is)."""
        return f

    def surrogate(self, call: Call, z: Tensor, log: BackwardLog, throw: bool) -> Optional[Tensor]:
        """A tensor whose gradient this mode gives the image ``f(z)`` (its value is not used);
        None when nothing in f needs a gradient. ``call`` is one counted call of f with autograd."""
        raise NotImplementedError(f"{type(self).__name__} records the forward iterations; it attaches nothing")

    def attach(self, call: Call, z: Tensor, fz: Tensor, log: BackwardLog, throw: bool) -> Tensor:
        """``fz`` (= f(z) from the forward solve, no graph), with this mode's gradient.

        The value is ``fz`` exactly: ``fz + (g - g.detach())`` adds an exact zero, and the
        gradient flows to ``g``, the surrogate.
        """
        g = self.surrogate(call, z, log, throw)
        if g is None or g.grad_fn is None:
            return fz
        return fz + (g - g.detach())


class _Recompute:
    """What a recomputed call re-enters: the solve and rows it ran in (so per-solve state, such
    as ``deqkit.nn.VariationalDropout``'s mask, is the one the call used) and the normalised
    weights it read. Reusable and re-entrant, as a checkpoint's recomputation context must be
    (entered again for a second derivative)."""

    def __init__(self) -> None:
        self.parts = (Replay(), _parametrize.Reuse(_parametrize.live_cache()))
        self.stacks: list[contextlib.ExitStack] = []

    def __enter__(self) -> None:
        stack = contextlib.ExitStack()
        for part in self.parts:
            stack.enter_context(part)
        self.stacks.append(stack)

    def __exit__(self, *exc: Any) -> None:
        self.stacks.pop().close()


def _checkpointed(f: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``f`` with activation checkpointing on every call after the first, under autograd.

    The recomputation in the backward pass replays the call exactly: torch's checkpoint
    restores the random number generators' state (CPU and CUDA: ``nn.Dropout`` and
    ``torch.rand`` draw what they drew), and ``_Recompute`` the solve's own context. The first
    call runs without checkpointing so that normalised weights are computed outside every
    checkpoint, once per solve (see ``_parametrize``).
    """
    first = [True]

    def call(z: Tensor, *inputs: Any) -> Tensor:
        if not torch.is_grad_enabled() or first[0]:
            first[0] = False
            return f(z, *inputs)
        recompute = _Recompute()
        return cast(Tensor, checkpoint(
            f, z, *inputs, use_reentrant=False, preserve_rng_state=True,
            context_fn=lambda: (contextlib.nullcontext(), recompute),
        ))

    return call


@dataclasses.dataclass(frozen=True)
class Unrolled(AbstractBackward):
    """Back-propagate through every forward iteration (the solver's arithmetic included).

    Exact for the iterations actually run, whatever the solver, higher derivatives included;
    memory grows with the number of iterations, unless ``checkpoint=True`` recomputes each call
    of f in the backward pass (activation memory of about one call, for roughly one extra
    forward). GET trains this way: six plain iterations from a random start
    (``max_steps=6, tol=None``), every iterate supervised.

    Needs a solver whose iterations autograd can differentiate (``differentiable`` is not
    False): ``TorchDEQSolver`` (torchdeq detaches its iterates) and ``NewtonKrylov`` (GMRES has no
    usable derivative at round-off residuals) are refused with an error naming the pairing.

    Args:
        checkpoint: recompute each call of f during backward instead of storing activations.
    """

    checkpoint: bool = False
    records_forward = True

    def __post_init__(self) -> None:
        _checks.boolean("checkpoint", self.checkpoint)

    def check(self, solver: Any, options: SolveOptions) -> None:
        if not solver.differentiable:
            why = solver.why_not_differentiable
            raise ValueError(
                f"backward=Unrolled() cannot differentiate through {solver!r}: {why}. Use Implicit(), "
                "Phantom() or OneStep() with it, or Unrolled() with FixedPoint, Anderson or Broyden."
            )

    def wrap(self, f: Callable[..., Tensor]) -> Callable[..., Tensor]:
        return _checkpointed(f) if self.checkpoint else f


@dataclasses.dataclass(frozen=True)
class OneStep(AbstractBackward):
    """Jacobian-free backprop: the gradient of one call ``f(z*)`` with ``z*`` held constant.

    Costs one extra call of f and no adjoint solve; it drops the ``(I - J)^-1`` factor of the
    implicit gradient, a good descent direction when the map contracts strongly (Fung et al.,
    "JFB: Jacobian-free backpropagation for implicit networks", 2022).
    """

    def surrogate(self, call: Call, z: Tensor, log: BackwardLog, throw: bool) -> Optional[Tensor]:
        return call(z.detach())


@dataclasses.dataclass(frozen=True)
class Phantom(AbstractBackward):
    """Phantom gradient: ``steps`` damped iterations from ``z*`` carry the gradient.

    The gradient is that of ``z <- (1 - tau) z + tau f(z)``, ``steps`` times, from the detached
    solution ``z*``. The steps are not part of the value: the solve returns ``f(z*)`` in every
    mode, with or without autograd (torchdeq returns the last damped step in training instead;
    the two agree at a fixed point). As ``steps`` grows (with ``tau`` = 1) the gradient
    approaches the implicit one (Geng et al., "On training implicit models", 2021).

    Args:
        steps: number of unrolled damped steps, >= 1.
        tau: damping in (0, 1].
    """

    steps: int = 5
    tau: float = 0.5

    def __post_init__(self) -> None:
        set_fields(self, steps=_checks.integer("steps", self.steps), tau=_checks.unit_interval("tau", self.tau))

    def surrogate(self, call: Call, z: Tensor, log: BackwardLog, throw: bool) -> Optional[Tensor]:
        z = z.detach()
        for _ in range(self.steps):
            fz = call(z)
            z = fz if self.tau == 1.0 else (1 - self.tau) * z + self.tau * fz
        return z


@dataclasses.dataclass(frozen=True)
class Implicit(AbstractBackward):
    """Implicit differentiation: solve the adjoint fixed point ``u = J_f(z*)^T u + g``.

    The forward solve keeps no graph; one call ``f(z*)`` with autograd on gives the
    vector-Jacobian products, and the adjoint is solved with a deqkit solver (any solver,
    ``TorchDEQSolver`` included), so memory does not grow with the number of forward
    iterations. Exact when the forward solve converged. Each tensor of ``Solution.trajectory``
    gets the implicit gradient at its own iterate, as torchdeq gives it.

    The adjoint solve's residual, steps and Result are appended to ``stats.backward``; a failed
    adjoint solve raises (ESCAPED, DIVERGED, NONFINITE) or warns (MAX_STEPS) rather than being used
    silently. Second derivatives (``create_graph=True`` through the solve) are refused with an
    error: use ``Unrolled`` where they are needed.

    Args:
        solver: the adjoint solver (default ``Anderson(m=5)``).
        tol: adjoint tolerance, in ``stop_mode``.
        max_steps: adjoint iteration budget.
        stop_mode: "abs" or "rel".
    """

    solver: Any = None
    tol: float = 1e-6
    max_steps: int = 100
    stop_mode: str = "rel"

    def __post_init__(self) -> None:
        if self.tol is None:
            raise ValueError("Implicit(tol=None) is not allowed: the adjoint solve needs a tolerance > 0")
        options = self.options()  # checks tol, stop_mode and max_steps with the solve's own rules
        set_fields(self, tol=options.tol, max_steps=options.max_steps)
        if self.solver is not None:
            as_solver(self.solver, "Implicit(solver=...)")

    def options(self) -> SolveOptions:
        """The options of the adjoint solve."""
        return SolveOptions(tol=self.tol, stop_mode=self.stop_mode, max_steps=self.max_steps, divergence=1e4, throw=False)

    def surrogate(self, call: Call, z: Tensor, log: BackwardLog, throw: bool) -> Optional[Tensor]:
        z_req = z.detach().requires_grad_(True)
        fz = call(z_req)
        if not _needs_grad_besides(fz, z_req):  # nothing in f needs a gradient
            return None
        return cast(Tensor, _ImplicitAdjoint.apply(fz, z_req, self, log, throw))  # type: ignore[no-untyped-call]

    def adjoint(self, fz: Tensor, z_req: Tensor, grad: Tensor, log: BackwardLog, throw: bool) -> Tensor:
        """Solve ``u = J^T u + grad`` with vector-Jacobian products through ``fz = f(z_req)``."""
        def vjp_map(u: Tensor) -> Tensor:
            (ju,) = torch.autograd.grad(fz, z_req, u, retain_graph=True)
            return ju + grad

        with torch.no_grad():
            solver = as_solver(self.solver if self.solver is not None else _ADJOINT_SOLVER, "Implicit(solver=...)")
            out = solver.run(Problem(vjp_map, grad), grad, self.options())
        result = worst(out.status)
        log.append(BackwardStats(out.nfev, out.steps, out.residual, result))
        if result >= Result.ESCAPED:
            if throw:
                raise RuntimeError(
                    f"the implicit backward (adjoint) solve ended with {result.name}: {result.message}; "
                    "the gradient is unusable. Check the spectral radius of the Jacobian at the fixed point, "
                    "or use Phantom/OneStep."
                )
            warnings.warn(f"implicit backward solve ended with {result.name}; the gradient is its best iterate", RuntimeWarning, stacklevel=3)
        elif result == Result.MAX_STEPS:
            warnings.warn(
                f"implicit backward solve hit max_steps={self.max_steps} (max residual "
                f"{float(out.residual.max()):.3g} > tol={self.tol:g}); the gradient is approximate",
                RuntimeWarning,
                stacklevel=3,
            )
        return out.best_fz


def _needs_grad_besides(out: Tensor, leaf: Tensor) -> bool:
    """True if ``out``'s graph reaches a tensor requiring grad other than ``leaf``."""
    if out.grad_fn is None:
        return False
    seen, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad nodes hold their leaf
        if variable is not None and variable is not leaf:
            return True
        stack.extend(fn for fn, _ in node.next_functions if fn is not None)
    return False


class _ImplicitAdjoint(torch.autograd.Function):
    """Identity forward; backward replaces the incoming gradient g by the adjoint solution u."""

    @staticmethod
    def forward(ctx: Any, fz: Tensor, z_req: Tensor, mode: Implicit, log: BackwardLog, throw: bool) -> Tensor:
        ctx.graph = (fz, z_req)  # the one-call graph used for vector-Jacobian products
        ctx.mode, ctx.log, ctx.throw = mode, log, throw
        return fz.view_as(fz)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
        if torch.is_grad_enabled():
            raise RuntimeError(
                "second derivatives through backward=Implicit() are not supported (a backward pass "
                "with create_graph=True reached an implicit solve): the adjoint solve is not itself "
                "differentiated, so the result would be wrong. Use backward=Unrolled() (exact through "
                "the iterations run) where higher-order gradients are needed, e.g. forces -dE/dx in a loss."
            )
        if under_functorch(grad):
            raise RuntimeError(
                "backward=Implicit() cannot run its adjoint solve under vmap: a vectorized Jacobian "
                "(torch.autograd.functional.jacobian(..., vectorize=True), torch.func.jacrev or vmap over "
                "torch.autograd.grad) batches the incoming gradients, and the solve's per-sample stopping "
                "needs concrete residuals. Pass vectorize=False (one adjoint solve per output row), or use "
                "backward=Unrolled() or Phantom() for vectorized Jacobians."
            )
        fz, z_req = ctx.graph
        with torch.enable_grad():
            u = ctx.mode.adjoint(fz, z_req, grad.detach(), ctx.log, ctx.throw)
        return u, None, None, None, None


_ADJOINT_SOLVER = Anderson(m=5)


def check_backward(backward: Any) -> None:
    """Refuse anything that is not a backward-mode object, naming the fix."""
    if isinstance(backward, type):
        raise TypeError(f"backward must be a backward-mode object, not a class: use backward={backward.__name__}()")
    if not isinstance(backward, AbstractBackward):
        raise TypeError(f"backward must be a deqkit backward mode (Implicit, Phantom, Unrolled, OneStep), got {backward!r}")
