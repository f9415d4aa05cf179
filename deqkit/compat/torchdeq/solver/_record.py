"""The bookkeeping torchdeq's solvers share: residual traces, lowest residuals, their steps.

torchdeq's statistics have a shape of their own that code written for it reads: each trace
starts with a placeholder of 1e8 (the "residual before the first step"), a sample's lowest
residual is tracked in both stop modes, and after an early stop the trace is padded with the
lowest values so that its length does not depend on when the batch stopped.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .stat import SolverStat

_PLACEHOLDER = 1e8
STOP_MODES = ("abs", "rel")


def flat(x: Tensor) -> Tensor:
    """(B, ...) -> (B, D); a 1-D tensor counts as B samples of one value each."""
    return x.flatten(start_dim=1) if x.dim() >= 2 else x.reshape(x.numel(), 1)


def check_stop_mode(stop_mode: str) -> None:
    if stop_mode not in STOP_MODES:
        raise ValueError(f"stop_mode must be one of {STOP_MODES}, got {stop_mode!r}")


def check_max_iter(max_iter) -> None:
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
        raise ValueError(f"max_iter must be an integer >= 0, got {max_iter!r}")


class Record:
    """Per-sample residual history of one solve, in torchdeq's layout."""

    def __init__(self, batch: int, device, stop_mode: str, return_final: bool):
        start = torch.full((batch,), _PLACEHOLDER, device=device)
        self.trace = {"abs": [start], "rel": [start]}
        self.lowest = {"abs": start, "rel": start}
        self.lowest_step = {"abs": torch.zeros(batch, device=device), "rel": torch.zeros(batch, device=device)}
        self.stop_mode = stop_mode
        self.return_final = return_final

    def update(self, best: Tensor, candidate: Tensor, step: int, abs_diff: Tensor, rel_diff: Tensor) -> Tensor:
        """Record one step's residuals; return each sample's best estimate so far.

        A sample's estimate is replaced when its residual (in ``stop_mode``) is strictly lower
        than its lowest so far, or always with ``return_final``.
        """
        diffs = {"abs": abs_diff, "rel": rel_diff}
        for mode in STOP_MODES:
            self.trace[mode].append(diffs[mode])
            take = (diffs[mode] < self.lowest[mode]) | self.return_final
            if mode == self.stop_mode:
                rows = take.reshape((-1,) + (1,) * (candidate.dim() - 1))
                best = torch.where(rows, candidate, best).detach()
            self.lowest[mode] = torch.where(take, diffs[mode], self.lowest[mode])
            self.lowest_step[mode] = torch.where(take, torch.full_like(self.lowest_step[mode], float(step)),
                                                 self.lowest_step[mode])
        return best

    def converged(self, tol: float) -> bool:
        """torchdeq's batch-wide test: the worst sample's latest residual is below ``tol``."""
        return not self.return_final and bool(self.trace[self.stop_mode][-1].max() < tol)

    def pad_to(self, length: int) -> None:
        """Repeat the lowest residuals until each trace has ``length`` entries."""
        while len(self.trace[self.stop_mode]) < length:
            for mode in STOP_MODES:
                self.trace[mode].append(self.lowest[mode])

    def stat(self) -> SolverStat:
        return SolverStat(
            abs_lowest=self.lowest["abs"],
            rel_lowest=self.lowest["rel"],
            abs_trace=torch.stack(self.trace["abs"], dim=1),
            rel_trace=torch.stack(self.trace["rel"], dim=1),
            nstep=self.lowest_step[self.stop_mode],
        )
