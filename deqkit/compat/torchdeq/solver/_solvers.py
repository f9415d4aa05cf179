"""torchdeq's four solvers, written for deqkit with torchdeq's numbers.

Each has torchdeq's call ``solver(func, x0, max_iter=50, tol=1e-3, stop_mode='abs',
indexing=None, **options) -> (z, states, info)``: ``z`` is each sample's lowest-residual
estimate, ``states`` the estimates at the steps listed in ``indexing``, ``info`` a
``SolverStat``. Stopping is batch-wide, as in torchdeq: the loop ends once the worst sample's
residual is below ``tol``. Unlike torchdeq, an unknown option raises instead of being ignored,
and Broyden samples ``indexing`` at the steps named (torchdeq is one step late).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from ._record import Record, check_max_iter, check_stop_mode, flat
from .stat import SolverStat


def _damped(func: Callable, x: Tensor, tau: float) -> Tensor:
    """``tau * func(x) + (1 - tau) * x`` (exactly ``func(x)`` when ``tau == 1``)."""
    out = func(x)
    return out if tau == 1.0 else tau * out + (1 - tau) * x


def _check(max_iter, stop_mode) -> None:
    check_max_iter(max_iter)
    check_stop_mode(stop_mode)


def _finish(record: Record, best: Tensor, states: list, indexing) -> tuple:
    if indexing and not states:
        states.append(best)
    return best, states, record.stat()


def fixed_point_iter(func: Callable, x0: Tensor, max_iter: int = 50, tol: float = 1e-3, stop_mode: str = "abs",
                     indexing=None, tau: float = 1.0, return_final: bool = False):
    """Fixed-point iteration ``x <- tau f(x) + (1 - tau) x``; returns the lowest-residual image.

    Args:
        func: the map, called on tensors of x0's shape.
        x0: the start, (B, ...).
        max_iter: calls of func (0: x0 is returned).
        tol, stop_mode: stop when every sample's residual ("abs" or "rel") is below tol.
        indexing: steps (1-based) at which to keep the best estimate so far.
        tau: damping.
        return_final: run all steps and return the last estimate.
    """
    _check(max_iter, stop_mode)
    batch = x0.shape[0] if x0.dim() >= 2 else x0.numel()
    record = Record(batch, x0.device, stop_mode, return_final)
    best, states = x0, []
    fx = x0
    for k in range(max_iter):
        x = fx
        fx = _damped(func, x, tau)
        abs_diff = flat(fx - x).norm(dim=1)
        rel_diff = abs_diff / (flat(fx).norm(dim=1) + 1e-9)
        best = record.update(best, fx, k + 1, abs_diff, rel_diff)
        if indexing and (k + 1) in indexing:
            states.append(best)
        if record.converged(tol):
            record.pad_to(max_iter + 1)
            break
    return _finish(record, best, states, indexing)


def simple_fixed_point_iter(func: Callable, x0: Tensor, max_iter: int = 50, tau: float = 1.0, indexing=None,
                            tol: float = 1e-3, stop_mode: str = "abs"):
    """Exactly ``max_iter`` damped fixed-point steps, no stopping test, the last image returned.

    ``tol`` and ``stop_mode`` are accepted for a uniform call and not used; ``info`` holds the
    residual of the last step only.
    """
    _check(max_iter, stop_mode)
    states = []
    x = fx = x0
    for k in range(max_iter):
        x = fx
        fx = _damped(func, x, tau)
        if indexing and (k + 1) in indexing:
            states.append(fx)
    return fx, states, SolverStat.from_final_step(x, fx, max_iter)


def anderson_solver(func: Callable, x0: Tensor, max_iter: int = 50, tol: float = 1e-3, stop_mode: str = "abs",
                    indexing=None, m: int = 6, lam: float = 1e-4, tau: float = 1.0, return_final: bool = False):
    """Anderson acceleration with torchdeq's conventions.

    Two plain steps fill the history, then each step mixes the last ``min(k, m)`` images with
    weights from a least-squares problem regularised by the absolute ``lam`` (deqkit's own
    ``Anderson`` uses a relative one). Residuals are recorded from the third call of func on,
    so ``max_iter`` <= 2 returns x0.
    """
    _check(max_iter, stop_mode)
    if isinstance(m, bool) or not isinstance(m, int) or m < 2:
        raise ValueError(f"m must be an integer >= 2, got {m!r}")

    def g(x):  # func on flattened states
        return func(x.view_as(x0)).reshape_as(x)

    x_flat = flat(x0)
    batch, dim = x_flat.shape
    kw: dict[str, Any] = dict(dtype=x0.dtype, device=x0.device)
    X = torch.zeros(batch, m, dim, **kw)  # history of estimates
    F = torch.zeros(batch, m, dim, **kw)  # and of their images
    X[:, 0], F[:, 0] = x_flat, g(x_flat)
    X[:, 1], F[:, 1] = F[:, 0], g(F[:, 0])
    # bordered normal equations [[0, 1^T], [1, G G^T + lam I]] [nu; alpha] = [1; 0]
    H = torch.zeros(batch, m + 1, m + 1, **kw)
    H[:, 0, 1:] = H[:, 1:, 0] = 1
    rhs = torch.zeros(batch, m + 1, 1, **kw)
    rhs[:, 0] = 1
    record = Record(batch, x0.device, stop_mode, return_final)
    best, states = x0, []
    for k in range(2, max_iter):
        n = min(k, m)
        G = F[:, :n] - X[:, :n]
        H[:, 1:n + 1, 1:n + 1] = torch.bmm(G, G.transpose(1, 2)) + lam * torch.eye(n, **kw)[None]
        alpha = torch.linalg.solve(H[:, :n + 1, :n + 1], rhs[:, :n + 1])[:, 1:n + 1, 0]
        mixed_f = torch.bmm(alpha.unsqueeze(1), F[:, :n])[:, 0]
        mixed_x = torch.bmm(alpha.unsqueeze(1), X[:, :n])[:, 0]
        X[:, k % m] = tau * mixed_f + (1 - tau) * mixed_x
        F[:, k % m] = g(X[:, k % m])
        residual = F[:, k % m] - X[:, k % m]
        abs_diff = residual.norm(dim=1)
        rel_diff = abs_diff / (F[:, k % m].norm(dim=1) + 1e-9)
        best = record.update(best, F[:, k % m].view_as(x0), k + 1, abs_diff, rel_diff)
        if indexing and (k + 1) in indexing:
            states.append(best)
        if record.converged(tol):
            record.pad_to(max_iter - 1)
            break
    return _finish(record, best, states, indexing)


def _inv_jac_vec(us: Tensor, vts: Tensor, x: Tensor) -> Tensor:
    """``(-I + U V^T) x`` per sample: the low-rank inverse-Jacobian estimate times x."""
    if us.numel() == 0:
        return -x
    return -x + torch.einsum("bdl,bl->bd", us, torch.einsum("bld,bd->bl", vts, x))


def _vec_inv_jac(us: Tensor, vts: Tensor, x: Tensor) -> Tensor:
    """``x^T (-I + U V^T)`` per sample."""
    if us.numel() == 0:
        return -x
    return -x + torch.einsum("bl,bld->bd", torch.einsum("bd,bdl->bl", x, us), vts)


def _armijo_step(g: Callable, x0: Tensor, g0: Tensor, update: Tensor) -> tuple[Tensor, Tensor]:
    """``x0 + s * update`` with ``s`` from a backtracking Armijo search on ``phi(s) = ||g||^2``
    (the whole batch at once; cubic interpolation; ``s = 1`` when it finds nothing above 0.01)."""
    last = {"s": 0.0, "g": g0, "phi": g0.norm() ** 2}

    def phi(s):
        if s == last["s"]:
            return last["phi"]
        g_s = g(x0 + s * update)
        value = g_s.norm() ** 2 if bool(torch.isfinite(g_s).all()) else float("inf")
        last.update(s=s, g=g_s, phi=value)
        return value

    phi0 = last["phi"]
    slope = -phi0  # derivative of phi at 0 along a Newton-like direction
    s = _armijo(phi, phi0, slope, c1=1e-4, amin=1e-2)
    s = 1.0 if s is None else s
    if s == last["s"]:
        return x0 + s * update, last["g"]
    x = x0 + s * update
    return x, g(x)


def _armijo(phi: Callable, phi0, slope, c1: float, amin: float):
    """The step of a backtracking search meeting ``phi(s) <= phi0 + c1 s slope``, or None."""
    a0 = 1
    phi_a0 = phi(a0)
    if phi_a0 <= phi0 + c1 * a0 * slope:
        return a0
    a1 = -slope * a0 ** 2 / 2.0 / (phi_a0 - phi0 - slope * a0)  # quadratic model's minimum
    phi_a1 = phi(a1)
    while a1 > amin:
        # minimum of the cubic through phi0, slope, phi(a0), phi(a1)
        denom = a0 ** 2 * a1 ** 2 * (a1 - a0)
        r0, r1 = phi_a0 - phi0 - slope * a0, phi_a1 - phi0 - slope * a1
        a = (a0 ** 2 * r1 - a1 ** 2 * r0) / denom
        b = (-a0 ** 3 * r1 + a1 ** 3 * r0) / denom
        a2 = (-b + torch.sqrt(torch.abs(b ** 2 - 3 * a * slope))) / (3.0 * a)
        phi_a2 = phi(a2)
        if phi_a2 <= phi0 + c1 * a2 * slope:
            return a2
        if (a1 - a2) > a1 / 2.0 or (1 - a2 / a1) < 0.96:
            a2 = a1 / 2.0
        a0, a1, phi_a0, phi_a1 = a1, a2, phi_a1, phi_a2
    return None


def broyden_solver(func: Callable, x0: Tensor, max_iter: int = 50, tol: float = 1e-3, stop_mode: str = "abs",
                   indexing=None, LBFGS_thres=None, ls: bool = False, return_final: bool = False):
    """Broyden's ("good") method on ``g(x) = f(x) - x`` with a low-rank inverse Jacobian.

    Returns each sample's lowest-residual estimate ``x`` (not its image). ``LBFGS_thres`` caps
    the rank (default ``max_iter``). ``ls=True`` scales each step by an Armijo line search on
    the whole batch's ``||g||^2`` (extra calls of func).
    """
    _check(max_iter, stop_mode)
    x_est = flat(x0)
    batch, dim = x_est.shape

    def g(y):
        return func(y.view_as(x0)).reshape_as(y) - y

    rank = max_iter if LBFGS_thres is None else LBFGS_thres
    gx = g(x_est)
    us = torch.zeros(batch, dim, rank, dtype=x0.dtype, device=x0.device)
    vts = torch.zeros(batch, rank, dim, dtype=x0.dtype, device=x0.device)
    update = gx  # -(-I) g(x): the first step is a plain fixed-point step
    record = Record(batch, x0.device, stop_mode, return_final)
    best, states = x0, []
    nstep = 0
    while nstep < max_iter:
        if ls:
            x_new, g_new = _armijo_step(g, x_est, gx, update)
        else:
            x_new = x_est + update
            g_new = g(x_new)
        delta_x, delta_g = x_new - x_est, g_new - gx
        x_est, gx = x_new, g_new
        nstep += 1
        abs_diff = gx.norm(dim=1)
        rel_diff = abs_diff / ((gx + x_est).norm(dim=1) + 1e-9)
        best = record.update(best, x_est.view_as(x0), nstep, abs_diff, rel_diff)
        if indexing and nstep in indexing:
            states.append(best)
        if record.converged(tol):
            break
        if nstep > 30:  # torchdeq's stall test: near tol with no progress over 30 steps
            window = torch.stack(record.trace[stop_mode][-30:])
            progress = window.max(dim=1)[0] / window.min(dim=1)[0]
            if record.trace[stop_mode][-1].max() < 3 * tol and progress.max() < 1.3:
                break
        part_us, part_vts = us[:, :, :nstep - 1], vts[:, :nstep - 1]
        vt = _vec_inv_jac(part_us, part_vts, delta_x)
        u = (delta_x - _inv_jac_vec(part_us, part_vts, delta_g)) / torch.einsum("bd,bd->b", vt, delta_g)[:, None]
        vt = torch.nan_to_num(vt, nan=0.0, posinf=float("inf"), neginf=float("-inf"))
        u = torch.nan_to_num(u, nan=0.0, posinf=float("inf"), neginf=float("-inf"))
        vts[:, (nstep - 1) % rank] = vt
        us[:, :, (nstep - 1) % rank] = u
        update = -_inv_jac_vec(us[:, :, :nstep], vts[:, :nstep], gx)
    record.pad_to(max_iter + 1)
    return _finish(record, best, states, indexing)
