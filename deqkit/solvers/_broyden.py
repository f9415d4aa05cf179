"""Limited-memory ("good") Broyden's method on g(z) = f(z) - z."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ._base import AbstractSolver, batched_dot, check_positive_int, combine, rows_dot, work_dtype
from ._anderson import _write


class BroydenState(NamedTuple):
    u: Tensor                 # (B, memory, d)  inverse-Jacobian update columns
    vt: Tensor                # (B, memory, d)  inverse-Jacobian update rows
    x: Tensor                 # (B, d) the iterate the last step was taken from
    g: Tensor                 # (B, d) its residual
    jinv_g: Tensor            # (B, d) J^-1 g at that iterate (the negated last step)
    count: int


@dataclasses.dataclass(frozen=True)
class Broyden(AbstractSolver):
    """Broyden's quasi-Newton method with a limited-memory inverse Jacobian.

    Solves ``g(z) = f(z) - z = 0`` with ``z <- z - J^-1 g(z)``, where ``J^-1 = -I + sum u_i v_i^T``
    is built from rank-one ("good" Broyden) updates, keeping the last ``memory`` of them (a
    ring buffer, so memory is ``2 * memory * d`` per sample whatever ``max_steps`` is; no dense
    ``d x d`` matrix is ever formed). One step costs about ``4 * memory * d`` multiply-adds.

    Prefer it to ``Anderson`` on smooth maps where f is costly and a quasi-Newton model pays
    off; prefer ``FixedPoint`` on fast-contracting maps.

    Args:
        memory: number of rank-one updates kept, >= 1.

    Reference: Broyden, "A class of methods for solving nonlinear simultaneous equations"
    (1965); Bai, Kolter & Koltun, "Deep Equilibrium Models" (2019).

    Example:
        >>> import torch, deqkit
        >>> sol = deqkit.fixed_point(lambda z: 0.5 * torch.tanh(z) + 1, torch.zeros(2, 4),
        ...                          solver=deqkit.Broyden(memory=10), tol=1e-6)
        >>> sol.result.name, int(sol.stats.nfev) < 12
        ('SUCCESS', True)
    """

    memory: int = 20

    def __post_init__(self):
        check_positive_int("memory", self.memory)

    def init(self, z: Tensor, fz: Tensor, problem) -> Optional[BroydenState]:
        return None

    def step(self, z: Tensor, fz: Tensor, state: Optional[BroydenState], problem):
        b = z.shape[0]
        dt = work_dtype(z.dtype)
        x = z.reshape(b, -1).to(dt)
        g = fz.reshape(b, -1).to(dt) - x
        if state is None:  # J^-1 = -I: the first step is a plain fixed-point step
            u = x.new_zeros((b, self.memory, x.shape[1]))
            vt = torch.zeros_like(u)
            jinv_g = -g
            state = BroydenState(u, vt, x, g, jinv_g, 0)
            return fz, state

        dx = x - state.x
        dg = g - state.g
        jinv_g_old = self._matvec(state.u, state.vt, g)          # J_old^-1 g
        jinv_dg = jinv_g_old - state.jinv_g                      # J_old^-1 dg
        vt_new = -dx + combine(rows_dot(state.u, dx), state.vt)  # dx^T J_old^-1
        denom = batched_dot(vt_new, dg)
        ok = torch.isfinite(denom) & (denom.abs() > torch.finfo(dt).eps * (vt_new.norm(dim=1) * dg.norm(dim=1)).clamp_min(torch.finfo(dt).tiny))
        safe = torch.where(ok, denom, torch.ones_like(denom))
        u_new = torch.where(ok.unsqueeze(1), (dx - jinv_dg) / safe.unsqueeze(1), torch.zeros_like(dx))
        vt_new = torch.where(ok.unsqueeze(1), vt_new, torch.zeros_like(vt_new))

        slot = state.count % self.memory
        u = _write(state.u, slot, u_new, 1)
        vt = _write(state.vt, slot, vt_new, 1)
        # J_new^-1 g = J_old^-1 g + u_new (v_new^T g), minus the overwritten slot's term
        jinv_g = jinv_g_old + u_new * batched_dot(vt_new, g).unsqueeze(1)
        if state.count >= self.memory:  # the ring buffer dropped an old update: recompute
            jinv_g = self._matvec(u, vt, g)
        z_next = x - jinv_g
        return z_next.reshape(z.shape).to(z.dtype), BroydenState(u, vt, x, g, jinv_g, state.count + 1)

    @staticmethod
    def _matvec(u: Tensor, vt: Tensor, v: Tensor) -> Tensor:
        """(-I + U V^T) v for each sample."""
        return -v + combine(rows_dot(vt, v), u)
