"""``SolverStat``: the dict of solver statistics torchdeq code reads (``info``)."""

from __future__ import annotations

import torch

__all__ = ["SolverStat"]

_KEYS = ("abs_lowest", "rel_lowest", "abs_trace", "rel_trace", "nstep", "sradius")


class SolverStat(dict):
    """Solver statistics as torchdeq names them, one entry per sample.

    Keys: ``abs_lowest`` (B,) each sample's lowest ``||f(z) - z||``; ``rel_lowest`` (B,) its
    lowest ``||f(z) - z|| / (||f(z)|| + 1e-9)``; ``abs_trace`` and ``rel_trace`` (B, N) the
    residuals along the steps (the first column is the placeholder 1e8, and after an early stop
    the lowest values repeat to the full length); ``nstep`` (B,) the step at which the lowest
    residual in the stop mode was reached (not the number of steps run); ``sradius`` the
    spectral radius where it was estimated. Missing entries hold -1.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.setdefault("abs_lowest", torch.tensor([-1.0]))
        self.setdefault("rel_lowest", torch.tensor([-1.0]))
        self.setdefault("abs_trace", torch.tensor([[-1.0]]))
        self.setdefault("rel_trace", torch.tensor([[-1.0]]))
        self.setdefault("nstep", torch.tensor([-1.0]))
        self.setdefault("sradius", torch.tensor([-1.0]))

    @classmethod
    def from_final_step(cls, z, fz, nstep: int = 0) -> "SolverStat":
        """Statistics of one pair ``(z, f(z))`` (list states are concatenated per sample)."""
        if not torch.is_tensor(z):
            z = torch.cat([zi.flatten(start_dim=1) for zi in z], dim=1)
            fz = torch.cat([fi.flatten(start_dim=1) for fi in fz], dim=1)
        diff = (fz - z).flatten(start_dim=1).norm(dim=1)
        rel = diff / (fz.flatten(start_dim=1).norm(dim=1) + 1e-8)
        return cls(abs_lowest=diff, rel_lowest=rel, abs_trace=diff.unsqueeze(1), rel_trace=rel.unsqueeze(1),
                   nstep=nstep * torch.ones(z.shape[0], device=z.device))
