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


def to_device(array: np.ndarray, device: torch.device) -> Tensor:
    """A host array as a tensor on ``device``: shared memory on the CPU, an asynchronous copy
    from pinned memory on CUDA (so it is not a host synchronisation)."""
    t = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cpu":
        return t
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


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
        self._work: Tensor | None = None  # the working rows (global indices), None for the whole batch
        self._work_inputs = self._inputs  # inputs restricted to the working rows
        self._active = torch.ones(self._batch, dtype=torch.bool, device=z0.device)
        self._idx: Tensor | None = None  # positions (in the working rows) still iterating, None when all are
        self.nfev = 0
        self.sample_evals = 0
        self._no_forward_ad = False
        self._residual: tuple[Tensor, Tensor, Tensor, Tensor] | None = None

    @property
    def active(self) -> Tensor:
        """BoolTensor over the rows a step sees: the samples still iterating."""
        return self._active

    @active.setter
    def active(self, mask: Tensor) -> None:
        self._active = mask
        idx = torch.nonzero(mask).flatten()
        self._idx = None if idx.numel() == mask.shape[0] else idx

    def set_active(self, mask: np.ndarray) -> None:
        """The loop's form of the setter: a host mask over the working rows (no device sync)."""
        self._active = to_device(mask, self._device)
        self._idx = None if mask.all() else to_device(np.flatnonzero(mask), self._device)

    def compact(self, keep: np.ndarray) -> Tensor:
        """Shrink the working rows to positions ``keep`` of the current ones; returns them as a
        device index for the loop to select its own tensors and the solver's state with."""
        local = to_device(keep, self._device)
        self._work = local if self._work is None else self._work.index_select(0, local)
        self._work_inputs = tuple(x.index_select(0, local) if isinstance(x, Tensor) else x for x in self._work_inputs)
        self._active = torch.ones(keep.size, dtype=torch.bool, device=self._device)
        self._idx = None
        return local

    def remember_residual(self, z: Tensor, fz: Tensor, diff: Tensor, norm: Tensor) -> None:
        self._residual = (z, fz, diff, norm)

    def residual(self, z: Tensor, fz: Tensor) -> tuple[Tensor, Tensor]:
        """``(f(z) - z, ||f(z) - z||)`` per sample, flattened to (B, d) and (B,), in float32 or
        better. The loop has usually just computed both for its test of convergence, and then
        they are reused (no graph); otherwise they are computed here."""
        dt = torch.promote_types(z.dtype, torch.float32)
        b = z.shape[0]
        last = self._residual
        if last is not None and last[2].dtype == dt and not torch.is_grad_enabled():
            lz, lfz, diff, norm = last
            if lz is z and lfz is fz:
                return diff.reshape(b, -1), norm
        g = fz.reshape(b, -1).to(dt) - z.reshape(b, -1).to(dt)
        return g, torch.linalg.vector_norm(g, dim=1)

    @property
    def work_rows(self) -> Tensor | None:
        """Rows of the original batch the working tensors hold (None: all, in order)."""
        return self._work

    # -- evaluation -------------------------------------------------------------------------
    def _call(self, z: Tensor, inputs: tuple[Any, ...]) -> Tensor:
        # the in-place check reads version counters, which torch.compile cannot trace (a graph
        # break per call of f), so under torch.compile an in-place f is not detected
        watch = not torch.compiler.is_compiling()
        before = _versions((z, *inputs)) if watch else ()
        if self._grad_first:  # fills the solve's cache of normalised weights with their graph
            self._grad_first = False
            with torch.enable_grad():
                out = self._call_f(z, *inputs)
            out = out.detach() if isinstance(out, Tensor) else out
        else:
            out = self._call_f(z, *inputs)
        after = _versions((z, *inputs)) if watch else ()
        if after != before:
            changed = [name for name, a, b in zip(["z"] + [f"inputs[{i}]" for i in range(len(inputs))], before, after) if a != b]
            raise ValueError(
                f"f changed its argument(s) {changed} in place (e.g. z.mul_(...)); the solver keeps and "
                "reuses its iterates, so f must compute its result out of place (z * 0.5, not z.mul_(0.5))"
            )
        if not isinstance(out, Tensor):
            raise TypeError(f"f must return a Tensor, got {type(out).__name__}")
        if out.shape != z.shape or out.dtype != self._dtype or out.device != self._device:
            return self._check(out, z)
        return out

    def _check(self, out: Tensor, z: Tensor) -> Tensor:
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
        return out

    def f(self, z: Tensor) -> Tensor:
        """One counted call of the map on the working rows (the whole batch unless the active
        set has compacted it)."""
        self.nfev += 1
        self.sample_evals += z.shape[0]
        if self._work is None:
            return self._call(z, self._inputs)
        return self._call_rows(z, self._work_inputs, self._work)

    def evaluate(self, z: Tensor, previous: Tensor | None) -> Tensor:
        """f(z) for the active samples; stopped samples keep ``previous`` (active set only)."""
        idx = self._idx
        if not self.active_set or previous is None or idx is None:
            return self.f(z)
        inputs = tuple(x.index_select(0, idx) if isinstance(x, Tensor) else x for x in self._work_inputs)
        rows = idx if self._work is None else self._work.index_select(0, idx)
        self.nfev += 1
        self.sample_evals += idx.numel()
        return previous.index_copy(0, idx, self._call_rows(z.index_select(0, idx), inputs, rows))

    def _call_rows(self, z: Tensor, inputs: tuple[Any, ...], rows: Tensor) -> Tensor:
        """f on some rows of the batch (active set): the rows are visible to f through
        ``deqkit``'s context, and f's exceptions say where they happened."""
        with rows_scope(rows):
            try:
                return self._call(z, inputs)
            except Exception as err:  # f's own exception, type unchanged, with where it happened
                if hasattr(err, "add_note"):
                    err.add_note(
                        f"deqkit: raised by f called on {rows.numel()} of {self._batch} samples (active_set=True); "
                        "f must treat samples independently, with per-sample inputs passed through inputs=."
                    )
                raise

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
            inputs = self._work_inputs
            try:
                with warnings.catch_warnings():  # torch's own first-use notice in forward AD
                    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=DeprecationWarning)
                    with rows_scope(self._work):
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


# With the active set, the working tensors (iterates, best iterates, the solver's state) are
# compacted to the samples still iterating once at most this fraction of them is: each
# compaction copies the working rows, so it is done O(log B) times, not once per stop.
COMPACT_AT = 0.75


def iterate(solver: Any, problem: Problem, z0: Tensor, options: SolveOptions) -> LoopOutput:
    """Run ``solver`` from ``z0`` until every sample has stopped or ``max_steps`` have run.

    Per-sample bookkeeping (status, steps, best residual, trace) lives in small host-side
    numpy arrays: one device-to-host copy of the residual norms per test of convergence (every
    ``check_every`` iterations; the stopping decision needs them anyway) replaces a few dozen
    tiny tensor operations, and nothing else in the loop waits for the device.

    With ``active_set=True`` stopped samples are not evaluated; when the solver can restrict its
    state to a subset of the batch (a ``select(state, rows)`` method, which deqkit's solvers
    have), the working tensors are compacted to the samples still iterating, so the solver's
    steps shrink with them.
    """
    tol, stop_mode, max_steps, divergence = options.tol, options.stop_mode, options.max_steps, options.divergence
    fixed, every = options.fixed_steps, options.check_every
    batch = z0.shape[0]
    device = z0.device
    res_dtype = torch.promote_types(z0.dtype, torch.float32)
    compactable = problem.active_set and callable(getattr(solver, "select", None))
    z = z0
    fz = problem.evaluate(z, None)
    state = solver.init(z, fz, problem)

    # Host records. Until a compaction the working rows are the whole batch; after one, the
    # arrays below cover the working rows only and the whole-batch ones hold the rest.
    status = np.full(batch, _RUNNING, dtype=np.int64)
    steps = np.zeros(batch, dtype=np.int64)
    best_res = np.full(batch, np.inf)
    res = np.full(batch, np.inf)
    active = np.ones(batch, dtype=bool)
    all_active = True  # no sample has stopped yet
    diverged_above: np.ndarray | None = None
    work: np.ndarray | None = None  # global index of each working row; None: all, in order
    whole: dict[str, np.ndarray] = {}  # whole-batch status, steps, best_res, final
    best_z, best_fz = z, fz
    out_z: Tensor | None = None  # whole-batch best iterates, once a compaction has happened
    out_fz: Tensor | None = None
    frozen: tuple[Tensor, Tensor] | None = None  # whole-batch iterates for the trajectory
    trace: list[np.ndarray] = []
    kept: collections.deque[tuple[Tensor, Tensor]] = collections.deque(maxlen=options.trajectory)

    def to_whole() -> None:
        """Write the working rows' records into the whole-batch ones."""
        final = np.where(np.isfinite(best_res), best_res, res)
        if work is None:
            whole.update(status=status.copy(), steps=steps.copy(), best_res=best_res.copy(), final=final)
        else:
            for key, value in (("status", status), ("steps", steps), ("best_res", best_res), ("final", final)):
                whole[key][work] = value

    def full(t: Tensor, base: Tensor) -> Tensor:
        """A working tensor spread over the whole batch, rows outside it taken from ``base``."""
        rows = problem.work_rows
        return t if rows is None else base.index_copy(0, rows, t)

    for it in range(1, max_steps + 1):
        if all_active:
            steps += 1
        else:
            steps += active
        if it % every and it < max_steps:  # not a test of convergence: iterate on
            if kept.maxlen:
                kept.append((z, fz) if frozen is None else (full(z, frozen[0]), full(fz, frozen[1])))
            z_next, state = solver.step(z, fz, state, problem)
            _check_step(solver, z_next, z)
            z = z_next if active.all() else torch.where(_rows(problem.active, z), z_next, z)
            fz = problem.evaluate(z, fz)
            continue

        # one device-to-host copy: absolute residual and size of f(z), per sample
        diff, size = _norms(problem, z, fz, res_dtype)
        if not np.isfinite(diff + size).all():  # overflow, or a NaN/Inf in f(z)
            diff, size = torch.stack([scaled_norm(fz - z), scaled_norm(fz)]).cpu().numpy().astype(np.float64)
        res = diff if stop_mode == "abs" else diff / (size + 1e-9)
        if diverged_above is None and divergence is not None:  # from the first residual
            diverged_above = divergence * np.maximum(np.where(np.isfinite(diff), diff, 0.0), np.finfo(np.float64).tiny)

        # running: finite, not converged, not diverged (NaN compares False throughout)
        running = np.isfinite(res) if tol is None else res > tol
        if diverged_above is not None:
            running &= diff <= diverged_above
        if work is None and all_active and running.all():  # fast path: every sample was and stays running
            trace.append(res)
            improved = running if fixed else res < best_res
            if improved.all():
                best_z, best_fz, best_res = z, fz, res
            else:
                best_z, best_fz, best_res = _keep_best(improved, z, fz, best_z, best_fz, res, best_res)
            if kept.maxlen:
                kept.append((z, fz))
            if it == max_steps:
                break
        else:
            finite = np.isfinite(res)
            entry = np.where(active, res, best_res)  # stopped samples keep their best value
            if work is not None:  # rows compacted away keep their last entry
                spread = trace[-1].copy()
                spread[work] = entry
                entry = spread
            trace.append(entry)
            # with a fixed number of steps the last finite iterate is kept, else the lowest residual
            improved = active & finite & (True if fixed else res < best_res)
            if improved.all():
                best_z, best_fz, best_res = z, fz, res
            elif improved.any():
                best_z, best_fz, best_res = _keep_best(improved, z, fz, best_z, best_fz, res, best_res)
            new_status = np.where(running, _RUNNING, np.where(finite, _SUCCESS, _NONFINITE))
            if diverged_above is not None:  # judged on the absolute residual in either stop_mode
                new_status = np.where(finite & ~running & (diff > diverged_above), _DIVERGED, new_status)
            status = np.where(active, new_status, status)
            if kept.maxlen:
                kept.append((z, fz) if frozen is None else (full(z, frozen[0]), full(fz, frozen[1])))

            bad = active & (status >= _DIVERGED)
            now_active = status == _RUNNING
            if not now_active.any() or it == max_steps:
                break
            if bad.any():  # a failed sample rests at its best iterate, so it cannot spread NaN
                rows = _rows(to_device(bad, device), z)
                z = torch.where(rows, best_z, z)
                fz = torch.where(rows, best_fz, fz)
            if not np.array_equal(now_active, active):
                active, all_active = now_active, False
                if compactable and active.sum() <= COMPACT_AT * active.size:
                    # compact: record the working rows, then keep only those still iterating
                    if kept.maxlen:
                        frozen = (z, fz) if frozen is None else (full(z, frozen[0]), full(fz, frozen[1]))
                    out_z = best_z if out_z is None else full(best_z, out_z)
                    out_fz = best_fz if out_fz is None else full(best_fz, out_fz)
                    to_whole()
                    keep = np.flatnonzero(active)
                    local = problem.compact(keep)
                    z, fz, best_z, best_fz = (t.index_select(0, local) for t in (z, fz, best_z, best_fz))
                    state = solver.select(state, local)
                    status, steps, best_res, res, active = status[keep], steps[keep], best_res[keep], res[keep], active[keep]
                    if diverged_above is not None:
                        diverged_above = diverged_above[keep]
                    work = keep if work is None else work[keep]
                else:
                    problem.set_active(active)

        z_next, state = solver.step(z, fz, state, problem)
        _check_step(solver, z_next, z)
        z = z_next if active.all() else torch.where(_rows(problem.active, z), z_next, z)
        fz = problem.evaluate(z, fz)

    status = np.where(status == _RUNNING, _SUCCESS if fixed else _MAX_STEPS, status)
    to_whole()
    if out_z is not None and out_fz is not None:
        best_z, best_fz = full(best_z, out_z), full(best_fz, out_fz)
    return LoopOutput(
        best_z=best_z,
        best_fz=best_fz,
        residual=torch.from_numpy(whole["final"]).to(device=device, dtype=res_dtype),
        status=torch.from_numpy(whole["status"]).to(device),
        steps=torch.from_numpy(whole["steps"]).to(device),
        trace=torch.from_numpy(np.stack(trace, axis=1)).to(device=device, dtype=res_dtype),
        trajectory=tuple(kept),
        nfev=problem.nfev,
        sample_evals=problem.sample_evals,
    )


def _norms(problem: Problem, z: Tensor, fz: Tensor, dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample ``||f(z) - z||`` and ``||f(z)||`` on the host, in float64: the loop's one wait
    for the device per test of convergence. The residual and its norms are left with the
    problem for the solver's next step (``Problem.residual``). No graph."""
    if torch.is_grad_enabled():
        z, fz = z.detach(), fz.detach()
    diff = fz - z
    pair = torch.stack([_flat_norm(diff, dtype), _flat_norm(fz, dtype)])
    problem.remember_residual(z, fz, diff, pair[0])
    host = pair.cpu().numpy()
    return host[0].astype(np.float64), host[1].astype(np.float64)


def _keep_best(improved: np.ndarray, z: Tensor, fz: Tensor, best_z: Tensor, best_fz: Tensor, res: np.ndarray,
               best_res: np.ndarray) -> tuple[Tensor, Tensor, np.ndarray]:
    """Each sample's best iterate: the current one where ``improved``, else the one before."""
    rows = _rows(to_device(improved, z.device), z)
    return torch.where(rows, z, best_z), torch.where(rows, fz, best_fz), np.where(improved, res, best_res)


def _check_step(solver: Any, z_next: Tensor, z: Tensor) -> None:
    if z_next.shape != z.shape or z_next.dtype != z.dtype:
        raise RuntimeError(
            f"solver {solver!r} returned an iterate of shape {tuple(z_next.shape)} and dtype "
            f"{z_next.dtype}; expected {tuple(z.shape)} and {z.dtype}"
        )


def run_solver(solver: Any, problem: Problem, z0: Tensor, options: SolveOptions) -> LoopOutput:
    """Run ``solver``'s loop: its own ``run(problem, z0, options)`` hook if it has one (a solver
    with its own loop, such as ``TorchDEQSolver``), else the shared loop above."""
    run = getattr(solver, "run", None)
    return run(problem, z0, options) if callable(run) else iterate(solver, problem, z0, options)
