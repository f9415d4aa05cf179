"""``DEQ``: a thin nn.Module shell over ``fixed_point``."""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from ._backward import AbstractBackward
from ._result import Solution
from ._solve import fixed_point

_INITS = ("zeros", "randn")


class DEQ(nn.Module):
    """A deep equilibrium layer: ``z* = cell(z*, *inputs)``, returned as a ``Solution``.

    The cell is a registered submodule (its parameters train with the layer); the solver and
    backward mode are objects, swapped with one keyword. The same ``Solution`` type is returned
    in training and evaluation, and evaluation with autograd enabled still builds a graph
    (for quantities such as forces ``-dE/dx``).

    Args:
        cell: ``cell(z, *inputs) -> z``.
        solver: the forward solver (default ``Anderson()``).
        backward: the backward mode (default ``Implicit()``).
        tol: per-sample tolerance, as in ``fixed_point``.
        stop_mode: "rel" or "abs", as in ``fixed_point``.
        max_steps: iteration budget, as in ``fixed_point``.
        active_set: call the cell only on samples still iterating (no batch coupling).
        divergence: the DIVERGED threshold factor, as in ``fixed_point``.
        trajectory: number of iterates kept for deep supervision.
        throw: raise ``SolveError`` on NONFINITE/DIVERGED.
        init: the starting point when ``forward`` gets none: "zeros" or "randn" (both
            shaped like the first input), or a callable ``init(*inputs) -> Tensor``.

    ``forward(*inputs, z0=None)``: ``z0`` may be a Tensor or a previous ``Solution`` (warm start).

    Example:
        >>> import torch, deqkit
        >>> class Cell(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.lin = torch.nn.Linear(4, 4)
        ...     def forward(self, z, x):
        ...         return torch.tanh(0.5 * self.lin(z) + x)
        >>> deq = deqkit.DEQ(Cell(), solver=deqkit.Anderson(m=3), tol=1e-6)
        >>> sol = deq(torch.randn(2, 4))
        >>> sol.result.name, sol.value.shape
        ('SUCCESS', torch.Size([2, 4]))
    """

    def __init__(
        self,
        cell: Callable[..., Tensor],
        *,
        solver: Any = None,
        backward: Optional[AbstractBackward] = None,
        tol: float = 1e-4,
        stop_mode: str = "rel",
        max_steps: int = 50,
        active_set: bool = False,
        divergence: Optional[float] = 1e4,
        trajectory: int = 0,
        throw: bool = True,
        init: Union[str, Callable[..., Tensor]] = "zeros",
    ):
        super().__init__()
        if not callable(cell):
            raise TypeError(f"cell must be callable (an nn.Module), got {type(cell).__name__}")
        if isinstance(init, str) and init not in _INITS:
            raise ValueError(f"init must be one of {_INITS} or a callable, got {init!r}")
        self.cell = cell
        self.solver = solver
        self.backward = backward
        self.init = init
        self.options = dict(
            tol=tol, stop_mode=stop_mode, max_steps=max_steps, active_set=active_set,
            divergence=divergence, trajectory=trajectory, throw=throw,
        )
        # Check the options now, not at the first forward.
        if isinstance(tol, bool) or not (isinstance(tol, (int, float)) and tol > 0):
            raise ValueError(f"tol must be a number > 0, got {tol!r}")
        if stop_mode not in ("abs", "rel"):
            raise ValueError(f"stop_mode must be 'abs' or 'rel', got {stop_mode!r}")
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"max_steps must be an integer >= 1, got {max_steps!r}")
        if divergence is not None and (isinstance(divergence, bool) or not (isinstance(divergence, (int, float)) and divergence > 1)):
            raise ValueError(f"divergence must be a number > 1 or None, got {divergence!r}")
        if isinstance(trajectory, bool) or not isinstance(trajectory, int) or trajectory < 0:
            raise ValueError(f"trajectory must be an integer >= 0, got {trajectory!r}")
        if solver is not None and (isinstance(solver, type) or not (hasattr(solver, "init") and hasattr(solver, "step"))):
            raise TypeError(f"solver must be a solver object with init() and step() (e.g. deqkit.Anderson()), got {solver!r}")
        if backward is not None and not isinstance(backward, AbstractBackward):
            raise TypeError(f"backward must be a backward-mode object (e.g. deqkit.Implicit()), got {backward!r}")

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"solver={self.solver!r}, backward={self.backward!r}, init={self.init!r}, {opts}"

    def _start(self, inputs: tuple) -> Tensor:
        if callable(self.init):
            return self.init(*inputs)
        if not inputs or not isinstance(inputs[0], Tensor):
            raise ValueError("DEQ needs z0=... or a tensor first input to shape its starting point")
        x = inputs[0].detach()
        return torch.zeros_like(x) if self.init == "zeros" else torch.randn_like(x)

    def forward(self, *inputs: Any, z0: Union[Tensor, Solution, None] = None, **overrides: Any) -> Solution:
        """Solve for the fixed point. ``overrides`` replace options for this call (e.g. ``max_steps``)."""
        unknown = set(overrides) - set(self.options) - {"solver", "backward"}
        if unknown:
            raise TypeError(f"unknown option(s) {sorted(unknown)}; known: {sorted(self.options)} + solver, backward")
        if isinstance(z0, Solution):
            z0 = z0.value
        z0 = self._start(inputs) if z0 is None else z0.detach()
        options = {**self.options, "solver": self.solver, "backward": self.backward, **overrides}
        # fixed_point caches normalised weights once per solve itself; an outer
        # parametrize.cached() here would hand the backward mode the weights computed under
        # no_grad, and the normalised weights would get no gradient.
        return fixed_point(self.cell, z0, inputs=inputs, **options)
