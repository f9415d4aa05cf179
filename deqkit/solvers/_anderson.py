"""Anderson acceleration (type II), batched per sample, with a restart safeguard."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .. import _checks
from .._numerics import combine, work_dtype, write_slot
from ._base import AbstractSolver, set_fields


class AndersonState(NamedTuple):
    f: Tensor        # (B, m, d) past images f(x_i)
    g: Tensor        # (B, m, d) past residuals g_i = f(x_i) - x_i
    valid: Tensor    # (B, m) 1.0 for slots in use, per sample, else 0.0
    best: Tensor     # (B,) smallest residual norm seen since the last restart
    n_steps: int     # steps taken (the next slot is n_steps % m)
    unit: Tensor     # (m, m) identity: row i is the unit vector of slot i (shared by all samples)


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
        lam: relative Tikhonov regularisation of the least-squares problem, >= 0. Larger values
            damp the mixing once the stored residuals are nearly collinear: 1e-3 takes fewer
            evaluations on ill-conditioned linear maps (37 against 58 on the benchmarks'
            ``linear_ill``) but stalls on the trained GET student's map (relative residual
            3e-2 after 100 evaluations, where the default 1e-4 reaches 1e-4 in 13);
            see docs/benchmarks.md.
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

    def __post_init__(self) -> None:
        set_fields(
            self,
            m=_checks.integer("m", self.m),
            beta=_checks.unit_interval("beta", self.beta),
            lam=_checks.positive("lam", self.lam, allow_zero=True),
            restart=_checks.above("restart", self.restart, 1),
        )

    def init(self, z: Tensor, fz: Tensor, problem: Any) -> AndersonState:
        b, d = z.shape[0], z[0].numel()
        dt = work_dtype(z.dtype)
        return AndersonState(
            f=z.new_zeros((b, self.m, d), dtype=dt),
            g=z.new_zeros((b, self.m, d), dtype=dt),
            valid=z.new_zeros((b, self.m), dtype=dt),
            best=torch.full((b,), float("inf"), dtype=dt, device=z.device),
            n_steps=0,
            unit=torch.eye(self.m, dtype=dt, device=z.device),
        )

    def select(self, state: AndersonState, rows: Tensor) -> AndersonState:
        return state._replace(f=state.f.index_select(0, rows), g=state.g.index_select(0, rows),
                              valid=state.valid.index_select(0, rows), best=state.best.index_select(0, rows))

    def step(self, z: Tensor, fz: Tensor, state: AndersonState, problem: Any) -> tuple[Tensor, Any]:
        b, m = z.shape[0], self.m
        dt = state.f.dtype
        inplace = not (torch.is_grad_enabled() and (z.requires_grad or fz.requires_grad or state.f.requires_grad))
        fx = fz.reshape(b, -1)
        if fx.dtype != dt:
            fx = fx.to(dt)
        g, norm = problem.residual(z, fz)  # the loop's own f(z) - z and its norm, when it has them
        slot = state.n_steps % m
        onehot = state.unit[slot]

        # Safeguard: a sample whose residual grew past `restart` times its best (or is NaN)
        # forgets its memory.
        keep = norm <= self.restart * state.best
        best = torch.where(keep, torch.minimum(norm, state.best), norm)
        valid = torch.maximum(state.valid * keep.unsqueeze(1), onehot)

        fs = write_slot(state.f, slot, fx, 1, inplace)
        gs = write_slot(state.g, slot, g, 1, inplace)
        # g g^T whole: one product that reads the history once, as the new row alone would
        gram = torch.bmm(gs, gs.transpose(1, 2))

        sol, total = self._weights(gram, valid)
        # A failed solve (non-finite weights): take a plain step (weight 1 on the newest slot)
        # and restart.
        ok = torch.isfinite(total)
        alpha = torch.where(ok, sol / total, onehot)
        valid = torch.where(ok, valid, onehot)
        z_next = combine(alpha, fs)  # sum_i alpha_i f(x_i) = sum_i alpha_i (x_i + g_i)
        if self.beta != 1.0:
            z_next = z_next - (1 - self.beta) * combine(alpha, gs)
        state = AndersonState(fs, gs, valid, best, state.n_steps + 1, state.unit)
        return z_next.reshape(z.shape).to(z.dtype), state

    def _weights(self, gram: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """``(y, 1^T y)`` with ``y = H^-1 1`` over the valid slots, H regularised as below: the
        weights are ``alpha = y / 1^T y`` (the caller checks that the sum is finite).

        H is scaled to unit diagonal (Jacobi) before ``lam`` is added, so the regularisation is
        relative to each residual's own size: it never swamps the small, recent residuals
        (a fixed absolute ``lam`` does, and stalls the solve near convergence). Unused slots
        get an identity row and a zero right-hand side, so their weight is 0.
        """
        tiny = torch.finfo(gram.dtype).tiny ** 0.5
        d = valid * torch.diagonal(gram, dim1=1, dim2=2).clamp_min(tiny).rsqrt()  # D^-1/2
        h = gram * (d.unsqueeze(2) * d.unsqueeze(1))  # unit diagonal on the valid slots, 0 elsewhere
        h.diagonal(dim1=1, dim2=2).add_(valid.mul(self.lam - 1).add_(1))  # + lam there, + 1 elsewhere
        y, _ = torch.linalg.solve_ex(h, d.unsqueeze(2))
        sol: Tensor = y.squeeze(2) * d
        return sol, sol.sum(dim=1, keepdim=True)
