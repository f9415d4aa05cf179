"""torchdeq's gradient functors: phantom gradient steps and implicit differentiation (IFT).

``backward_factory(grad_type, ...)`` returns ``produce(trainer, func, z_pred, writer=None)`` ->
the states carrying the gradient: for an int ``k``, ``k`` damped steps ``tau f(z) + (1 - tau) z``
from ``z_pred`` (``sup_gap``/``sup_loc`` keep some of them); for ``'ift'``, one step
``f(z_pred)`` whose incoming gradient ``grad`` is replaced by the solution of ``g = J^T g +
grad`` (``b_solver``, from zero), ``J`` taken at ``f(z_pred)``, or at ``z_pred`` with
``hook_ift``, as in torchdeq. The hook is guarded instead of removed (bounded, repeatable), and
a second derivative through IFT raises (torchdeq's is silently partial).
"""

from __future__ import annotations

import torch
from torch import autograd

__all__ = ["backward_factory"]

_SECOND_ORDER = ("second derivatives through implicit differentiation (ift=True / hook_ift=True) are not available: "
                 "the adjoint solve has no derivative of its own, so torchdeq silently returns a partial one. Use "
                 "phantom gradients (ift=False, grad=k), or deqkit's backward=deqkit.Unrolled() for exact ones. "
                 "With hook_ift this also happens when a differentiable gradient is taken with respect to the DEQ's "
                 "output, e.g. jac_reg(deq_func(z), z) with create_graph=True: the hook fires there (torchdeq then "
                 "IFT-corrects the Jacobian estimate and removes its hook, leaving the loss a one-step gradient); "
                 "use ift=True, whose correction stays out of such gradients.")


def make_pair(target, source):
    """``source`` as long as ``target``: itself when equal in length, its one item repeated."""
    if len(target) == len(source):
        return source
    if len(source) == 1:
        return [source[0] for _ in target]
    raise ValueError(f"cannot pair the {len(source)} gradient settings grad={list(source)} with {len(target)} solver "
                     f"segments or states {list(target)}: give one, or one per state (torchdeq fails: 'Unable to "
                     "align the arg squence!')")


def _adjoint(b_solver, b_solver_kwargs, vjp, grad, writer):
    """``g`` with ``g = vjp(g) + grad``, from zero: the gradient IFT hands on."""
    if torch.is_grad_enabled():
        raise RuntimeError(_SECOND_ORDER)
    grad_star, _, info = b_solver(lambda y: vjp(y) + grad, torch.zeros_like(grad), **b_solver_kwargs)
    if writer:
        writer(info)
    return grad_star


class _IFTGrad(autograd.Function):
    """Identity forward; backward solves the adjoint with ``J`` taken at the (saved) output."""

    @staticmethod
    def forward(ctx, new_z, func, solve):
        ctx.func, ctx.solve = func, solve
        ctx.save_for_backward(new_z.detach())
        return new_z.view_as(new_z)

    @staticmethod
    def backward(ctx, grad):
        (point,) = ctx.saved_tensors
        h = point.clone().requires_grad_()
        with torch.enable_grad():
            fh = ctx.func(h)
        return ctx.solve(lambda y: autograd.grad(fh, h, y, retain_graph=True)[0], grad), None, None


def backward_factory(grad_type="ift", hook_ift=False, b_solver=None, b_solver_kwargs=None, sup_gap=-1, sup_loc=None,
                     tau=1.0, **grad_factory_kwargs):
    """A gradient functor of torchdeq's kind (see the module docstring)."""
    b_solver_kwargs = dict(b_solver_kwargs or {})
    if grad_type == "ift":
        def solve(vjp, grad, writer=None):
            return _adjoint(b_solver, b_solver_kwargs, vjp, grad, writer)

        def produce_hook_ift(trainer, func, z_pred, writer=None, **kwargs):
            z_pred = z_pred.requires_grad_()
            new_z = func(z_pred)
            busy: list = []  # the adjoint's own vector-Jacobian products pass the hook unchanged

            def hook(grad):
                if busy:
                    return None
                busy.append(True)
                try:
                    return solve(lambda y: autograd.grad(new_z, z_pred, y, retain_graph=True)[0], grad, writer)
                finally:
                    busy.clear()

            trainer.hook = new_z.register_hook(hook)
            return [new_z]

        def produce_ift(trainer, func, z_pred, writer=None, **kwargs):
            return [_IFTGrad.apply(func(z_pred), func, lambda vjp, grad: solve(vjp, grad, writer))]

        return produce_hook_ift if hook_ift else produce_ift

    if type(grad_type) is not int or grad_type < 1:
        raise ValueError(f"grad must be 'ift' or an integer >= 1 (phantom gradient steps), got {grad_type!r} "
                         "(torchdeq fails with an AssertionError)")
    locs = [] if sup_gap > 0 else list(sup_loc or [])

    def produce_phantom(trainer, func, z_pred, **kwargs):
        out = []
        for i in range(grad_type):
            z_pred = func(z_pred, tau=tau)
            if (sup_gap > 0 and (i + 1) % sup_gap == 0) or i + 1 in locs:
                out.append(z_pred)
        return out if sup_gap > 0 else out + [z_pred]

    return produce_phantom
