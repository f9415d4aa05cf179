"""``DEQ``: a thin nn.Module shell over ``fixed_point``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from ._backward import AbstractBackward, check_backward
from ._options import FIELDS, SolveOptions, options_from
from ._result import Solution, SolveError
from ._solve import check_start, solve
from .solvers._base import as_solver

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from ._options import OptionOverrides

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
        options: a ``SolveOptions`` record; the option keywords below replace its fields
            (``DEQ(cell, options=opts, max_steps=20)``).
        init: the starting point when ``forward`` gets none: "zeros" or "randn" (both
            shaped like the first input), or a callable ``init(*inputs) -> Tensor``.

    Keyword Args:
        tol (float | None): per-sample tolerance, as in ``fixed_point``.
        stop_mode (str): "rel" or "abs", as in ``fixed_point``.
        max_steps (int): iteration budget, as in ``fixed_point``.
        active_set (bool): call the cell only on samples still iterating (no batch coupling).
        divergence (float | None): the DIVERGED threshold factor, as in ``fixed_point``.
        escape (float | None): the ESCAPED growth factor, as in ``fixed_point``.
        trajectory (int): number of iterates kept for deep supervision.
        check_every (int): test convergence every this many iterations, as in ``fixed_point``.
        throw (bool): raise ``SolveError`` on ESCAPED, DIVERGED or NONFINITE.
        throw_on_max_steps (bool): also raise on MAX_STEPS.

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
        options: Optional[SolveOptions] = None,
        init: Union[str, Callable[..., Tensor]] = "zeros",
        **overrides: "Unpack[OptionOverrides]",
    ):
        super().__init__()
        if not callable(cell):
            raise TypeError(f"cell must be callable (an nn.Module), got {type(cell).__name__}")
        if isinstance(init, str) and init not in _INITS:
            raise ValueError(f"init must be one of {_INITS} or a callable, got {init!r}")
        if solver is not None:
            as_solver(solver)
        if backward is not None:
            check_backward(backward)
        self.cell = cell
        self.solver = solver
        self.backward = backward
        self.init = init
        self.options = options_from(options, dict(overrides))  # checked now, not at the first forward

    def extra_repr(self) -> str:
        opts = ", ".join(f"{name}={getattr(self.options, name)!r}" for name in FIELDS)
        return f"solver={self.solver!r}, backward={self.backward!r}, init={self.init!r}, {opts}"

    def _start(self, inputs: tuple[Any, ...]) -> Tensor:
        if callable(self.init):
            return self.init(*inputs)
        if not inputs or not isinstance(inputs[0], Tensor):
            raise ValueError("DEQ needs z0=... or a tensor first input to shape its starting point")
        x = inputs[0].detach()
        return torch.zeros_like(x) if self.init == "zeros" else torch.randn_like(x)

    def forward(self, *inputs: Any, z0: Union[Tensor, Solution, None] = None, **overrides: Any) -> Solution:
        """Solve for the fixed point. ``overrides`` replace options for this call (e.g. ``max_steps``),
        and ``solver``/``backward`` the layer's own."""
        solver = overrides.pop("solver", self.solver)
        backward = overrides.pop("backward", self.backward)
        options = self.options.replace(**overrides)
        warm = isinstance(z0, Solution)
        if isinstance(z0, Solution):
            z0 = z0.value
        shaped_by_input = z0 is None and isinstance(self.init, str)
        z0 = self._start(inputs) if z0 is None else z0.detach()
        if not isinstance(z0, Tensor):
            raise TypeError(f"DEQ's init callable must return a Tensor, got {type(z0).__name__}")
        check_start(z0)
        if warm:
            _check_warm_start(z0, inputs)
        # fixed_point caches normalised weights once per solve itself; an outer
        # parametrize.cached() here would hand the backward mode the weights computed under
        # no_grad, and the normalised weights would get no gradient.
        try:
            return solve(self.cell, z0, inputs, solver, backward, options)
        except (RuntimeError, ValueError) as err:  # e.g. a shape mismatch inside the cell
            if shaped_by_input and hasattr(err, "add_note") and not isinstance(err, SolveError):
                err.add_note(
                    f"deqkit.DEQ: the start z0 was shaped like the first input, {tuple(z0.shape)} "
                    f"(init={self.init!r}); if the state has another shape, pass z0=... or init=callable."
                )
            raise


def _check_warm_start(z0: Tensor, inputs: tuple[Any, ...]) -> None:
    """A warm start from a ``Solution`` must cover the same samples as the first input (the
    per-sample one, as it is for ``init``)."""
    x = inputs[0] if inputs else None
    if isinstance(x, Tensor) and x.dim() >= 1 and x.shape[0] != z0.shape[0]:
        raise ValueError(
            f"warm start from a Solution of batch {z0.shape[0]}, but inputs[0] has batch {x.shape[0]}: "
            "a warm start needs the same samples in the same order (start a new batch from z0=None, or "
            "pass z0=solution.value[rows] for the rows you keep)"
        )
