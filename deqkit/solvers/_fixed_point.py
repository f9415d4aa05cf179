"""Plain (damped) fixed-point iteration."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import Tensor

from .. import _checks
from ._base import AbstractSolver, set_fields


@dataclasses.dataclass(frozen=True)
class FixedPoint(AbstractSolver):
    """Picard iteration ``z <- (1 - damping) z + damping f(z)``.

    The cheapest step there is (no memory, no arithmetic beyond the mix), and the most robust
    on maps that contract quickly. Prefer ``Anderson`` when the contraction factor is near 1
    (hundreds of steps) and ``Broyden`` or ``NewtonKrylov`` when f is expensive and smooth.

    Args:
        damping: the mixing factor in (0, 1]; below 1 it can stabilise an oscillating map.

    Example:
        >>> import torch, deqkit
        >>> z0 = torch.zeros(2, 1, dtype=torch.float64)
        >>> sol = deqkit.fixed_point(torch.cos, z0, solver=deqkit.FixedPoint(), tol=1e-10, max_steps=100)
        >>> round(float(sol.value[0, 0]), 6), sol.stats.steps.tolist()
        (0.739085, [60, 60])
    """

    damping: float = 1.0

    def __post_init__(self) -> None:
        set_fields(self, damping=_checks.unit_interval("damping", self.damping))

    def select(self, state: Any, rows: Tensor) -> Any:
        return state  # no state

    def step(self, z: Tensor, fz: Tensor, state: Any, problem: Any) -> tuple[Tensor, Any]:
        if self.damping == 1.0:
            return fz, state
        return z + self.damping * (fz - z), state
