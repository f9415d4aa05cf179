"""Typed results of a fixed-point solve: the Result code, the Stats record, the Solution."""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Optional

import torch
from torch import Tensor


class Result(enum.IntEnum):
    """How a solve ended. Per sample in ``Stats.status``; the worst one in ``Solution.result``.

    The order is the severity: ``Solution.result`` is the largest code over the batch. Compare
    with the members, not with their numbers (ESCAPED took the place of 2 in deqkit 0.2).
    """

    SUCCESS = 0
    """The residual fell to ``tol`` or below."""
    MAX_STEPS = 1
    """``max_steps`` iterations ran without reaching ``tol``; the best iterate is returned."""
    ESCAPED = 2
    """The relative residual met ``tol`` only because ``||f(z)||`` grew: the absolute residual
    did not fall while the iterate ran away (``escape``). The map has no fixed point within
    reach; the iterate where the test passed is returned."""
    DIVERGED = 3
    """The absolute residual grew past ``divergence`` times its first value; iteration stopped."""
    NONFINITE = 4
    """``f`` returned NaN or Inf; the best finite iterate is returned."""

    @property
    def message(self) -> str:
        return _MESSAGES[self]

    def __str__(self) -> str:  # the name, not the number (IntEnum prints its value since 3.11)
        return self.name

    def __format__(self, spec: str) -> str:
        return format(self.name, spec) if not spec or spec[-1] not in "bcdoxXn" else format(int(self), spec)


_MESSAGES = {
    Result.SUCCESS: "the residual reached the tolerance",
    Result.MAX_STEPS: "max_steps was reached before the residual fell to the tolerance",
    Result.ESCAPED: (
        "the relative residual met the tolerance only because ||f(z)|| grew while ||f(z) - z|| did not fall: "
        "the iterate ran away and the map has no fixed point within reach (bound the map, e.g. end it with a "
        "normalisation, or use stop_mode='abs')"
    ),
    Result.DIVERGED: "the absolute residual ||f(z) - z|| grew past `divergence` times its first value",
    Result.NONFINITE: "f returned a non-finite value (NaN or Inf)",
}


class SolveError(RuntimeError):
    """Raised by a solve with ``throw=True`` that did not succeed. ``.solution`` holds the result."""

    def __init__(self, message: str, solution: "Solution"):
        super().__init__(message)
        self.solution = solution

    def __reduce__(self) -> tuple[Any, ...]:  # pickling (process pools, DataLoader workers) keeps both
        return (type(self), (str(self), self.solution), self.__dict__)


@dataclasses.dataclass(frozen=True)
class BackwardStats:
    """What the backward pass of an implicit solve did (filled in when it has run)."""

    nfev: int
    """Vector-Jacobian products computed by the adjoint solve."""
    steps: Tensor
    """LongTensor[B]: adjoint iterations each sample used."""
    residual: Tensor
    """Tensor[B]: final adjoint residual per sample."""
    result: Result
    """The worst per-sample code of the adjoint solve."""


class BackwardLog(list["BackwardStats"]):
    """The record of the backward passes through one solve: a list of ``BackwardStats``.

    ``Stats`` is built once, when the forward solve ends, and never changes; its ``backward``
    field is this log, the one part that grows later: each implicit backward pass (an adjoint
    solve) appends its ``BackwardStats`` when autograd runs it. Empty until then, and for the
    backward modes that solve nothing (``Phantom``, ``Unrolled``, ``OneStep``).
    """

    def __repr__(self) -> str:
        return f"BackwardLog({list.__repr__(self)})"


@dataclasses.dataclass(frozen=True)
class Stats:
    """The record of one forward solve. Batch dimension first; tensors are detached."""

    nfev: int
    """Calls of ``f`` (a batched call counts once; a Jacobian-vector product counts once)."""
    steps: Tensor
    """LongTensor[B]: iterations (evaluations of ``f``) each sample took part in."""
    residual: Tensor
    """Tensor[B]: the residual of the returned iterate, in ``stop_mode``."""
    converged: Tensor
    """BoolTensor[B]: the sample ended with SUCCESS, its residual at most ``tol``. All False
    with ``tol=None`` (a fixed number of iterations tests nothing)."""
    status: Tensor
    """LongTensor[B]: each sample's ``Result`` code."""
    trace: Tensor
    """Tensor[B, T]: residual at each test of convergence (every iteration by default; with
    ``check_every=k`` every k-th and the last); after a sample stops, its best residual."""
    stop_mode: str
    """"rel" or "abs": the norm ``residual`` and ``trace`` are in."""
    tol: Optional[float]
    """The tolerance; None for a fixed number of iterations (``tol=None``)."""
    sample_evals: int
    """Rows of the batch passed through ``f`` in all (with ``active_set`` this is what shrinks)."""
    backward: BackwardLog = dataclasses.field(default_factory=BackwardLog, compare=False)
    """``BackwardStats`` of each implicit backward pass through this solve (see ``BackwardLog``)."""
    finished_by: Optional[Tensor] = None
    """LongTensor[B]: which solver of a ``Fallback`` chain (its index; 0 is the first) gave each
    sample its answer; all zeros for a single solver."""
    nfev_by_solver: tuple[int, ...] = ()
    """Calls of ``f`` by each solver of a ``Fallback`` chain in the forward loop (one entry for
    a single solver); ``nfev`` adds the backward mode's calls after the loop."""

    @property
    def escaped(self) -> Tensor:
        """BoolTensor[B]: the samples that ended ESCAPED (see ``Result.ESCAPED``)."""
        return self.status == Result.ESCAPED

    @property
    def batch_size(self) -> int:
        """The number of samples in the batch."""
        return int(self.steps.shape[0])

    def __repr__(self) -> str:  # a summary; the tensors are one attribute away
        res = self.residual
        return (
            f"Stats(batch_size={self.batch_size}, nfev={self.nfev}, steps={int(self.steps.min())}..{int(self.steps.max())}, "
            f"residual={float(res.min()):.3g}..{float(res.max()):.3g} ({self.stop_mode}, tol={self.tol}), "
            f"converged={int(self.converged.sum())}/{self.batch_size}, sample_evals={self.sample_evals}, "
            f"backward_passes={len(self.backward)}"
            + (f", nfev_by_solver={self.nfev_by_solver})" if len(self.nfev_by_solver) > 1 else ")")
        )


@dataclasses.dataclass(frozen=True)
class Solution:
    """The result of :func:`deqkit.fixed_point`: the same type in training and evaluation."""

    value: Tensor
    """The fixed point estimate, same shape as ``z0``: ``f(z_k)`` for each sample's best ``z_k``."""
    result: Result
    """The worst per-sample code of the batch."""
    stats: Stats
    trajectory: tuple[Tensor, ...] = ()
    """The last ``trajectory`` images ``f(z_k)``, oldest first, with gradients when asked for."""

    @property
    def success(self) -> bool:
        """True when every sample ended with SUCCESS."""
        return self.result == Result.SUCCESS

    def __repr__(self) -> str:  # a short, readable summary instead of dumping tensors
        s = self.stats
        return (
            f"Solution(result={self.result.name}, shape={tuple(self.value.shape)}, "
            f"nfev={s.nfev}, max_residual={float(s.residual.max()):.3g} ({s.stop_mode}), "
            f"converged={int(s.converged.sum())}/{s.batch_size})"
        )


def worst(status: Tensor) -> Result:
    return Result(int(status.max())) if status.numel() else Result.SUCCESS


def describe_failure(status: Tensor, residual: Tensor, tol: Optional[float], stop_mode: str) -> str:
    """A readable sentence naming the failed samples and the reason."""
    code = worst(status)
    bad = torch.nonzero(status == code).flatten().tolist()
    shown = ", ".join(map(str, bad[:8])) + (", ..." if len(bad) > 8 else "")
    return (
        f"fixed-point solve ended with {code.name}: {code.message} "
        f"(samples [{shown}] of {status.numel()}; max residual {float(residual.max()):.3g} "
        f"in stop_mode={stop_mode!r}, tol={tol}). Pass throw=False to get the Solution instead."
    )
