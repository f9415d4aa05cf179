"""Backward modes: how a gradient gets through the fixed point.

Each mode is a frozen record of hyperparameters. ``fixed_point`` asks it whether the forward
iterations must be recorded by autograd (only ``Unrolled``) and then hands it the solved
iterate to attach the graph it wants. Every mode pairs with every solver.
"""

from __future__ import annotations

import abc
import dataclasses
import warnings
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ._result import BackwardStats, Result, Stats, worst
from .solvers._base import check_positive, check_positive_int, check_unit_interval


class AbstractBackward(abc.ABC):
    """Base class of the backward modes."""

    #: True when the forward iterations themselves must run under autograd.
    records_forward: bool = False

    @abc.abstractmethod
    def attach(self, call: Callable[[Tensor], Tensor], z_star: Tensor, fz_star: Tensor, stats: Stats, throw: bool) -> tuple[Tensor, tuple]:
        """Return the solve's value with this mode's graph, and any extra iterates it made."""


@dataclasses.dataclass(frozen=True)
class Unrolled(AbstractBackward):
    """Back-propagate through every forward iteration (the solver's arithmetic included).

    Exact for the iterations actually run, whatever the solver; memory grows with the number
    of iterations, unless ``checkpoint=True`` recomputes each call of f in the backward pass
    (flat activation memory for roughly one extra forward). GET trains this way: six plain
    iterations from a random start, every iterate supervised.

    Args:
        checkpoint: recompute each call of f during backward instead of storing activations.
    """

    checkpoint: bool = False
    records_forward = True

    def attach(self, call, z_star, fz_star, stats, throw):
        return fz_star, ()


@dataclasses.dataclass(frozen=True)
class OneStep(AbstractBackward):
    """Jacobian-free backprop: the gradient of one call ``f(z*)`` with ``z*`` held constant.

    Costs one extra call of f and no adjoint solve; it drops the ``(I - J)^-1`` factor of the
    implicit gradient, a good descent direction when the map contracts strongly (Fung et al.,
    "JFB: Jacobian-free backpropagation for implicit networks", 2022).
    """

    def attach(self, call, z_star, fz_star, stats, throw):
        return call(z_star.detach()), ()


@dataclasses.dataclass(frozen=True)
class Phantom(AbstractBackward):
    """Phantom gradient: ``steps`` damped iterations from ``z*`` carry the gradient.

    ``z <- (1 - tau) z + tau f(z)``, ``steps`` times, starting at the detached solution; the
    value returned is the last of them. As ``steps`` grows (with ``tau`` = 1) the gradient
    approaches the implicit one (Geng et al., "On training implicit models", 2021).

    Args:
        steps: number of unrolled damped steps, >= 1.
        tau: damping in (0, 1].
    """

    steps: int = 5
    tau: float = 0.5

    def __post_init__(self):
        check_positive_int("steps", self.steps)
        check_unit_interval("tau", self.tau)

    def attach(self, call, z_star, fz_star, stats, throw):
        z = z_star.detach()
        iterates = []
        for _ in range(self.steps):
            fz = call(z)
            z = fz if self.tau == 1.0 else (1 - self.tau) * z + self.tau * fz
            iterates.append(z)
        return z, tuple(iterates)


@dataclasses.dataclass(frozen=True)
class Implicit(AbstractBackward):
    """Implicit differentiation: solve the adjoint fixed point ``u = J_f(z*)^T u + g``.

    The forward solve keeps no graph; one call ``f(z*)`` with autograd on gives the
    vector-Jacobian products, and the adjoint is solved with a deqkit solver, so memory does not
    grow with the number of forward iterations. Exact when the forward solve converged.
    The adjoint solve's residual, steps and Result are appended to ``stats.backward``; a failed
    adjoint solve raises (NONFINITE, DIVERGED) or warns (MAX_STEPS) rather than being used
    silently.

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

    def __post_init__(self):
        check_positive("tol", self.tol)
        check_positive_int("max_steps", self.max_steps)
        if self.stop_mode not in ("abs", "rel"):
            raise ValueError(f"stop_mode must be 'abs' or 'rel', got {self.stop_mode!r}")
        if self.solver is not None and not (hasattr(self.solver, "step") and hasattr(self.solver, "init")):
            raise TypeError(f"Implicit(solver=...) needs a solver with init/step, got {self.solver!r}")

    def attach(self, call, z_star, fz_star, stats, throw):
        z_req = z_star.detach().requires_grad_(True)
        fz = call(z_req)
        if not _needs_grad_besides(fz, z_req):  # nothing to differentiate: plain value
            return fz.detach(), ()
        return _ImplicitAdjoint.apply(fz, z_req, self, stats, throw), ()

    def adjoint(self, fz: Tensor, z_req: Tensor, grad: Tensor, stats: Stats, throw: bool) -> Tensor:
        """Solve ``u = J^T u + grad`` with vector-Jacobian products through ``fz = f(z_req)``."""
        from ._loop import Problem, iterate
        from .solvers import Anderson

        def vjp_map(u: Tensor) -> Tensor:
            (ju,) = torch.autograd.grad(fz, z_req, u, retain_graph=True)
            return ju + grad

        problem = Problem(vjp_map, grad)
        with torch.no_grad():
            out = iterate(
                self.solver if self.solver is not None else Anderson(m=5),
                problem,
                grad,
                tol=self.tol,
                stop_mode=self.stop_mode,
                max_steps=self.max_steps,
                divergence=1e4,
            )
        result = worst(out.status)
        stats.backward.append(BackwardStats(out.nfev, out.steps, out.residual, result))
        if result in (Result.NONFINITE, Result.DIVERGED):
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
        stack.extend(fn for fn, _ in node.next_functions)
    return False


class _ImplicitAdjoint(torch.autograd.Function):
    """Identity forward; backward replaces the incoming gradient g by the adjoint solution u."""

    @staticmethod
    def forward(ctx, fz, z_req, mode, stats, throw):
        ctx.graph = (fz, z_req)  # the one-call graph used for vector-Jacobian products
        ctx.mode, ctx.stats, ctx.throw = mode, stats, throw
        return fz.view_as(fz)

    @staticmethod
    def backward(ctx, grad):
        fz, z_req = ctx.graph
        with torch.enable_grad():
            u = ctx.mode.adjoint(fz, z_req, grad.detach(), ctx.stats, ctx.throw)
        if torch.is_grad_enabled():  # create_graph=True: one differentiable adjoint step at u*
            (ju,) = torch.autograd.grad(fz, z_req, u, retain_graph=True, create_graph=True)
            u = ju + grad
        return u, None, None, None, None
