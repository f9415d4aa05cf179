"""Anderson acceleration (type II), batched per sample, with a restart safeguard."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
from torch import Tensor

from ._base import AbstractSolver, check_positive, check_positive_int, check_unit_interval, combine, rows_dot, work_dtype


class AndersonState(NamedTuple):
    x: Tensor        # (B, m, d) past iterates
    g: Tensor        # (B, m, d) past residuals f(x) - x
    gram: Tensor     # (B, m, m) g g^T
    valid: Tensor    # (B, m) slots in use, per sample
    best: Tensor     # (B,) smallest residual norm seen since the last restart
    count: int       # steps taken (the next slot is count % m)


def _write(buf: Tensor, index: int, value: Tensor, dim: int) -> Tensor:
    """buf with ``value`` placed at ``index`` along ``dim``; in place only when autograd is off."""
    if torch.is_grad_enabled() and (buf.requires_grad or value.requires_grad):
        idx = torch.tensor([index], device=buf.device)
        return buf.index_copy(dim, idx, value.unsqueeze(dim))
    buf.select(dim, index).copy_(value)
    return buf


@dataclasses.dataclass(frozen=True)
class Anderson(AbstractSolver):
    """Anderson acceleration: mix the last ``m`` iterates to minimise the residual.

    Each step solves, per sample, ``min ||sum_i alpha_i g_i||`` subject to ``sum_i alpha_i = 1``
    over the last ``m`` residuals ``g_i = f(x_i) - x_i``, and moves to
    ``sum_i alpha_i (x_i + beta g_i)``. It usually needs several times fewer evaluations of f
    than plain iteration when the contraction factor is near 1, for ``O(m d)`` extra work per
    step. Prefer ``FixedPoint`` for maps that contract fast (few steps either way).

    Safeguards: the regularisation ``lam`` is relative to each residual's own squared norm
    (so it neither stalls small residuals nor depends on the scale of z); a sample
    whose residual exceeds ``restart`` times its best since the last restart, or whose
    least-squares solve fails, drops its memory and takes a plain mixing step.
    Arithmetic runs in float32 or better whatever the dtype of z.

    Args:
        m: memory size (number of past iterates mixed), >= 1.
        beta: mixing factor in (0, 1]; 1 is undamped.
        lam: relative Tikhonov regularisation of the least-squares problem, >= 0.
        restart: residual growth factor that triggers a restart, > 1.

    Reference: Walker & Ni, "Anderson acceleration for fixed-point iterations" (2011).

    Example:
        >>> import torch, deqkit
        >>> A = 0.9 * torch.eye(3, dtype=torch.float64)
        >>> sol = deqkit.fixed_point(lambda z: z @ A.T + 1, torch.zeros(4, 3, dtype=torch.float64),
        ...                          solver=deqkit.Anderson(m=5), tol=1e-10)
        >>> round(float(sol.value[0, 0]), 6), sol.result.name
        (10.0, 'SUCCESS')
    """

    m: int = 5
    beta: float = 1.0
    lam: float = 1e-4
    restart: float = 4.0

    def __post_init__(self):
        check_positive_int("m", self.m)
        check_unit_interval("beta", self.beta)
        check_positive("lam", self.lam, allow_zero=True)
        if not isinstance(self.restart, (int, float)) or not self.restart > 1:
            raise ValueError(f"restart must be a number > 1, got {self.restart!r}")

    def init(self, z: Tensor, fz: Tensor, problem) -> AndersonState:
        b, d = z.shape[0], z[0].numel()
        dt = work_dtype(z.dtype)
        return AndersonState(
            x=z.new_zeros((b, self.m, d), dtype=dt),
            g=z.new_zeros((b, self.m, d), dtype=dt),
            gram=z.new_zeros((b, self.m, self.m), dtype=dt),
            valid=torch.zeros((b, self.m), dtype=torch.bool, device=z.device),
            best=torch.full((b,), float("inf"), dtype=dt, device=z.device),
            count=0,
        )

    def step(self, z: Tensor, fz: Tensor, state: AndersonState, problem):
        b, m = z.shape[0], self.m
        dt = state.x.dtype
        x = z.reshape(b, -1).to(dt)
        g = fz.reshape(b, -1).to(dt) - x
        slot = state.count % m

        # Safeguard: restart the samples whose residual grew too much since their best.
        norm = torch.linalg.vector_norm(g, dim=1)
        grew = ~(norm <= self.restart * state.best)  # also true for NaN
        valid = state.valid & ~grew.unsqueeze(1)
        best = torch.where(grew, norm, torch.minimum(norm, state.best))

        xs = _write(state.x, slot, x, 1)
        gs = _write(state.g, slot, g, 1)
        row = rows_dot(gs, g)  # new row and column of the Gram matrix
        gram = _write(state.gram, slot, row, 1)
        gram = _write(gram, slot, row, 2)
        valid = _write(valid.clone() if valid is state.valid else valid, slot, torch.ones(b, dtype=torch.bool, device=z.device), 1)

        alpha = self._weights(gram, valid)
        z_next = combine(alpha, xs) + self.beta * combine(alpha, gs)
        plain = ~torch.isfinite(alpha).all(dim=1)
        if bool(plain.any()):  # a failed solve: fall back to a plain step and forget the past
            z_next = torch.where(plain.unsqueeze(1), x + self.beta * g, z_next)
            only_now = torch.zeros_like(valid)
            only_now[:, slot] = True
            valid = torch.where(plain.unsqueeze(1), only_now, valid)
        state = AndersonState(xs, gs, gram, valid, best, state.count + 1)
        return z_next.reshape(z.shape).to(z.dtype), state

    def _weights(self, gram: Tensor, valid: Tensor) -> Tensor:
        """alpha = H^-1 1 / (1^T H^-1 1) over the valid slots, with H regularised as below.

        H is scaled to unit diagonal (Jacobi) before ``lam`` is added, so the regularisation is
        relative to each residual's own size: it never swamps the small, recent residuals
        (a fixed absolute ``lam`` does, and stalls the solve near convergence).
        """
        vm = valid.to(gram.dtype)
        diag = torch.diagonal(gram, dim1=1, dim2=2)
        tiny = torch.finfo(gram.dtype).tiny ** 0.5
        d = torch.where(valid, diag.clamp_min(tiny).rsqrt(), torch.zeros_like(diag))  # D^-1/2
        h = gram * (d.unsqueeze(2) * d.unsqueeze(1))
        eye = torch.eye(self.m, dtype=gram.dtype, device=gram.device)
        h = h + eye * (self.lam * vm + (1 - vm)).unsqueeze(2)  # unused slots: identity, weight 0
        y, info = torch.linalg.solve_ex(h, d.unsqueeze(2))
        sol = y.squeeze(2) * d
        total = sol.sum(dim=1, keepdim=True)
        alpha = sol / total
        bad = (info != 0) | ~torch.isfinite(total.squeeze(1)) | (total.squeeze(1).abs() < tiny)
        return torch.where(bad.unsqueeze(1), torch.full_like(alpha, float("nan")), alpha)
