"""The one iteration loop that drives every solver.

It owns what every solver needs and none should copy: the step budget, the per-sample
stopping rule, convergence masks (a finished sample stops changing), active-set evaluation,
non-finite and divergence detection, each sample's best iterate, the residual trace and the
stats record. A solver only proposes the next iterate (see ``solvers.AbstractSolver``).
Every operation here is out of place, so the same loop serves ``Unrolled`` under autograd.
"""

from __future__ import annotations

import collections
import dataclasses
import warnings
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from ._context import rows_scope
from ._result import Result

_RUNNING = -1


def residual_norm(z: Tensor, fz: Tensor, stop_mode: str) -> Tensor:
    """Per-sample residual: ``||f(z) - z||`` ("abs") or that over ``||f(z)|| + 1e-9`` ("rel").

    Norms are L2 over all dims but the first, computed in float32 or better.
    """
    dtype = torch.promote_types(z.dtype, torch.float32)
    diff = (fz.detach() - z.detach()).reshape(z.shape[0], -1).to(dtype)
    res = torch.linalg.vector_norm(diff, dim=1)
    if stop_mode == "rel":
        res = res / (torch.linalg.vector_norm(fz.detach().reshape(z.shape[0], -1).to(dtype), dim=1) + 1e-9)
    return res


def _rows(mask: Tensor, like: Tensor) -> Tensor:
    """Broadcast a (B,) mask against a (B, ...) tensor."""
    return mask.reshape((-1,) + (1,) * (like.dim() - 1))


class Problem:
    """The map being solved, as solver steps see it: counted calls, JVPs, the active mask.

    ``f(z, *inputs)`` is called on the whole batch, or with ``active_set=True`` on the rows of
    samples still iterating (inputs whose first dim is the batch are sliced to match).
    """

    def __init__(
        self,
        f: Callable[..., Tensor],
        z0: Tensor,
        inputs: Sequence[Any] = (),
        active_set: bool = False,
        checkpoint: bool = False,
    ):
        self._f = f
        self._inputs = tuple(inputs)
        self._batch = z0.shape[0]
        self._shape, self._dtype, self._device = z0.shape, z0.dtype, z0.device
        self.active_set = active_set
        self.checkpoint = checkpoint
        self.active = torch.ones(self._batch, dtype=torch.bool, device=z0.device)
        self.nfev = 0
        self.sample_evals = 0
        self._no_forward_ad = False

    # -- evaluation -------------------------------------------------------------------------
    def _call(self, z: Tensor, inputs: tuple) -> Tensor:
        if self.checkpoint and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            out = checkpoint(self._f, z, *inputs, use_reentrant=False)
        else:
            out = self._f(z, *inputs)
        return self._check(out, z)

    def _check(self, out: Any, z: Tensor) -> Tensor:
        if not isinstance(out, Tensor):
            raise TypeError(f"f must return a Tensor, got {type(out).__name__}")
        if out.shape != z.shape:
            hint = ""
            if self.active_set and out.shape[1:] == z.shape[1:]:
                hint = (" With active_set=True, f is called on a subset of the batch: pass "
                        "per-sample inputs through `inputs=` instead of capturing them in f.")
            raise ValueError(
                f"f must return a tensor of the same shape as z: f(z) has shape "
                f"{tuple(out.shape)}, z has shape {tuple(z.shape)}.{hint}"
            )
        if out.device != self._device:
            raise ValueError(f"f must return a tensor on z0's device: got {out.device}, z0 is on {self._device}")
        if out.dtype != self._dtype:
            if torch.is_autocast_enabled(self._device.type):
                out = out.to(self._dtype)  # f ran under autocast; the state keeps z0's dtype
            else:
                raise ValueError(
                    f"f must return z0's dtype: f(z) is {out.dtype}, z0 is {self._dtype} "
                    "(under autocast the output is cast back automatically)"
                )
        return out

    def f(self, z: Tensor) -> Tensor:
        """One counted call of the map on the whole batch."""
        self.nfev += 1
        self.sample_evals += z.shape[0]
        return self._call(z, self._inputs)

    def evaluate(self, z: Tensor, previous: Tensor | None) -> Tensor:
        """f(z) for the active samples; stopped samples keep ``previous`` (active set only)."""
        if not self.active_set or previous is None:
            return self.f(z)
        n_active = int(self.active.sum())
        if n_active == self._batch:
            return self.f(z)
        idx = torch.nonzero(self.active).flatten()
        inputs = tuple(
            x.index_select(0, idx) if isinstance(x, Tensor) and x.dim() > 0 and x.shape[0] == self._batch else x
            for x in self._inputs
        )
        self.nfev += 1
        self.sample_evals += n_active
        with rows_scope(idx):
            out = self._call(z.index_select(0, idx), inputs)
        return previous.index_copy(0, idx, out)

    def jvp(self, z: Tensor, v: Tensor, fz: Tensor | None = None, method: str = "auto") -> Tensor:
        """``J_f(z) v``, counted as one evaluation of f.

        ``method``: "forward" (forward-mode AD, exact), "finite_difference"
        (``(f(z + h v) - f(z)) / h``, needs ``fz = f(z)``; accurate to about the square root of
        the dtype's epsilon) or "auto" (forward mode, falling back to finite differences for
        maps with operations that have no forward-mode derivative).
        """
        if method in ("auto", "forward") and not self._no_forward_ad:
            self.nfev += 1
            self.sample_evals += z.shape[0]
            inputs = self._inputs
            try:
                with warnings.catch_warnings():  # torch's own first-use notice in forward AD
                    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=DeprecationWarning)
                    _, tangent = torch.func.jvp(lambda u: self._f(u, *inputs), (z,), (v.to(z.dtype),))
                return tangent.to(self._dtype)
            except (NotImplementedError, RuntimeError) as err:
                if method == "forward" or "forward AD" not in str(err) and "forward-mode" not in str(err).lower():
                    raise
                self._no_forward_ad = True
                self.nfev -= 1
                self.sample_evals -= z.shape[0]
        if fz is None:
            raise ValueError("a finite-difference JVP needs fz = f(z)")
        b = z.shape[0]
        eps = torch.finfo(torch.promote_types(z.dtype, torch.float32)).eps
        zn = torch.linalg.vector_norm(z.reshape(b, -1).float(), dim=1)
        vn = torch.linalg.vector_norm(v.reshape(b, -1).float(), dim=1).clamp_min(1e-30)
        h = (eps ** 0.5) * (1 + zn) / vn  # (B,) per-sample step
        hb = h.reshape((-1,) + (1,) * (z.dim() - 1)).to(z.dtype)
        return (self.f(z + hb * v.to(z.dtype)) - fz) / hb

@dataclasses.dataclass
class LoopOutput:
    best_z: Tensor        # each sample's best iterate z_k
    best_fz: Tensor       # f(best_z), the value a solve returns
    residual: Tensor      # (B,) residual of best_z
    status: Tensor        # (B,) Result codes
    steps: Tensor         # (B,) iterations each sample took part in
    trace: Tensor         # (B, T)
    trajectory: tuple     # last k images f(z_k), oldest first
    nfev: int
    sample_evals: int


def iterate(
    solver: Any,
    problem: Problem,
    z0: Tensor,
    *,
    tol: float,
    stop_mode: str,
    max_steps: int,
    divergence: float | None,
    trajectory: int = 0,
) -> LoopOutput:
    """Run ``solver`` from ``z0`` until every sample has stopped or ``max_steps`` have run."""
    batch = z0.shape[0]
    device = z0.device
    z = z0
    fz = problem.evaluate(z, None)
    state = solver.init(z, fz, problem)

    status = torch.full((batch,), _RUNNING, dtype=torch.long, device=device)
    steps = torch.zeros(batch, dtype=torch.long, device=device)
    best_res = torch.full((batch,), float("inf"), dtype=torch.promote_types(z0.dtype, torch.float32), device=device)
    first_res = None
    best_z, best_fz = z, fz
    trace: list[Tensor] = []
    kept: collections.deque = collections.deque(maxlen=trajectory) if trajectory else collections.deque(maxlen=0)
    active = problem.active

    for it in range(1, max_steps + 1):
        res = residual_norm(z, fz, stop_mode)
        steps = steps + active.long()
        finite = torch.isfinite(res)
        res_kept = torch.where(active, res, best_res)  # stopped samples keep their last value
        trace.append(res_kept)

        improved = active & finite & (res < best_res)
        n_improved = int(improved.sum())
        if n_improved == batch:  # the common case costs no copy
            best_z, best_fz, best_res = z, fz, res
        elif n_improved:
            best_z = torch.where(_rows(improved, z), z, best_z)
            best_fz = torch.where(_rows(improved, fz), fz, best_fz)
            best_res = torch.where(improved, res, best_res)

        if first_res is None:
            first_res = torch.where(finite, res, torch.zeros_like(res))
        new_status = torch.where(res <= tol, Result.SUCCESS, _RUNNING)
        if divergence is not None:
            new_status = torch.where(res > divergence * first_res.clamp_min(tol), Result.DIVERGED, new_status)
        new_status = torch.where(finite, new_status, Result.NONFINITE)
        status = torch.where(active, new_status, status)
        if kept.maxlen:
            kept.append(fz)

        bad = active & (status >= Result.DIVERGED)
        active = status == _RUNNING
        problem.active = active
        n_active = int(active.sum())
        if n_active == 0 or it == max_steps:
            break
        if bool(bad.any()):  # a failed sample rests at its best iterate, so it cannot spread NaN
            z = torch.where(_rows(bad, z), best_z, z)
            fz = torch.where(_rows(bad, fz), best_fz, fz)

        z_next, state = solver.step(z, fz, state, problem)
        if z_next.shape != z.shape or z_next.dtype != z.dtype:
            raise RuntimeError(
                f"solver {solver!r} returned an iterate of shape {tuple(z_next.shape)} and dtype "
                f"{z_next.dtype}; expected {tuple(z.shape)} and {z.dtype}"
            )
        z = z_next if n_active == batch else torch.where(_rows(active, z), z_next, z)
        fz = problem.evaluate(z, fz)

    status = torch.where(status == _RUNNING, int(Result.MAX_STEPS), status)
    return LoopOutput(
        best_z=best_z,
        best_fz=best_fz,
        residual=torch.where(torch.isfinite(best_res), best_res, res),
        status=status,
        steps=steps,
        trace=torch.stack(trace, dim=1).detach(),
        trajectory=tuple(kept),
        nfev=problem.nfev,
        sample_evals=problem.sample_evals,
    )
