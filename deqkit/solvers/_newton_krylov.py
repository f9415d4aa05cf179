"""Inexact Newton with GMRES on Jacobian-vector products (Newton-Krylov)."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import Tensor

from .. import _checks
from .._numerics import arnoldi_step, combine, work_dtype
from ._base import AbstractSolver, set_fields


_JVP_METHODS = ("auto", "forward", "finite_difference")


@dataclasses.dataclass(frozen=True)
class NewtonKrylov(AbstractSolver):
    """Newton's method on ``g(z) = f(z) - z``, each linear system solved by GMRES.

    A step solves ``(J_f(z) - I) s = -g(z)`` to relative accuracy ``krylov_rtol`` with at
    most ``krylov_dim`` Jacobian-vector products (each about the cost of one call of f and
    counted in ``nfev``), then moves ``z <- z + damping * s``. Near a
    solution it converges quadratically, so a few accurate steps can beat many cheap ones
    when f is smooth and residuals must be tight; far from it, or on rough maps, prefer
    ``Anderson``.

    Args:
        krylov_dim: most GMRES iterations (JVPs) per Newton step, >= 1.
        krylov_rtol: GMRES stops once every sample's linear residual is below this fraction
            of ``||g(z)||``, > 0.
        damping: step length in (0, 1].
        jvp: how Jacobian-vector products are computed: "forward" (forward-mode autodiff,
            exact), "finite_difference" (one extra call of f each; relative accuracy about
            the square root of the dtype's epsilon) or "auto" (forward mode, falling back to
            finite differences when f uses an operation without a forward-mode derivative,
            such as fused attention on CPU).

    ``Unrolled`` is refused with it (see ``why_not_differentiable``); pair it with ``Implicit``,
    ``Phantom`` or ``OneStep``.

    Reference: Knoll & Keyes, "Jacobian-free Newton-Krylov methods" (2004).

    Example:
        >>> import torch, deqkit
        >>> sol = deqkit.fixed_point(torch.cos, torch.zeros(3, 2, dtype=torch.float64),
        ...                          solver=deqkit.NewtonKrylov(), tol=1e-12)
        >>> round(float(sol.value[0, 0]), 10), int(sol.stats.steps[0]) <= 6
        (0.7390851332, True)
    """

    differentiable: ClassVar[bool] = False
    why_not_differentiable: ClassVar[str] = (
        "GMRES's orthogonalisation and least squares have no usable derivative once a sample's residual "
        "reaches round-off (the gradient becomes NaN)"
    )

    krylov_dim: int = 20
    krylov_rtol: float = 1e-3
    damping: float = 1.0
    jvp: str = "auto"

    def __post_init__(self) -> None:
        set_fields(
            self,
            jvp=_checks.one_of("jvp", self.jvp, _JVP_METHODS),
            krylov_dim=_checks.integer("krylov_dim", self.krylov_dim),
            krylov_rtol=_checks.positive("krylov_rtol", self.krylov_rtol),
            damping=_checks.unit_interval("damping", self.damping),
        )

    def select(self, state: Any, rows: Tensor) -> Any:
        return state  # no state

    def step(self, z: Tensor, fz: Tensor, state: Any, problem: Any) -> tuple[Tensor, Any]:
        b = z.shape[0]
        dt = work_dtype(z.dtype)
        tiny = torch.finfo(dt).tiny
        g = (fz - z).reshape(b, -1).to(dt)
        rhs = -g
        beta = torch.linalg.vector_norm(rhs, dim=1)
        # divisions are guarded with where (not clamp) so that autograd (Unrolled) sees finite
        # derivatives at a zero residual or a breakdown; a sample already at its fixed point gets
        # a harmless unit vector, and its step is set to zero below
        solved = beta <= tiny
        safe_beta = torch.where(solved, torch.ones_like(beta), beta)
        unit = torch.eye(1, rhs.shape[1], dtype=dt, device=z.device).expand(b, -1)  # e_1 for every sample
        basis = [torch.where(solved.unsqueeze(1), unit, rhs / safe_beta.unsqueeze(1))]
        h_cols = []
        # Per sample: GMRES stops for a sample once its linear residual meets krylov_rtol, its
        # Krylov space breaks down (the new direction is round-off: the solution in the space
        # is exact), or its residual is not finite. Its correction is frozen from then on and
        # its later basis vectors are zero, so the other samples' extra iterations never reach
        # it (no division by a round-off norm) and a sample's step never depends on the batch.
        done = solved
        y_final = torch.zeros(b, self.krylov_dim, dtype=dt, device=z.device)
        for j in range(self.krylov_dim):
            jv = problem.jvp(z, basis[j].reshape(z.shape).to(z.dtype), fz=fz, method=self.jvp)
            w = jv.reshape(b, -1).to(dt) - basis[j]  # (J - I) v_j
            w_norm = torch.linalg.vector_norm(w, dim=1)
            w, col, h_next = arnoldi_step(w, basis)
            h_cols.append(torch.cat([col, h_next.unsqueeze(1)], dim=1))  # (B, j + 2)
            breakdown = h_next <= 64 * torch.finfo(dt).eps * w_norm
            y, lin_res = self._least_squares(h_cols, beta)
            running = ~done
            y_final[:, : j + 1] = torch.where(running.unsqueeze(1), y, y_final[:, : j + 1])
            done = done | breakdown | (lin_res <= self.krylov_rtol * safe_beta) | ~torch.isfinite(lin_res)
            if bool(done.all()):
                break
            safe_h = torch.where(done, torch.ones_like(h_next), h_next)
            basis.append(torch.where(done.unsqueeze(1), torch.zeros_like(w), w / safe_h.unsqueeze(1)))
        k = len(h_cols)
        s = combine(y_final[:, :k].nan_to_num(0.0, 0.0, 0.0), torch.stack(basis[:k], dim=1))
        s = torch.where(solved.unsqueeze(1), torch.zeros_like(s), s)
        z_next = z.reshape(b, -1).to(dt) + self.damping * s
        return z_next.reshape(z.shape).to(z.dtype), state

    @staticmethod
    def _least_squares(h_cols: list[Tensor], beta: Tensor) -> tuple[Tensor, Tensor]:
        """min_y ||beta e1 - H y|| per sample, H the (k+1) x k Hessenberg matrix."""
        k = len(h_cols)
        b = beta.shape[0]
        h = beta.new_zeros((b, k + 1, k), dtype=torch.float64)
        for j, col in enumerate(h_cols):
            h[:, : j + 2, j] = col.to(torch.float64)
        e1 = beta.new_zeros((b, k + 1), dtype=torch.float64)
        e1[:, 0] = beta.to(torch.float64)
        q, r = torch.linalg.qr(h)
        qe = torch.einsum("bkj,bk->bj", q, e1)
        diag = torch.diagonal(r, dim1=1, dim2=2)
        r = r + torch.diag_embed(torch.where(diag.abs() < 1e-300, torch.ones_like(diag), torch.zeros_like(diag)))
        y = torch.linalg.solve_triangular(r, qe.unsqueeze(2), upper=True).squeeze(2)
        res = torch.linalg.vector_norm(e1 - torch.einsum("bkj,bj->bk", h, y), dim=1)
        return y.to(beta.dtype), res.to(beta.dtype)
