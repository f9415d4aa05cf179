"""``DEQ``: a thin nn.Module shell over ``fixed_point``."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from ._backward import AbstractBackward
from ._options import SolveOptions, check_backward, check_solver
from ._result import Solution, SolveError
from ._solve import _DEFAULT_BACKWARD, _DEFAULT_SOLVER, _check_start, solve

_INITS = ("zeros", "randn")
# read once: dataclasses.fields() inside forward is a graph break under torch.compile
_OPTION_NAMES = frozenset(f.name for f in dataclasses.fields(SolveOptions))


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
        check_every: test convergence every this many iterations, as in ``fixed_point``.
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
        check_every: int = 1,
        throw: bool = True,
        init: Union[str, Callable[..., Tensor]] = "zeros",
    ):
        super().__init__()
        if not callable(cell):
            raise TypeError(f"cell must be callable (an nn.Module), got {type(cell).__name__}")
        if isinstance(init, str) and init not in _INITS:
            raise ValueError(f"init must be one of {_INITS} or a callable, got {init!r}")
        if solver is not None:
            check_solver(solver)
        if backward is not None:
            check_backward(backward)
        self.cell = cell
        self.solver = solver
        self.backward = backward
        self.init = init
        # checked now, not at the first forward
        self.options = SolveOptions(
            tol=tol, stop_mode=stop_mode, max_steps=max_steps, active_set=active_set,
            divergence=divergence, trajectory=trajectory, check_every=check_every, throw=throw,
        )

    def extra_repr(self) -> str:
        opts = ", ".join(f"{f.name}={getattr(self.options, f.name)!r}" for f in dataclasses.fields(self.options))
        return f"solver={self.solver!r}, backward={self.backward!r}, init={self.init!r}, {opts}"

    def _start(self, inputs: tuple[Any, ...]) -> Tensor:
        if callable(self.init):
            return self.init(*inputs)
        if not inputs or not isinstance(inputs[0], Tensor):
            raise ValueError("DEQ needs z0=... or a tensor first input to shape its starting point")
        x = inputs[0].detach()
        return torch.zeros_like(x) if self.init == "zeros" else torch.randn_like(x)

    def forward(self, *inputs: Any, z0: Union[Tensor, Solution, None] = None, **overrides: Any) -> Solution:
        """Solve for the fixed point. ``overrides`` replace options for this call (e.g. ``max_steps``)."""
        known = _OPTION_NAMES
        unknown = set(overrides) - known - {"solver", "backward"}
        if unknown:
            raise TypeError(f"unknown option(s) {sorted(unknown)}; known: {sorted(known)} + solver, backward")
        solver = overrides.pop("solver", self.solver)
        backward = overrides.pop("backward", self.backward)
        solver = _DEFAULT_SOLVER if solver is None else solver
        backward = _DEFAULT_BACKWARD if backward is None else backward
        check_solver(solver)
        check_backward(backward)
        options = dataclasses.replace(self.options, **overrides) if overrides else self.options
        if isinstance(z0, Solution):
            z0 = z0.value
        shaped_by_input = z0 is None and isinstance(self.init, str)
        z0 = self._start(inputs) if z0 is None else z0.detach()
        if not isinstance(z0, Tensor):
            raise TypeError(f"DEQ's init callable must return a Tensor, got {type(z0).__name__}")
        # fixed_point caches normalised weights once per solve itself; an outer
        # parametrize.cached() here would hand the backward mode the weights computed under
        # no_grad, and the normalised weights would get no gradient.
        _check_start(z0)
        try:
            return solve(self.cell, z0, inputs, solver, backward, options)
        except (RuntimeError, ValueError) as err:  # e.g. a shape mismatch inside the cell
            if shaped_by_input and hasattr(err, "add_note") and not isinstance(err, SolveError):
                err.add_note(
                    f"deqkit.DEQ: the start z0 was shaped like the first input, {tuple(z0.shape)} "
                    f"(init={self.init!r}); if the state has another shape, pass z0=... or init=callable."
                )
            raise
