"""The problem zoo shared by the solver tests: small maps whose fixed points are known or checkable.

Each builder returns a ``Case``: the map ``f(z, *inputs)``, a start ``z0``, the ``inputs`` and,
where it is known in closed form, the exact fixed point ``z_star``. Everything is float64 and
seeded, and small enough that a solve takes milliseconds.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
from torch import Tensor

import deqkit

COS_FIXED_POINT = 0.7390851332151607  # the Dottie number, cos(z*) = z*
F64 = torch.float64


@dataclasses.dataclass
class Case:
    f: Callable[..., Tensor]
    z0: Tensor
    inputs: tuple = ()
    z_star: Optional[Tensor] = None


def solve(f, z0, **kwargs) -> deqkit.Solution:
    """``deqkit.fixed_point`` without autograd: the forward solve alone, a plain tensor back."""
    with torch.no_grad():
        return deqkit.fixed_point(f, z0, **kwargs)


def residual(f, value: Tensor, inputs: tuple = (), stop_mode: str = "rel") -> Tensor:
    """Per-sample residual of ``value`` recomputed here, independently of deqkit's loop."""
    with torch.no_grad():
        fz = f(value, *inputs)
    diff = torch.linalg.vector_norm((fz - value).reshape(value.shape[0], -1).double(), dim=1)
    if stop_mode == "abs":
        return diff
    return diff / (torch.linalg.vector_norm(fz.reshape(value.shape[0], -1).double(), dim=1) + 1e-9)


class Counter:
    """Wraps a map and counts its calls and the batch rows it was called on."""

    def __init__(self, f):
        self.f = f
        self.calls = 0
        self.rows = 0
        self.batch_sizes: list[int] = []

    def __call__(self, z, *inputs):
        self.calls += 1
        self.rows += z.shape[0]
        self.batch_sizes.append(z.shape[0])
        return self.f(z, *inputs)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def spectral_scale(w: Tensor, norm: float) -> Tensor:
    """``w`` rescaled to spectral norm ``norm``."""
    return w * (norm / torch.linalg.matrix_norm(w, ord=2))


def orthogonal(dim: int, seed: int) -> Tensor:
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=generator(seed), dtype=F64))
    return q * torch.sign(torch.diagonal(r))


def affine(dim: int = 6, batch: int = 3, contraction: float = 0.8, seed: int = 0) -> Case:
    """``z = A z + b`` with ``||A||_2 = contraction`` and per-sample ``b`` (passed as an input)."""
    g = generator(seed)
    a = spectral_scale(torch.randn(dim, dim, generator=g, dtype=F64), contraction)
    b = torch.randn(batch, dim, generator=g, dtype=F64)

    def f(z, b):
        return z @ a.T + b

    z_star = torch.linalg.solve(torch.eye(dim, dtype=F64) - a, b.T).T
    return Case(f, torch.zeros(batch, dim, dtype=F64), (b,), z_star)


def cos(batch: int = 3, dim: int = 2) -> Case:
    """``z = cos(z)`` elementwise: z* = 0.7390851332... everywhere."""
    z_star = torch.full((batch, dim), COS_FIXED_POINT, dtype=F64)
    return Case(torch.cos, torch.zeros(batch, dim, dtype=F64), (), z_star)


def mlp_cell(dim: int = 8, in_dim: int = 5, batch: int = 4, norm: float = 0.8, seed: int = 0,
             dtype: torch.dtype = F64) -> Case:
    """``z = tanh(W z + U x)`` with ``||W||_2 = norm`` (a contraction with factor <= norm)."""
    g = generator(seed)
    w = spectral_scale(torch.randn(dim, dim, generator=g, dtype=F64), norm).to(dtype)
    u = (torch.randn(dim, in_dim, generator=g, dtype=F64) / in_dim**0.5).to(dtype)
    x = torch.randn(batch, in_dim, generator=g, dtype=F64).to(dtype)

    def f(z, x):
        return torch.tanh(z @ w.T + x @ u.T)

    return Case(f, torch.zeros(batch, dim, dtype=dtype), (x,), None)


HETEROGENEOUS_RATES = (0.1, 0.3, 0.6, 0.97)


def heterogeneous(dim: int = 4, rates=HETEROGENEOUS_RATES, seed: int = 0, nonlinear: bool = False) -> Case:
    """``z_i = c_i Q z_i + b_i``, Q orthogonal: sample i contracts at exactly rate ``c_i``.

    ``c`` and ``b`` are per-sample inputs, so the map can be solved with ``active_set=True``.
    ``nonlinear=True`` wraps the map in tanh (contraction still at most ``c_i``; no closed-form
    fixed point), so that quasi-Newton solvers too need a different number of steps per sample.
    """
    q = orthogonal(dim, seed)
    c = torch.tensor(rates, dtype=F64).unsqueeze(1)
    b = torch.randn(len(rates), dim, generator=generator(seed + 1), dtype=F64)

    def f(z, c, b):
        out = c * (z @ q.T) + b
        return torch.tanh(out) if nonlinear else out

    if nonlinear:
        return Case(f, torch.zeros(len(rates), dim, dtype=F64), (c, b), None)

    eye = torch.eye(dim, dtype=F64)
    z_star = torch.stack([torch.linalg.solve(eye - ci * q, bi) for ci, bi in zip(c[:, 0], b)])
    return Case(f, torch.zeros(len(rates), dim, dtype=F64), (c, b), z_star)


def ill_conditioned(dim: int = 40, batch: int = 2, top: float = 0.999, seed: int = 0) -> Case:
    """``z = A z + b`` with A diagonal, eigenvalues spread over [0.5, top]: far too slow for 4 steps.

    Every solver here is invariant under rotations of z, so a diagonal A behaves like any
    symmetric matrix with that spectrum (and costs no matrix product). ``inputs[1]`` holds the
    diagonal, so that a test can invert the map: ``z = (f(z) - b) / A``.
    """
    eig = torch.cat([torch.linspace(0.5, 0.99, dim - 1, dtype=F64), torch.tensor([top], dtype=F64)])
    b = torch.randn(batch, dim, generator=generator(seed), dtype=F64)

    def f(z, b, a):
        return a * z + b

    return Case(f, torch.zeros(batch, dim, dtype=F64), (b, eig), b / (1 - eig))


class NanAfter:
    """``cos``, except that the rows in ``bad`` turn NaN from the ``after``-th call on.

    Before that, every row converges towards the Dottie number, so the bad rows' best finite
    iterate is a good (finite) estimate.
    """

    def __init__(self, bad: list[int], after: int = 4):
        self.bad = bad
        self.after = after
        self.calls = 0

    def __call__(self, z):
        self.calls += 1
        out = torch.cos(z)
        if self.calls >= self.after:
            mask = torch.zeros(z.shape[0], dtype=torch.bool)
            mask[self.bad] = True
            out = torch.where(mask.reshape(-1, *([1] * (z.dim() - 1))), torch.full_like(out, float("nan")), out)
        return out
