"""``mem_gc``: one call of a module without its activations, recomputed in backward (torchdeq's way)."""

from __future__ import annotations

import torch

__all__ = ["mem_gc"]


def _params(func):
    """The tensors of ``func`` (a module or a list of them) that need a gradient; a DataParallel
    replica holds them as plain attributes."""
    params = []
    for module in func if isinstance(func, (list, tuple)) else [func]:
        if getattr(module, "_is_replica", False):
            params += [v for _, v in module._named_members(get_members_fn=lambda m: [
                (k, v) for k, v in vars(m).items() if torch.is_tensor(v) and v.requires_grad])]
        else:
            params += [p for p in module.parameters() if p.requires_grad]
    return params


class _Checkpoint(torch.autograd.Function):
    """Forward without a graph; backward recomputes ``func`` and takes one vector-Jacobian product
    with respect to the tensor arguments that need a gradient and ``func``'s parameters."""

    @staticmethod
    def forward(ctx, func, n_args, *args):
        ctx.func, ctx.args, ctx.params = func, args[:n_args], args[n_args:]
        return func(*ctx.args)

    @staticmethod
    def backward(ctx, *grad_out):
        args = [a.detach().requires_grad_(a.requires_grad) if torch.is_tensor(a) else a for a in ctx.args]
        wanted = [a for a in args if torch.is_tensor(a) and a.requires_grad]
        with torch.enable_grad():
            out = ctx.func(*args)
        pairs = [(o, g) for o, g in zip((out,) if torch.is_tensor(out) else out, grad_out) if torch.is_tensor(g)]
        grads = list(torch.autograd.grad([o for o, _ in pairs], wanted + list(ctx.params), [g for _, g in pairs],
                                         retain_graph=True, allow_unused=True))
        arg_grads = [grads.pop(0) if torch.is_tensor(a) and a.requires_grad else None for a in args]
        return (None, None, *arg_grads, *grads)


def mem_gc(func, in_args=None):
    """``func(*in_args)`` without keeping its activations: they are recomputed in backward. The
    numbers are torchdeq's (its gradients with respect to the parameters are taken per call)."""
    in_args = in_args if in_args else ()
    return _Checkpoint.apply(func, len(in_args), *in_args, *_params(func))
