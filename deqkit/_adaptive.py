"""Adaptive Jacobian regularisation: the penalty's weight follows the solves' trend."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

from ._checks import above, integer, unit_interval
from ._monitor import Trend

_RAISE, _LOWER, _HOLD, _WAIT = "raise", "lower", "hold", "wait"


@dataclasses.dataclass
class AdaptiveJacobianWeight:
    """The weight of ``jacobian_reg`` in the loss, off while the solves stay as cheap as at the
    start of training, raised when they degrade, lowered again when they recover.

    The rule, applied by ``update(monitor.trend)`` once per training step:

    1. No trend yet (the monitor's two windows are not full), or fewer than ``cooldown`` steps
       since the last change: keep the weight.
    2. Degraded (``trend.nfev_ratio > raise_above``, or ``trend.converged_drop >
       converged_drop``): raise it, from 0 to ``start``, else times ``factor``, at most
       ``max_weight``.
    3. Healthy (``trend.nfev_ratio < lower_below``, and the converged fraction within
       ``converged_drop / 2`` of the baseline's): lower it, divided by ``factor``; below
       ``start`` it is 0 (off).
    4. Otherwise keep it.

    Between ``lower_below`` and ``raise_above`` the weight holds (hysteresis), and after a
    change it holds for ``cooldown`` steps (default: the trend's window), so the recent window
    holds only steps trained with the new weight before the rule looks again. While the weight
    is 0 the penalty need not be computed at all, which is where adaptive regularisation saves
    time over a fixed weight.

    Args:
        start: the first weight when the solves degrade, > 0.
        factor: the multiplier of each raise and divisor of each lowering, > 1.
        max_weight: the largest weight, >= start.
        raise_above: NFE ratio (recent / baseline) above which the weight goes up, > 1.
        lower_below: NFE ratio below which it goes down, in (0, raise_above].
        converged_drop: a fall of the converged fraction by more than this also raises it, in (0, 1].
        cooldown: steps to hold after a change (None: the trend's window), >= 0.

    Example:
        >>> import torch, deqkit
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> cell = torch.nn.Linear(8, 8)
        >>> f = lambda z, x: torch.tanh(cell(z) + x)
        >>> monitor = deqkit.Monitor(window=5, nfev_factor=None)
        >>> weight = deqkit.AdaptiveJacobianWeight(start=0.5)
        >>> for _ in range(12):
        ...     x = torch.randn(4, 8)
        ...     sol = deqkit.fixed_point(f, torch.zeros(4, 8), inputs=(x,), tol=1e-5)
        ...     loss = sol.value.pow(2).mean()
        ...     if weight.value > 0:  # off: no extra vector-Jacobian product
        ...         z = sol.value.detach().requires_grad_()
        ...         loss = loss + weight.value * deqkit.jacobian_reg(lambda z: f(z, x), z).mean
        ...     loss.backward()
        ...     _ = monitor.step(sol, jacobian_weight=weight.value)
        ...     _ = weight.update(monitor.trend)
        >>> monitor.trend.window, weight.last_change in ("raise", "lower", "hold", "wait")
        (5, True)
    """

    start: float = 0.1
    factor: float = 2.0
    max_weight: float = 10.0
    raise_above: float = 1.15
    lower_below: float = 1.05
    converged_drop: float = 0.05
    cooldown: Optional[int] = None
    value: float = dataclasses.field(default=0.0, init=False)
    """The weight now: multiply ``jacobian_reg(...).mean`` by it (0: leave the penalty out)."""
    last_change: Optional[str] = dataclasses.field(default=None, init=False)
    """What the last ``update`` did: "raise", "lower", "hold" or "wait" (None before any)."""
    _hold: int = dataclasses.field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        self.start = above("start", self.start, 0.0)
        self.factor = above("factor", self.factor, 1.0)
        self.max_weight = above("max_weight", self.max_weight, 0.0)
        if self.max_weight < self.start:
            raise ValueError(f"max_weight must be >= start ({self.start:g}), got {self.max_weight!r}")
        self.raise_above = above("raise_above", self.raise_above, 1.0)
        self.lower_below = above("lower_below", self.lower_below, 0.0)
        if self.lower_below > self.raise_above:
            raise ValueError(f"lower_below must be <= raise_above ({self.raise_above:g}), got {self.lower_below!r}")
        self.converged_drop = unit_interval("converged_drop", self.converged_drop)
        if self.cooldown is not None:
            self.cooldown = integer("cooldown", self.cooldown, minimum=0, hint=" or None")

    def decide(self, trend: Optional[Trend]) -> str:
        """What the rule does with ``trend`` now, without doing it: "raise", "lower", "hold"
        (the trend is in the band, or the weight is already at its bound) or "wait" (no
        trend yet, or cooling down after a change)."""
        if trend is None or self._hold > 0:
            return _WAIT
        if trend.nfev_ratio > self.raise_above or trend.converged_drop > self.converged_drop:
            return _RAISE if self.value < self.max_weight else _HOLD
        healthy = trend.nfev_ratio < self.lower_below and trend.converged_drop <= self.converged_drop / 2
        if healthy and self.value > 0:
            return _LOWER
        return _HOLD

    def update(self, trend: Optional[Trend]) -> float:
        """Apply the rule to ``trend`` (a ``Monitor.trend``, or None) and return the new weight."""
        if trend is not None and not isinstance(trend, Trend):
            raise TypeError(f"trend must be a deqkit.Trend (Monitor.trend) or None, got {type(trend).__name__}")
        action = self.decide(trend)
        if action == _WAIT:
            self._hold = max(self._hold - 1, 0)
        elif action == _RAISE:
            self.value = self.start if self.value == 0 else min(self.value * self.factor, self.max_weight)
        elif action == _LOWER:
            lowered = self.value / self.factor
            self.value = lowered if lowered >= self.start else 0.0
        if action in (_RAISE, _LOWER):
            assert trend is not None
            self._hold = trend.window if self.cooldown is None else self.cooldown
        self.last_change = action
        return self.value

    def state_dict(self) -> dict[str, Any]:
        """The weight and the cooldown left, for a checkpoint."""
        return {"value": self.value, "hold": self._hold, "last_change": self.last_change}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from ``state_dict()``."""
        value = float(state["value"])
        if not (value == 0 or self.start <= value <= self.max_weight):
            raise ValueError(f"load_state_dict: value {value!r} is neither 0 nor in [start, max_weight] = "
                             f"[{self.start:g}, {self.max_weight:g}]")
        self.value, self._hold, self.last_change = value, int(state["hold"]), state["last_change"]
