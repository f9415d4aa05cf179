"""torchdeq's gradient functors: phantom gradient steps and implicit differentiation (IFT).

``backward_factory(grad_type, ...)`` returns ``produce(trainer, func, z_pred, writer=None)``
-> list of states carrying the gradient. ``grad_type`` is an int ``k`` (``k`` damped steps
``z <- tau f(z) + (1 - tau) z`` from ``z_pred``, back-propagated through) or ``'ift'``
(one step ``f(z_pred)`` whose gradient is replaced by the solution of the adjoint fixed point
``g = J^T g + grad``, solved with ``b_solver`` from zero).

Differences from torchdeq: ``hook_ift=True`` runs the same bounded implicit backward as
``hook_ift=False`` (torchdeq's hook recursed without bound when the module was called twice
before one backward); a second derivative through IFT raises instead of being silently wrong;
unknown keywords raise.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import autograd

__all__ = ["backward_factory", "make_pair"]


def make_pair(target, source):
    """``source`` as long as ``target``: itself when equal in length, its one item repeated."""
    if len(target) == len(source):
        return list(source)
    if len(source) == 1:
        return [source[0]] * len(target)
    raise ValueError(f"cannot pair {len(source)} gradient settings {list(source)} with {len(target)} solver segments "
                     f"{list(target)}: give one value, or one per segment")


class _ImplicitGrad(autograd.Function):
    """Identity forward; backward solves ``g = J_f(z)^T g + grad`` for the incoming grad."""

    @staticmethod
    def forward(ctx, z_pred, func, b_solver, b_solver_kwargs, writer):
        ctx.func, ctx.b_solver, ctx.b_solver_kwargs, ctx.writer = func, b_solver, b_solver_kwargs, writer
        ctx.save_for_backward(z_pred.detach())
        return z_pred.view_as(z_pred)

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():  # create_graph=True: a graph of this gradient is wanted
            raise RuntimeError(
                "second derivatives through implicit differentiation (ift=True / hook_ift=True) are not "
                "available: the adjoint solve has no derivative of its own, so the result would be silently "
                "partial (torchdeq returns it). Use phantom gradients (ift=False, grad=k), or deqkit's "
                "backward=deqkit.Unrolled() for exact higher derivatives."
            )
        return _ImplicitGrad._adjoint(ctx, grad)

    @staticmethod
    def _adjoint(ctx, grad):
        (z_pred,) = ctx.saved_tensors
        h = z_pred.clone().requires_grad_()
        with torch.enable_grad():
            fh = ctx.func(h)

        def adjoint(y):
            return autograd.grad(fh, h, y, retain_graph=True)[0] + grad

        with torch.no_grad():
            grad_star, _, info = ctx.b_solver(adjoint, torch.zeros_like(grad), **ctx.b_solver_kwargs)
        if ctx.writer is not None:
            ctx.writer(info)
        return grad_star, None, None, None, None


def backward_factory(grad_type="ift", hook_ift: bool = False, b_solver: Optional[Callable] = None,
                     b_solver_kwargs: Optional[dict] = None, sup_gap: int = -1, sup_loc=None, tau: float = 1.0):
    """A gradient functor of torchdeq's kind (see the module docstring)."""
    b_solver_kwargs = dict(b_solver_kwargs or {})
    if grad_type == "ift":
        if b_solver is None:
            raise ValueError("grad_type='ift' needs b_solver (a torchdeq-style solver function)")

        def produce_ift(trainer, func, z_pred, writer=None, **kwargs):
            new_z = func(z_pred)  # one step: the gradient reaching the parameters
            return [_ImplicitGrad.apply(new_z, func, b_solver, b_solver_kwargs, writer)]

        return produce_ift

    if isinstance(grad_type, bool) or not isinstance(grad_type, int) or grad_type < 1:
        raise ValueError(f"grad must be 'ift' or an integer >= 1 (phantom gradient steps), got {grad_type!r}")
    steps = grad_type
    locs = list(sup_loc or [])

    def produce_phantom(trainer, func, z_pred, writer=None, **kwargs):
        out = []
        for i in range(steps):
            z_pred = func(z_pred, tau=tau)
            if (sup_gap > 0 and (i + 1) % sup_gap == 0) or (sup_gap <= 0 and (i + 1) in locs):
                out.append(z_pred)
        if sup_gap <= 0:
            out.append(z_pred)  # the last step always (after any sup_loc states)
        return out

    return produce_phantom
