"""torchdeq's four solvers, ported with torchdeq's numbers, and its solver registry.

``solver(func, x0, max_iter=50, tol=1e-3, stop_mode='abs', indexing=None, **options) -> (z,
states, info)``: each sample's lowest-residual estimate, the estimates at the steps in
``indexing`` (Broyden's one step early) and a ``SolverStat``. As in torchdeq, stopping is
batch-wide (never with ``tol <= 0``), estimates are mixed by multiplication (a NaN reaches the
value and ``info``) and an option a solver does not read is ignored (here with a warning).
"""

from __future__ import annotations

import difflib
import operator

import torch

from .utils import ignored

__all__ = ["register_solver", "get_solver", "solver_stat_from_final_step", "SolverStat", "anderson_solver",
           "broyden_solver", "fixed_point_iter", "simple_fixed_point_iter"]


class SolverStat(dict):
    """Solver statistics as torchdeq names them: ``abs_lowest``/``rel_lowest`` (B,) each sample's
    lowest ``||f(z) - z||`` and that over ``||f(z)|| + 1e-9``; ``abs_trace``/``rel_trace`` (B, N)
    their history (a 1e8 placeholder first, the lowest values repeated after an early stop);
    ``nstep`` (B,) the step of the lowest residual in the stop mode; ``sradius`` where it was
    estimated. Missing entries hold -1."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for key, empty in (("abs_lowest", [-1.0]), ("rel_lowest", [-1.0]), ("abs_trace", [[-1.0]]),
                           ("rel_trace", [[-1.0]]), ("nstep", [-1.0]), ("sradius", [-1.0])):
            self.setdefault(key, torch.tensor(empty))

    @classmethod
    def from_final_step(cls, z, fz, nstep=0):
        """Statistics of one pair ``(z, f(z))`` (lists of states are concatenated per sample)."""
        if not torch.is_tensor(z):
            z = torch.cat([zi.flatten(start_dim=1) for zi in z], dim=1)
            fz = torch.cat([fi.flatten(start_dim=1) for fi in fz], dim=1)
        diff = (fz - z).flatten(start_dim=1).norm(dim=1)
        rel = diff / (fz.flatten(start_dim=1).norm(dim=1) + 1e-8)
        return cls(abs_lowest=diff, rel_lowest=rel, abs_trace=diff.unsqueeze(1), rel_trace=rel.unsqueeze(1),
                   nstep=nstep * torch.ones(z.shape[0], device=z.device))


def solver_stat_from_final_step(z, fz, nstep=0):
    """``SolverStat`` of one pair ``(z, f(z))``."""
    return SolverStat.from_final_step(z, fz, nstep=nstep)


def _flat(x):
    return x.flatten(start_dim=1) if x.dim() >= 2 else x.view(x.nelement(), 1)


def _mix(mask, new, old):
    """``new`` where ``mask``, else ``old``, torchdeq's way: ``mask * new + ~mask * old``
    (so a NaN or Inf in either reaches the result)."""
    dims = new.dim() - 1 if torch.is_tensor(new) else old.dim() - 1
    mask = mask.view(mask.shape[0], *[1] * dims)
    return mask * new + ~mask * old


class _Record:
    """Each sample's residual history, lowest residuals and their steps, in torchdeq's layout."""

    def __init__(self, batch, device, stop_mode, return_final, tol, indexing):
        start = torch.tensor(1e8, device=device).repeat(batch)
        self.trace = {"abs": [start], "rel": [start]}
        self.lowest = {"abs": start, "rel": start}
        self.step = {"abs": torch.zeros(batch, device=device), "rel": torch.zeros(batch, device=device)}
        self.stop_mode, self.return_final, self.tol, self.indexing, self.states = stop_mode, return_final, tol, indexing, []

    def update(self, best, candidate, nstep, abs_diff, rel_diff, sampled):
        """Record one step; return each sample's best estimate (replaced where the residual in the
        stop mode is a new low, or always with ``return_final``), kept as a state at the step
        ``sampled``, and whether the batch is done: its worst latest residual below ``tol``."""
        diffs = {"abs": abs_diff, "rel": rel_diff}
        for mode in ("abs", "rel"):
            self.trace[mode].append(diffs[mode])
            take = (diffs[mode] < self.lowest[mode]) + self.return_final
            if mode == self.stop_mode:
                best = _mix(take, candidate, best).clone().detach()
            self.lowest[mode] = _mix(take, diffs[mode], self.lowest[mode])
            self.step[mode] = _mix(take, nstep, self.step[mode])
        if self.indexing and sampled in self.indexing:
            self.states.append(best)
        return best, not self.return_final and bool(self.trace[self.stop_mode][-1].max() < self.tol)

    def pad(self, count):
        """Repeat the lowest residuals ``count`` times (torchdeq's trace after an early stop)."""
        for _ in range(count):
            for mode in ("abs", "rel"):
                self.trace[mode].append(self.lowest[mode])

    def finish(self, best):
        """torchdeq's ``(z, states, info)``: the best estimate also as the one state when none was sampled."""
        if self.indexing and not self.states:
            self.states.append(best)
        return best, self.states, SolverStat(
            abs_lowest=self.lowest["abs"], rel_lowest=self.lowest["rel"], abs_trace=torch.stack(self.trace["abs"], dim=1),
            rel_trace=torch.stack(self.trace["rel"], dim=1), nstep=self.step[self.stop_mode])


def _check(name, max_iter, stop_mode, options, known):
    """``max_iter`` as a Python int (numpy and one-element tensor integers pass, as in torchdeq's
    ``range``); the stop mode checked; options no solver reads warned about."""
    try:
        max_iter = operator.index(max_iter)
    except TypeError:
        raise TypeError(f"{name}: max_iter must be an integer, got {max_iter!r} (torchdeq fails on it too)") from None
    if stop_mode not in ("abs", "rel"):
        raise ValueError(f"{name}: stop_mode must be 'abs' or 'rel', got {stop_mode!r} (torchdeq fails with a KeyError)")
    ignored(f"torchdeq's {name}", sorted(set(options) - {"tol", "stop_mode"} if name.startswith("simple") else options), known)
    return max_iter


def fixed_point_iter(func, x0, max_iter=50, tol=1e-3, stop_mode="abs", indexing=None, tau=1.0, return_final=False,
                     **options):
    """Fixed-point iteration ``x <- tau f(x) + (1 - tau) x``; returns the lowest-residual image
    (the last with ``return_final``, which also runs every step)."""
    max_iter = _check("fixed_point_iter", max_iter, stop_mode, options, ("tau", "return_final", "indexing"))
    record = _Record(x0.shape[0] if x0.dim() >= 2 else x0.nelement(), x0.device, stop_mode, return_final, tol, indexing)
    best, fx = x0, x0
    for k in range(max_iter):
        x = fx
        fx = tau * func(x) + (1 - tau) * x
        abs_diff = _flat(fx - x).norm(dim=1)
        best, done = record.update(best, fx, k + 1, abs_diff, abs_diff / (_flat(fx).norm(dim=1) + 1e-9), k + 1)
        if done:
            record.pad(max_iter - 1 - k)
            break
    return record.finish(best)


def simple_fixed_point_iter(func, x0, max_iter=50, tau=1.0, indexing=None, **options):
    """Exactly ``max_iter`` steps ``func(x, tau=tau)``, the last image returned; ``info`` holds
    the last step's residual only (``tol`` and ``stop_mode`` are accepted and not used)."""
    max_iter = _check("simple_fixed_point_iter", max_iter, "abs", options, ("tau", "indexing"))
    states, x, fx = [], x0, x0
    for k in range(max_iter):
        x = fx
        fx = func(x, tau=tau)
        if indexing and (k + 1) in indexing:
            states.append(fx)
    return fx, states, SolverStat.from_final_step(x, fx, max_iter)


def anderson_solver(func, x0, max_iter=50, tol=1e-3, stop_mode="abs", indexing=None, m=6, lam=1e-4, tau=1.0,
                    return_final=False, **options):
    """Anderson acceleration: two plain steps fill the history, then each step mixes the last
    ``min(k, m)`` images with least-squares weights regularised by the absolute ``lam``.
    Residuals are recorded from the third call of func on (steps 1 and 2 are never sampled)."""
    max_iter = _check("anderson", max_iter, stop_mode, options, ("m", "lam", "tau", "return_final", "indexing"))
    if isinstance(m, bool) or not isinstance(m, int) or m < 2:
        raise ValueError(f"anderson: m must be an integer >= 2, got {m!r} (torchdeq fails indexing its history)")

    def f(x):
        return func(x.view_as(x0)).reshape_as(x)

    x_flat = _flat(x0)
    batch, dim = x_flat.shape
    kw = dict(dtype=x0.dtype, device=x0.device)
    X, F = torch.zeros(batch, m, dim, **kw), torch.zeros(batch, m, dim, **kw)  # estimates and their images
    X[:, 0], F[:, 0] = x_flat, f(x_flat)
    X[:, 1], F[:, 1] = F[:, 0], f(F[:, 0])
    H = torch.zeros(batch, m + 1, m + 1, **kw)  # bordered normal equations [[0, 1^T], [1, G G^T + lam I]]
    H[:, 0, 1:] = H[:, 1:, 0] = 1
    rhs = torch.zeros(batch, m + 1, 1, **kw)
    rhs[:, 0] = 1
    record = _Record(batch, x0.device, stop_mode, return_final, tol, indexing)
    best = x0
    for k in range(2, max_iter):
        n, i = min(k, m), k % m
        G = F[:, :n] - X[:, :n]
        H[:, 1:n + 1, 1:n + 1] = torch.bmm(G, G.transpose(1, 2)) + lam * torch.eye(n, **kw)[None]
        alpha = torch.linalg.solve(H[:, :n + 1, :n + 1], rhs[:, :n + 1])[:, 1:n + 1, 0]
        X[:, i] = tau * (alpha[:, None] @ F[:, :n])[:, 0] + (1 - tau) * (alpha[:, None] @ X[:, :n])[:, 0]
        F[:, i] = f(X[:, i])
        abs_diff = (F[:, i] - X[:, i]).norm(dim=1)
        best, done = record.update(best, F[:, i].view_as(x0), k + 1, abs_diff, abs_diff / (F[:, i].norm(dim=1) + 1e-9), k + 1)
        if done:
            record.pad(max_iter - 1 - k)
            break
    return record.finish(best)


def _inv_jac_vec(us, vts, x):
    """``(-I + U V^T) x`` per sample: the low-rank inverse-Jacobian estimate times x."""
    if us.nelement() == 0:
        return -x
    return -x + torch.einsum("bdl, bl -> bd", us, torch.einsum("bld, bd -> bl", vts, x))


def _vec_inv_jac(us, vts, x):
    """``x^T (-I + U V^T)`` per sample."""
    if us.nelement() == 0:
        return -x
    return -x + torch.einsum("bl, bld -> bd", torch.einsum("bd, bdl -> bl", x, us), vts)


def _armijo(phi, phi0, slope, c1=1e-4, amin=1e-2):
    """The step of a backtracking search meeting ``phi(s) <= phi0 + c1 s slope`` (quadratic, then
    cubic interpolation), or None when it falls below ``amin``."""
    a0, phi_a0 = 1, phi(1)
    if phi_a0 <= phi0 + c1 * a0 * slope:
        return a0
    a1 = -slope * a0 ** 2 / 2.0 / (phi_a0 - phi0 - slope * a0)
    phi_a1 = phi(a1)
    while a1 > amin:
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


def _step(g, x0, g0, update, ls):
    """``x0 + s * update`` and ``g`` there: ``s = 1``, or from an Armijo search on the whole
    batch's ``||g||^2`` with ``ls``."""
    last = {"s": 0, "g": g0, "phi": g0.norm() ** 2}

    def phi(s):
        if s == last["s"]:
            return last["phi"]
        g_s = g(x0 + s * update)
        last.update(s=s, g=g_s, phi=g_s.norm() ** 2 if bool(torch.isfinite(g_s).all()) else float("inf"))
        return last["phi"]

    s = _armijo(phi, last["phi"], -last["phi"]) if ls else None
    s = 1.0 if s is None else s
    x = x0 + s * update
    return x, (last["g"] if s == last["s"] else g(x))


def broyden_solver(func, x0, max_iter=50, tol=1e-3, stop_mode="abs", indexing=None, LBFGS_thres=None, ls=False,
                   return_final=False, **options):
    """Broyden's ("good") method on ``g(x) = f(x) - x`` with a rank-``LBFGS_thres`` (default
    ``max_iter``) inverse Jacobian; returns each sample's lowest-residual estimate ``x`` (not
    its image). ``ls=True`` scales each step by an Armijo search. Like torchdeq it also stops
    after 30 steps when the worst residual is below ``3 tol`` and, at each of the last 30 steps,
    the samples' residuals are within a factor 1.3 of one another."""
    max_iter = _check("broyden", max_iter, stop_mode, options, ("LBFGS_thres", "ls", "return_final", "indexing"))
    x_est = _flat(x0)
    batch, dim = x_est.shape

    def g(y):
        return func(y.view_as(x0)).reshape_as(y) - y

    rank = max_iter if LBFGS_thres is None else LBFGS_thres
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ValueError(f"broyden: LBFGS_thres (default max_iter) must be an integer >= 0, got {rank!r} "
                         "(torchdeq fails allocating its memory)")
    gx = g(x_est)
    us = torch.zeros(batch, dim, rank, dtype=x0.dtype, device=x0.device)
    vts = torch.zeros(batch, rank, dim, dtype=x0.dtype, device=x0.device)
    update = -_inv_jac_vec(us[:, :, :0], vts[:, :0], gx)
    record = _Record(batch, x0.device, stop_mode, return_final, tol, indexing)
    best, nstep = x0, 0
    while nstep < max_iter:
        x_new, g_new = _step(g, x_est, gx, update, ls)
        delta_x, delta_g = x_new - x_est, g_new - gx
        x_est, gx = x_new, g_new
        nstep += 1
        abs_diff = gx.norm(dim=1)
        best, done = record.update(best, x_est.view_as(x0), nstep, abs_diff, abs_diff / ((gx + x_est).norm(dim=1) + 1e-9),
                                   nstep + 1)  # (torchdeq samples one step early)
        if done:
            break
        if nstep > 30:
            window = torch.stack(record.trace[stop_mode][-30:])  # (30, B): the last steps' residuals
            if record.trace[stop_mode][-1].max() < 3 * tol and (window.max(dim=1)[0] / window.min(dim=1)[0]).max() < 1.3:
                break
        part_us, part_vts = us[:, :, :nstep - 1], vts[:, :nstep - 1]
        vt = _vec_inv_jac(part_us, part_vts, delta_x)
        u = (delta_x - _inv_jac_vec(part_us, part_vts, delta_g)) / torch.einsum("bd,bd->b", vt, delta_g)[:, None]
        vts[:, (nstep - 1) % rank] = torch.where(torch.isnan(vt), 0, vt)
        us[:, :, (nstep - 1) % rank] = torch.where(torch.isnan(u), 0, u)
        update = -_inv_jac_vec(us[:, :, :nstep], vts[:, :nstep], gx)
    record.pad(max_iter + 1 - len(record.trace[stop_mode]))
    return record.finish(best)


_solvers = {"anderson": anderson_solver, "broyden": broyden_solver, "fixed_point_iter": fixed_point_iter,
            "simple_fixed_point_iter": simple_fixed_point_iter}


def get_solver(key):
    """The solver function registered as ``key``; an unknown name raises ``ValueError`` (torchdeq
    fails with an AssertionError)."""
    if key not in _solvers:
        close = difflib.get_close_matches(str(key), list(_solvers), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown solver {key!r}{hint}; registered: {sorted(_solvers)}")
    return _solvers[key]


def register_solver(solver_type, solver):
    """Register ``solver`` (torchdeq's call signature) under the name ``solver_type``."""
    if not callable(solver):
        raise TypeError(f"solver must be callable, got {type(solver).__name__} (torchdeq fails when calling it)")
    _solvers[solver_type] = solver
