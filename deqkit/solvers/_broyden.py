"""Limited-memory ("good") Broyden's method on g(z) = f(z) - z."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor

from .. import _checks
from .._numerics import batched_dot, combine, rows_dot, work_dtype, write_slot
from ._base import AbstractSolver, select_rows, set_fields


class BroydenState(NamedTuple):
    u: Tensor                 # (B, memory, d)  inverse-Jacobian update columns
    vt: Tensor                # (B, memory, d)  inverse-Jacobian update rows
    x: Tensor                 # (B, d) the iterate the last step was taken from
    g: Tensor                 # (B, d) its residual
    jinv_g: Tensor            # (B, d) J^-1 g at that iterate (the negated last step)
    filled: int               # rank-one updates stored (slots 0 .. filled-1)


@dataclasses.dataclass(frozen=True)
class Broyden(AbstractSolver):
    """Broyden's quasi-Newton method with a limited-memory inverse Jacobian.

    Solves ``g(z) = f(z) - z = 0`` with ``z <- z - J^-1 g(z)``, where ``J^-1 = -I + sum u_i v_i^T``
    is built from rank-one ("good" Broyden) updates. When ``memory`` updates are stored the
    estimate restarts from ``-I`` (each update is built on the ones before it, so old ones
    cannot be dropped singly); memory is ``2 * memory * d`` per sample whatever ``max_steps``
    is, and no dense ``d x d`` matrix is ever formed. One step costs about ``4 k d``
    multiply-adds with ``k`` updates stored.

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

    def __post_init__(self) -> None:
        set_fields(self, memory=_checks.integer("memory", self.memory))

    def init(self, z: Tensor, fz: Tensor, problem: Any) -> Optional[BroydenState]:
        return None

    def select(self, state: Optional[BroydenState], rows: Tensor) -> Optional[BroydenState]:
        return None if state is None else select_rows(state, rows)

    def step(self, z: Tensor, fz: Tensor, state: Optional[BroydenState], problem: Any) -> tuple[Tensor, Any]:
        b = z.shape[0]
        dt = work_dtype(z.dtype)
        x = z.reshape(b, -1).to(dt)
        g = problem.residual(z, fz)[0]  # the loop's own f(z) - z, when it has it
        if state is None:  # J^-1 = -I: the first step is a plain fixed-point step
            u = x.new_zeros((b, self.memory, x.shape[1]))
            vt = torch.zeros_like(u)
            jinv_g = -g
            state = BroydenState(u, vt, x, g, jinv_g, 0)
            return fz, state  # = x - (-I) g

        dx = x - state.x
        dg = g - state.g
        slot, jinv_g_prev = state.filled, state.jinv_g
        if slot == self.memory:
            # Memory full: restart from J^-1 = -I. (Dropping only the oldest update would
            # leave the later ones, each built on top of it, inconsistent.)
            slot, jinv_g_prev = 0, -state.g
        u, vt = state.u[:, :slot], state.vt[:, :slot]            # only the stored updates
        jinv_g_old = self._matvec(u, vt, g)                      # J_old^-1 g
        jinv_dg = jinv_g_old - jinv_g_prev                       # J_old^-1 dg
        vt_new = -dx + combine(rows_dot(u, dx), vt) if slot else -dx  # dx^T J_old^-1
        denom = batched_dot(vt_new, dg)
        tiny = torch.finfo(dt).tiny
        scale = torch.linalg.vector_norm(vt_new, dim=1) * torch.linalg.vector_norm(dg, dim=1)
        ok = torch.isfinite(denom) & (denom.abs() > torch.finfo(dt).eps * scale.clamp_min(tiny))
        safe = torch.where(ok, denom, torch.ones_like(denom))
        u_new = torch.where(ok.unsqueeze(1), (dx - jinv_dg) / safe.unsqueeze(1), torch.zeros_like(dx))
        vt_new = torch.where(ok.unsqueeze(1), vt_new, torch.zeros_like(vt_new))

        inplace = not (torch.is_grad_enabled() and (z.requires_grad or fz.requires_grad or state.u.requires_grad))
        u = write_slot(state.u, slot, u_new, 1, inplace)
        vt = write_slot(state.vt, slot, vt_new, 1, inplace)
        jinv_g = jinv_g_old + u_new * batched_dot(vt_new, g).unsqueeze(1)  # J_new^-1 g
        z_next = x - jinv_g
        return z_next.reshape(z.shape).to(z.dtype), BroydenState(u, vt, x, g, jinv_g, slot + 1)

    @staticmethod
    def _matvec(u: Tensor, vt: Tensor, v: Tensor) -> Tensor:
        """(-I + U V^T) v for each sample (U, V^T may hold no update yet)."""
        if u.shape[1] == 0:
            return -v
        return combine(rows_dot(vt, v), u) - v
