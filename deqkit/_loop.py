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
from typing import Any, Callable, Optional, Sequence, cast

import numpy as np
import torch
from torch import Tensor

from ._context import rows_scope
from ._options import SolveOptions
from ._result import Result

_RUNNING = -1
_SUCCESS, _DIVERGED, _NONFINITE, _MAX_STEPS = (int(r) for r in (Result.SUCCESS, Result.DIVERGED, Result.NONFINITE, Result.MAX_STEPS))


def _flat_norm(x: Tensor, dtype: torch.dtype) -> Tensor:
    return cast(Tensor, torch.linalg.vector_norm(x.reshape(x.shape[0], -1), dim=1, dtype=dtype))


def scaled_norm(x: Tensor) -> Tensor:
    """Per-sample L2 norm in float64 that cannot overflow: ``max|x| * ||x / max|x|||``.

    Finite for every finite ``x`` of a float dtype up to float32 (float64 entries near its own
    maximum can still give Inf); NaN when ``x`` holds Inf or NaN. No graph.
    """
    with torch.no_grad():
        flat = x.reshape(x.shape[0], -1).to(torch.float64)
        top = flat.abs().amax(dim=1, keepdim=True)
        safe = torch.where(top > 0, top, torch.ones_like(top))
        norm = torch.linalg.vector_norm(flat / safe, dim=1) * safe.squeeze(1)
        return torch.where(torch.isfinite(top.squeeze(1)), norm, torch.full_like(norm, float("nan")))


def residual_norms(z: Tensor, fz: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample ``(||f(z) - z||, ||f(z)||)``: L2 over all dims but the first, in float32+. No graph.

    The fast norm's sum of squares overflows for entries above about 1e19 in float32; where a
    norm comes out non-finite both are recomputed in float64 with ``scaled_norm`` (and returned
    in float64), so a finite ``f(z)`` has finite norms and a non-finite one gives NaN: never a
    residual of ``inf / inf`` or ``x / inf``.
    """
    dtype = torch.promote_types(z.dtype, torch.float32)
    with torch.no_grad():
        diff = _flat_norm(fz - z, dtype)
        size = _flat_norm(fz, dtype)
        if not bool(torch.isfinite(diff).all() & torch.isfinite(size).all()):
            diff, size = scaled_norm(fz - z), scaled_norm(fz)
    return diff, size


def _rows(mask: Tensor, like: Tensor) -> Tensor:
    """Broadcast a (B,) mask against a (B, ...) tensor."""
    return mask.reshape((-1,) + (1,) * (like.dim() - 1))


def _versions(tensors: Sequence[Any]) -> tuple[Optional[int], ...]:
    return tuple(t._version if isinstance(t, Tensor) else None for t in tensors)


class Problem:
    """The map being solved, as solver steps see it: counted calls, JVPs, the active mask.

    ``f(z, *inputs)`` is called on the whole batch, or with ``active_set=True`` on the rows of
    samples still iterating: every tensor in ``inputs`` is then per-sample (its first dim is the
    batch) and is sliced along with z; shared tensors belong in f's closure or module.
    ``wrap`` (from the backward mode) wraps each call of f while autograd records it, e.g.
    ``Unrolled(checkpoint=True)``'s activation checkpointing. ``first_call_with_grad`` makes the
    first call with autograd on (its output detached), so that parametrised weights cached for
    the solve carry their graph for the backward mode's calls after the forward loop.

    Every call checks that f left z and the inputs unchanged (tensor version counters) and
    returned z's shape, dtype and device; an exception raised by f reaches the caller with its
    own type.
    """

    def __init__(
        self,
        f: Callable[..., Tensor],
        z0: Tensor,
        inputs: Sequence[Any] = (),
        active_set: bool = False,
        wrap: Optional[Callable[[Callable[..., Tensor]], Callable[..., Tensor]]] = None,
        first_call_with_grad: bool = False,
    ):
        self._f = f
        self._grad_first = first_call_with_grad
        self._call_f = wrap(f) if wrap is not None else f
        self._inputs = tuple(inputs)
        self._batch = z0.shape[0]
        self._shape, self._dtype, self._device = z0.shape, z0.dtype, z0.device
        self.active_set = active_set
        if active_set:
            for i, x in enumerate(self._inputs):
                if not isinstance(x, Tensor):
                    continue
                if x.dim() == 0 or x.shape[0] != self._batch:
                    raise ValueError(
                        f"with active_set=True every tensor in inputs= is per-sample and sliced with z, so its "
                        f"first dim must be the batch size {self._batch}; inputs[{i}] has shape {tuple(x.shape)}. "
                        "Pass tensors shared by all samples (weights, per-feature vectors) through f's closure "
                        "or module instead."
                    )
                if x.dim() == 1:
                    raise ValueError(
                        f"with active_set=True, inputs[{i}] of shape {tuple(x.shape)} is ambiguous: one value per "
                        f"sample, or a vector shared by all samples whose length happens to equal the batch size "
                        f"{self._batch}? Pass per-sample values as shape ({self._batch}, 1) (they are sliced with z), "
                        "and shared tensors through f's closure or module."
                    )
        self._active = torch.ones(self._batch, dtype=torch.bool, device=z0.device)
        self._idx: Tensor | None = None  # rows still iterating, None when all are
        self.nfev = 0
        self.sample_evals = 0
        self._no_forward_ad = False

    @property
    def active(self) -> Tensor:
        """BoolTensor[B]: the samples still iterating."""
        return self._active

    @active.setter
    def active(self, mask: Tensor) -> None:
        self._active = mask
        idx = torch.nonzero(mask).flatten()
        self._idx = None if idx.numel() == self._batch else idx

    # -- evaluation -------------------------------------------------------------------------
    def _call(self, z: Tensor, inputs: tuple[Any, ...]) -> Tensor:
        before = _versions((z, *inputs))
        if self._grad_first:  # fills the solve's cache of normalised weights with their graph
            self._grad_first = False
            with torch.enable_grad():
                out = self._call_f(z, *inputs)
            out = out.detach() if isinstance(out, Tensor) else out
        else:
            out = self._call_f(z, *inputs)
        if _versions((z, *inputs)) != before:
            changed = [name for name, a, b in zip(["z"] + [f"inputs[{i}]" for i in range(len(inputs))], before, _versions((z, *inputs))) if a != b]
            raise ValueError(
                f"f changed its argument(s) {changed} in place (e.g. z.mul_(...)); the solver keeps and "
                "reuses its iterates, so f must compute its result out of place (z * 0.5, not z.mul_(0.5))"
            )
        return self._check(out, z)

    def _check(self, out: Any, z: Tensor) -> Tensor:
        if not isinstance(out, Tensor):
            raise TypeError(f"f must return a Tensor, got {type(out).__name__}")
        if out.shape != z.shape:  # under the active set, evaluate() adds a note on inputs=
            raise ValueError(
                f"f must return a tensor of the same shape as z: f(z) has shape "
                f"{tuple(out.shape)}, z has shape {tuple(z.shape)}"
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
        return cast(Tensor, out)

    def f(self, z: Tensor) -> Tensor:
        """One counted call of the map on the whole batch."""
        self.nfev += 1
        self.sample_evals += z.shape[0]
        return self._call(z, self._inputs)

    def evaluate(self, z: Tensor, previous: Tensor | None) -> Tensor:
        """f(z) for the active samples; stopped samples keep ``previous`` (active set only)."""
        idx = self._idx
        if not self.active_set or previous is None or idx is None:
            return self.f(z)
        n_active = idx.numel()
        inputs = tuple(x.index_select(0, idx) if isinstance(x, Tensor) else x for x in self._inputs)
        self.nfev += 1
        self.sample_evals += n_active
        with rows_scope(idx):
            try:
                out = self._call(z.index_select(0, idx), inputs)
            except Exception as err:  # f's own exception, type unchanged, with where it happened
                if hasattr(err, "add_note"):
                    err.add_note(
                        f"deqkit: raised by f called on {n_active} of {self._batch} samples (active_set=True); "
                        "f must treat samples independently, with per-sample inputs passed through inputs=."
                    )
                raise
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
                    _, tangent = torch.func.jvp(lambda u: self._f(u, *inputs), (z,), (v.to(z.dtype),))[:2]
                return cast(Tensor, tangent).to(self._dtype)
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
        return cast(Tensor, (self.f(z + hb * v.to(z.dtype)) - fz) / hb)


@dataclasses.dataclass
class LoopOutput:
    """What a forward loop hands back to the solve: per-sample best iterates and the record."""

    best_z: Tensor        # each sample's best iterate z_k (the last one when tol is None)
    best_fz: Tensor       # f(best_z), the value a solve returns
    residual: Tensor      # (B,) residual of best_z, in stop_mode
    status: Tensor        # (B,) Result codes
    steps: Tensor         # (B,) iterations each sample took part in
    trace: Tensor         # (B, T)
    trajectory: tuple[tuple[Tensor, Tensor], ...]  # last k pairs (z_i, f(z_i)), oldest first
    nfev: int
    sample_evals: int


def iterate(solver: Any, problem: Problem, z0: Tensor, options: SolveOptions) -> LoopOutput:
    """Run ``solver`` from ``z0`` until every sample has stopped or ``max_steps`` have run.

    Per-sample bookkeeping (status, steps, best residual, trace) lives in small host-side
    numpy arrays: one device-to-host copy of the residual per iteration (the stopping decision
    needs it anyway) replaces a few dozen tiny tensor operations.
    """
    tol, stop_mode, max_steps, divergence = options.tol, options.stop_mode, options.max_steps, options.divergence
    fixed = options.fixed_steps
    batch = z0.shape[0]
    device = z0.device
    z = z0
    fz = problem.evaluate(z, None)
    state = solver.init(z, fz, problem)

    status = np.full(batch, _RUNNING, dtype=np.int64)
    steps = np.zeros(batch, dtype=np.int64)
    best_res = np.full(batch, np.inf)
    diverged_above = None
    best_z, best_fz = z, fz
    trace: list[np.ndarray] = []
    kept: collections.deque[tuple[Tensor, Tensor]] = collections.deque(maxlen=options.trajectory)
    active = np.ones(batch, dtype=bool)
    res_dtype = torch.promote_types(z0.dtype, torch.float32)

    def device_mask(mask: np.ndarray) -> Tensor:
        return torch.from_numpy(mask).to(device)

    for it in range(1, max_steps + 1):
        # one device-to-host copy: absolute residual and size of f(z), per sample
        with torch.no_grad():
            pair = torch.stack([_flat_norm(fz - z, res_dtype), _flat_norm(fz, res_dtype)])
        diff, size = pair.cpu().numpy().astype(np.float64)
        if not (np.isfinite(diff).all() and np.isfinite(size).all()):  # overflow, or a NaN/Inf in f(z)
            diff, size = torch.stack([scaled_norm(fz - z), scaled_norm(fz)]).cpu().numpy().astype(np.float64)
        res = diff if stop_mode == "abs" else diff / (size + 1e-9)
        steps += active
        finite = np.isfinite(res)
        trace.append(np.where(active, res, best_res))  # stopped samples keep their best value

        # with a fixed number of steps the last finite iterate is kept, else the lowest residual
        improved = active & finite & (True if fixed else res < best_res)
        if improved.all():  # the common case costs no copy
            best_z, best_fz = z, fz
        elif improved.any():
            rows = _rows(device_mask(improved), z)
            best_z = torch.where(rows, z, best_z)
            best_fz = torch.where(rows, fz, best_fz)
        best_res = np.where(improved, res, best_res)

        if diverged_above is None and divergence is not None:  # from the first residual
            diverged_above = divergence * np.maximum(np.where(np.isfinite(diff), diff, 0.0), np.finfo(np.float64).tiny)
        new_status = np.full(batch, _RUNNING) if fixed else np.where(res <= tol, _SUCCESS, _RUNNING)
        if divergence is not None:  # judged on the absolute residual in either stop_mode
            new_status = np.where(diff > diverged_above, _DIVERGED, new_status)
        new_status = np.where(finite, new_status, _NONFINITE)
        status = np.where(active, new_status, status)
        if kept.maxlen:
            kept.append((z, fz))

        bad = active & (status >= _DIVERGED)
        now_active = status == _RUNNING
        changed = not np.array_equal(now_active, active)
        active = now_active
        if changed:
            problem.active = device_mask(active)
        if not active.any() or it == max_steps:
            break
        if bad.any():  # a failed sample rests at its best iterate, so it cannot spread NaN
            rows = _rows(device_mask(bad), z)
            z = torch.where(rows, best_z, z)
            fz = torch.where(rows, best_fz, fz)

        z_next, state = solver.step(z, fz, state, problem)
        if z_next.shape != z.shape or z_next.dtype != z.dtype:
            raise RuntimeError(
                f"solver {solver!r} returned an iterate of shape {tuple(z_next.shape)} and dtype "
                f"{z_next.dtype}; expected {tuple(z.shape)} and {z.dtype}"
            )
        z = z_next if active.all() else torch.where(_rows(problem.active, z), z_next, z)
        fz = problem.evaluate(z, fz)

    status = np.where(status == _RUNNING, _SUCCESS if fixed else _MAX_STEPS, status)
    final = np.where(np.isfinite(best_res), best_res, res)
    return LoopOutput(
        best_z=best_z,
        best_fz=best_fz,
        residual=torch.from_numpy(final).to(device=device, dtype=res_dtype),
        status=torch.from_numpy(status).to(device),
        steps=torch.from_numpy(steps).to(device),
        trace=torch.from_numpy(np.stack(trace, axis=1)).to(device=device, dtype=res_dtype),
        trajectory=tuple(kept),
        nfev=problem.nfev,
        sample_evals=problem.sample_evals,
    )


def run_solver(solver: Any, problem: Problem, z0: Tensor, options: SolveOptions) -> LoopOutput:
    """Run ``solver``'s loop: its own ``run(problem, z0, options)`` hook if it has one (a solver
    with its own loop, such as ``TorchDEQSolver``), else the shared loop above."""
    run = getattr(solver, "run", None)
    return run(problem, z0, options) if callable(run) else iterate(solver, problem, z0, options)
