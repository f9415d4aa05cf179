"""``jac_reg`` (Hutchinson estimate of ||J||_F^2 / size) and ``power_method``, torchdeq's way."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["jac_reg", "power_method"]


def jac_reg(f0: Tensor, z0: Tensor, vecs: int = 1, create_graph: bool = True) -> Tensor:
    """``mean_v ||v^T J||^2 / z0.numel()`` over ``vecs`` Gaussian probes, ``J = d f0 / d z0``
    (``f0`` computed from ``z0`` with its graph). Uses the global generator, as torchdeq."""
    if isinstance(vecs, bool) or not isinstance(vecs, int) or vecs < 1:
        raise ValueError(f"vecs must be an integer >= 1, got {vecs!r}")
    total: Tensor | float = 0
    for _ in range(vecs):
        v = torch.randn(*z0.shape).to(z0)
        vjp = torch.autograd.grad(f0, z0, v, retain_graph=True, create_graph=create_graph)[0]
        total = total + vjp.norm() ** 2
    return torch.as_tensor(total) / vecs / math.prod(z0.shape)


def power_method(f0: Tensor, z0: Tensor, n_iters: int = 100):
    """``(vector, |eigenvalue|)`` per sample from ``n_iters`` steps of the power method on
    ``J^T`` (``J = d f0 / d z0``). Like torchdeq's, it assumes a real dominant eigenvalue; for a
    complex pair the estimate is wrong: ``deqkit.spectral_radius`` handles that case."""
    v = torch.randn_like(z0)
    b = v.shape[0]
    value = None
    for i in range(n_iters):
        vjp = torch.autograd.grad(f0, z0, v, retain_graph=i < n_iters - 1)[0]
        value = (vjp * v).reshape(b, -1).sum(1) / (v * v).reshape(b, -1).sum(1)
        v = (vjp.reshape(b, -1) / vjp.reshape(b, -1).norm(dim=1, keepdim=True)).reshape_as(z0)
    return v, value.abs()
