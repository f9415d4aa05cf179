"""The per-sample ledger of one forward loop: status, steps, best iterates, trace, trajectory.

The records live in small host-side numpy arrays: one device-to-host copy of the residual
norms per test of convergence (the stopping decision needs them anyway) replaces a few dozen
tiny tensor operations, and nothing else here waits for the device. Each concern is one method:

* ``judge``: a test of convergence: each running sample's status, its best iterate, the trace.
* ``keep``: the trajectory (the last iterates, for deep supervision).
* ``settle``: after a test, failed samples rest at their best iterate, and stopped samples
  leave the working set (compaction).
* ``finish``: the whole-batch record, ``LoopOutput``.

With ``active_set=True`` and a solver that can select rows of its state, the working tensors
(iterates, best iterates, the solver's state) are compacted to the samples still iterating once
at most ``COMPACT_AT`` of them are; the arrays then cover the working rows, and the whole-batch
records hold the rest.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Optional, cast

import numpy as np
import torch
from torch import Tensor

from ._context import host_side
from ._options import SolveOptions
from ._problem import Problem, to_device
from ._result import Result

RUNNING = -1
SUCCESS, MAX_STEPS, ESCAPED, DIVERGED, NONFINITE = (int(r) for r in Result)
# escape: an absolute residual above this fraction of its largest value so far has "not fallen"
NOT_FALLEN = 0.5

# Compaction copies the working rows, so it is done O(log B) times, not once per stop: when at
# most this fraction of the working rows is still iterating.
COMPACT_AT = 0.75


@host_side
@dataclasses.dataclass
class Reference:
    """What each sample's later tests are judged against, from its first test: ``||f(z)||``
    then (escape), the largest ``||f(z) - z||`` so far (escape) and the DIVERGED threshold. Host
    arrays over the batch; a solve that continues another (``Fallback``) goes on with them."""

    first_size: np.ndarray
    peak: np.ndarray
    diverged_above: Optional[np.ndarray]

    @classmethod
    def first(cls, diff: np.ndarray, size: np.ndarray, divergence: Optional[float]) -> "Reference":
        finite = np.where(np.isfinite(diff), diff, 0.0)
        above = None if divergence is None else divergence * np.maximum(finite, np.finfo(np.float64).tiny)
        return cls(size, finite.copy(), above)

    def rows(self, index: np.ndarray) -> "Reference":
        above = None if self.diverged_above is None else self.diverged_above[index]
        return Reference(self.first_size[index], self.peak[index], above)

    def write(self, index: Optional[np.ndarray], into: "Reference") -> None:
        """Put these rows (positions ``index`` of ``into``, or all of it) into ``into``."""
        where = slice(None) if index is None else index
        into.first_size[where], into.peak[where] = self.first_size, self.peak
        if into.diverged_above is not None and self.diverged_above is not None:
            into.diverged_above[where] = self.diverged_above


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
    finished_by: Optional[Tensor] = None  # (B,) which solver of a chain gave each answer (None: one solver)
    nfev_by_solver: tuple[int, ...] = ()  # calls of f by each solver of a chain (empty: one solver)
    reference: Optional[Reference] = None  # the loop's per-sample references, for a solve that continues it


@host_side
def _rows(mask: Tensor, like: Tensor) -> Tensor:
    """Broadcast a (B,) mask against a (B, ...) tensor."""
    return mask.reshape((-1,) + (1,) * (like.dim() - 1))


@host_side
def where_rows(mask: np.ndarray, a: Tensor, b: Tensor) -> Tensor:
    """Per sample: ``a``'s row where the host ``mask`` is set, else ``b``'s."""
    return torch.where(_rows(to_device(mask, a.device), a), a, b)


@host_side
class Ledger:
    """Per-sample records of one forward loop (see the module's docstring)."""

    def __init__(self, problem: Problem, options: SolveOptions, z: Tensor, fz: Tensor, compactable: bool,
                 reference: Optional[Reference] = None):
        batch = z.shape[0]
        self.problem, self.options = problem, options
        self.fixed = options.fixed_steps
        self.res_dtype = torch.promote_types(z.dtype, torch.float32)
        self.compactable = compactable
        self.status = np.full(batch, RUNNING, dtype=np.int64)
        self.steps = np.zeros(batch, dtype=np.int64)
        self.best_res = np.full(batch, np.inf)
        self.res = np.full(batch, np.inf)
        self.active = np.ones(batch, dtype=bool)
        self.everyone = True  # every working row is still iterating
        self.untouched = True  # no sample has stopped yet
        self.ref = None if reference is None else reference.rows(np.arange(batch))  # a copy: the loop updates it
        self.eps = float(torch.finfo(z.dtype).eps)
        self.newly_failed: Optional[np.ndarray] = None
        self.best_z, self.best_fz = z, fz
        self.trace: list[np.ndarray] = []
        self.kept: collections.deque[tuple[Tensor, Tensor]] = collections.deque(maxlen=options.trajectory)
        # after a compaction: the working rows' global indices, the whole-batch records of the
        # rows compacted away, and whole-batch tensors to spread working rows over
        self.work: Optional[np.ndarray] = None
        self.whole: dict[str, np.ndarray] = {}
        self.whole_ref: Optional[Reference] = None
        self.out: Optional[tuple[Tensor, Tensor]] = None  # whole-batch best iterates
        self.frozen: Optional[tuple[Tensor, Tensor]] = None  # whole-batch iterates, for the trajectory

    # -- per iteration ----------------------------------------------------------------------
    def count_step(self) -> None:
        if self.untouched:
            self.steps += 1
        else:
            self.steps += self.active

    def keep(self, z: Tensor, fz: Tensor) -> None:
        """Keep ``(z, f(z))`` for the trajectory, spread over the whole batch."""
        if self.kept.maxlen:
            self.kept.append(self._spread(z, fz, self.frozen))

    def judge(self, z: Tensor, fz: Tensor, diff: np.ndarray, size: np.ndarray) -> bool:
        """A test of convergence from the host norms ``||f(z) - z||`` and ``||f(z)||``: update
        each active sample's status, best iterate and trace. True when no sample is running."""
        options = self.options
        res = diff if options.stop_mode == "abs" else diff / (size + 1e-9)
        self.res = res
        if self.ref is None:  # the first residual: divergence and escape are judged against it
            self.ref = Reference.first(diff, size, options.divergence)
        ref = self.ref
        # running: finite, not converged, not diverged (NaN compares False throughout)
        np.fmax(ref.peak, diff, out=ref.peak)
        running = np.isfinite(res) if options.tol is None else res > options.tol
        if ref.diverged_above is not None:
            running &= diff <= ref.diverged_above
        if self.work is None and self.untouched and running.all():  # every sample was and stays running
            self.trace.append(res)
            self._improve(running if self.fixed else res < self.best_res, z, fz, res)
            self.keep(z, fz)
            self.newly_failed = None
            return False
        finite = np.isfinite(res)
        self._record_trace(np.where(self.active, res, self.best_res))  # stopped samples keep their best
        # with a fixed number of steps the last finite iterate is kept, else the lowest residual
        self._improve(self.active & finite & (True if self.fixed else res < self.best_res), z, fz, res)
        status = np.where(running, RUNNING, np.where(finite, SUCCESS, NONFINITE))
        if ref.diverged_above is not None:  # judged on the absolute residual in either stop_mode
            status = np.where(finite & ~running & (diff > ref.diverged_above), DIVERGED, status)
        if options.escape is not None and options.stop_mode == "rel" and not self.fixed:
            status = np.where((status == SUCCESS) & self._escaped(diff, size), ESCAPED, status)
        self.status = np.where(self.active, status, self.status)
        self.keep(z, fz)
        self.newly_failed = self.active & (self.status >= ESCAPED)
        return not (self.status == RUNNING).any()

    def settle(self, z: Tensor, fz: Tensor, state: Any, solver: Any) -> tuple[Tensor, Tensor, Any]:
        """After a test: failed samples rest at their best iterate (so they cannot spread NaN);
        stopped samples leave the working set, by compaction or by the active mask."""
        failed = self.newly_failed
        if failed is not None and failed.any():
            z = where_rows(failed, self.best_z, z)
            fz = where_rows(failed, self.best_fz, fz)
        running = self.status == RUNNING
        if self.untouched and running.all() or np.array_equal(running, self.active):
            return z, fz, state
        self.active, self.untouched = running, False
        if self.compactable and running.sum() <= COMPACT_AT * running.size:
            return self._compact(z, fz, state, solver)
        self.everyone = False
        self.problem.set_active(running)
        return z, fz, state

    def merge(self, z: Tensor, z_next: Tensor) -> Tensor:
        """The next iterate for the samples still iterating; the others keep theirs."""
        return z_next if self.everyone else torch.where(_rows(self.problem.active, z), z_next, z)

    # -- the end ----------------------------------------------------------------------------
    def finish(self) -> LoopOutput:
        problem, device = self.problem, self.best_z.device
        self.status = np.where(self.status == RUNNING, SUCCESS if self.fixed else MAX_STEPS, self.status)
        self._to_whole()
        best_z, best_fz = self._spread(self.best_z, self.best_fz, self.out)
        return LoopOutput(
            best_z=best_z,
            best_fz=best_fz,
            residual=torch.from_numpy(self.whole["final"]).to(device=device, dtype=self.res_dtype),
            status=torch.from_numpy(self.whole["status"]).to(device),
            steps=torch.from_numpy(self.whole["steps"]).to(device),
            trace=torch.from_numpy(np.stack(self.trace, axis=1)).to(device=device, dtype=self.res_dtype),
            trajectory=tuple(self.kept),
            nfev=problem.nfev,
            sample_evals=problem.sample_evals,
            reference=self.whole_ref,
        )

    # -- helpers ----------------------------------------------------------------------------
    def _improve(self, improved: np.ndarray, z: Tensor, fz: Tensor, res: np.ndarray) -> None:
        """Each sample's best iterate: the current one where ``improved``, else the one before."""
        if improved.all():
            self.best_z, self.best_fz, self.best_res = z, fz, res
        elif improved.any():
            self.best_z = where_rows(improved, z, self.best_z)
            self.best_fz = where_rows(improved, fz, self.best_fz)
            self.best_res = np.where(improved, res, self.best_res)

    def _escaped(self, diff: np.ndarray, size: np.ndarray) -> np.ndarray:
        """Samples whose ``||f(z)||`` grew past ``escape`` times its first value while the
        absolute residual stayed above ``NOT_FALLEN`` of its largest value so far (the largest,
        not the first: a map that first amplifies a small start, then converges, has fallen from
        its peak). A residual below the round-off of ``||f(z)||`` (``eps ||f(z)||``) is not a
        fall: far out, ``f(z) - z`` can round to 0 for a map that only drifts."""
        assert self.ref is not None and self.options.escape is not None
        grown = size >= self.options.escape * np.maximum(self.ref.first_size, np.finfo(np.float64).tiny)
        not_fallen = np.maximum(diff, self.eps * size) >= NOT_FALLEN * self.ref.peak
        return cast(np.ndarray, grown & not_fallen)

    def _record_trace(self, entry: np.ndarray) -> None:
        if self.work is not None:  # rows compacted away keep their last entry
            spread = self.trace[-1].copy()
            spread[self.work] = entry
            entry = spread
        self.trace.append(entry)

    def _spread(self, z: Tensor, fz: Tensor, base: Optional[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        """Working tensors spread over the whole batch, rows outside the working set from ``base``."""
        rows = self.problem.work_rows
        if rows is None or base is None:
            return z, fz
        return base[0].index_copy(0, rows, z), base[1].index_copy(0, rows, fz)

    def _to_whole(self) -> None:
        """Write the working rows' records into the whole-batch ones."""
        final = np.where(np.isfinite(self.best_res), self.best_res, self.res)
        records = {"status": self.status, "steps": self.steps, "best_res": self.best_res, "final": final}
        if self.work is None:
            self.whole.update((key, value.copy()) for key, value in records.items())
            self.whole_ref = None if self.ref is None else self.ref.rows(np.arange(self.status.size))
        else:
            for key, value in records.items():
                self.whole[key][self.work] = value
            if self.ref is not None and self.whole_ref is not None:
                self.ref.write(self.work, self.whole_ref)

    def _compact(self, z: Tensor, fz: Tensor, state: Any, solver: Any) -> tuple[Tensor, Tensor, Any]:
        """Record the working rows over the whole batch, then keep only those still iterating."""
        if self.kept.maxlen:
            self.frozen = self._spread(z, fz, self.frozen)
        self.out = self._spread(self.best_z, self.best_fz, self.out)
        self._to_whole()
        keep = np.flatnonzero(self.active)
        local = self.problem.compact(keep)
        z, fz, self.best_z, self.best_fz = (t.index_select(0, local) for t in (z, fz, self.best_z, self.best_fz))
        state = solver.select(state, local)
        for name in ("status", "steps", "best_res", "res", "active"):
            setattr(self, name, getattr(self, name)[keep])
        if self.ref is not None:
            self.ref = self.ref.rows(keep)
        self.work = keep if self.work is None else self.work[keep]
        self.everyone = True
        return z, fz, state
