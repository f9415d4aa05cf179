"""torchdeq's losses: fixed-point correction, Jacobian regularisation, the power method, with
torchdeq's numbers and random draws (the native versions: ``deqkit.fp_correction``,
``deqkit.jacobian_reg``, ``deqkit.spectral_radius``, right for complex eigenvalues too)."""

from __future__ import annotations

import math

import torch

from ... import fp_weights
from .utils import ignored

__all__ = ["fp_correction", "register_weight_func", "jac_reg", "power_method"]


def _exp(n, k, gamma=0.8, **kwargs):
    """``gamma ** (n - k - 1)``: the last state weighs 1, earlier ones decay geometrically."""
    ignored("fp_correction's 'exp' weights", kwargs, ("gamma",))
    return fp_weights(n, gamma)[k]


def _linear(n, k, gamma=0.9, bias=0.0, **kwargs):
    """``1 - (n - k - 1) / n * gamma + bias``."""
    ignored("fp_correction's 'linear' weights", kwargs, ("gamma", "bias"))
    return 1 - (n - k - 1) / n * gamma + bias


def _const(n, k, c=1.0):
    """``c`` for every state (torchdeq's calls ``.cuda()`` and returns a vector: a crash)."""
    return c


_weight_funcs = {"exp": _exp, "linear": _linear, "const": _const}


def register_weight_func(name, func):
    """Register ``func(n, k, **kwargs) -> weight of state k of n`` under ``name``."""
    if not callable(func):
        raise TypeError(f"func must be callable, got {type(func).__name__} (torchdeq fails with an AssertionError)")
    _weight_funcs[name] = func


def fp_correction(crit, args, weight_func="exp", return_loss_values=False, **kwargs):
    """``sum_k w(n, k) * crit(*args_k)`` over the ``n`` supervised states.

    ``args``: crit's arguments, each a list (one entry per state, e.g. a DEQ call's ``z_out``,
    reused cyclically) or one value for every term. ``weight_func``: 'exp' (``gamma=0.8``),
    'linear' (``gamma=0.9, bias=0``), 'const' (``c=1``) or a registered name, with ``kwargs``
    (one the built-in weights do not read, such as ``gama``, is ignored with a warning).
    ``return_loss_values`` also returns the terms' values.

    Example:
        >>> import torch
        >>> from deqkit.compat.torchdeq import fp_correction
        >>> crit = torch.nn.MSELoss()
        >>> y = torch.zeros(2)
        >>> round(float(fp_correction(crit, ([torch.ones(2), 2 * torch.ones(2)], y))), 4)
        4.8
    """
    if weight_func not in _weight_funcs:
        raise ValueError(f"unknown weight_func {weight_func!r}; registered: {sorted(_weight_funcs)} "
                         "(torchdeq fails with an AssertionError)")
    columns = [list(a) if isinstance(a, (list, tuple)) else [a] for a in args]
    n = max((len(c) for c in columns), default=0)
    loss, values = 0.0, []
    for k in range(n):
        term = crit(*[c[k % len(c)] for c in columns])
        loss += _weight_funcs[weight_func](n, k, **kwargs) * term
        if return_loss_values:
            values.append(term.item())
    return (loss, values) if return_loss_values else loss


def jac_reg(f0, z0, vecs=1, create_graph=True):
    """``mean_v ||v^T J||^2 / z0.numel()`` over ``vecs`` Gaussian probes ``v``, ``J = d f0 / d z0``
    (``f0`` computed from ``z0`` with its graph): a Hutchinson estimate of ``||J||_F^2`` per entry."""
    result = 0
    for _ in range(vecs):
        v = torch.randn(*z0.shape).to(z0)
        result += torch.autograd.grad(f0, z0, v, retain_graph=True, create_graph=create_graph)[0].norm() ** 2
    return result / vecs / math.prod(z0.shape)


def power_method(f0, z0, n_iters=100):
    """``(vector, |eigenvalue|)`` per sample from ``n_iters`` steps of the power method on
    ``J^T`` (``J = d f0 / d z0``). It assumes a real dominant eigenvalue, as torchdeq's does."""
    v = torch.randn_like(z0)
    b = v.shape[0]
    for i in range(n_iters):
        vjp = torch.autograd.grad(f0, z0, v, retain_graph=i < n_iters - 1)[0]
        value = (vjp * v).reshape(b, -1).sum(1) / (v * v).reshape(b, -1).sum(1)
        v = (vjp.reshape(b, -1) / vjp.reshape(b, -1).norm(dim=1, keepdim=True)).reshape_as(z0)
    return v, value.abs()
