"""The solver protocol: a solver says how to take one step; the shared loop does the rest."""

from __future__ import annotations

import abc
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class SolverLike(Protocol):
    """Anything with ``init`` and ``step`` can be passed as ``solver=``; subclassing is optional."""

    def init(self, z: Tensor, fz: Tensor, problem: Any) -> Any: ...

    def step(self, z: Tensor, fz: Tensor, state: Any, problem: Any) -> tuple[Tensor, Any]: ...


class AbstractSolver(abc.ABC):
    """Base class of deqkit's solvers.

    A solver is an immutable record of hyperparameters. The shared loop calls
    ``state = solver.init(z0, f(z0), problem)`` once and then, while any sample is still
    iterating, ``z_next, state = solver.step(z, f(z), state, problem)``; it evaluates ``f`` at
    ``z_next`` itself, checks the residual per sample, freezes finished samples and keeps
    each sample's best iterate. A step proposes the next iterate for the whole batch; the loop
    ignores the rows of samples that have stopped.

    ``problem`` gives a step what it may need beyond ``z`` and ``f(z)``: ``problem.active``
    (BoolTensor[B], samples still iterating), ``problem.f(z)`` (a counted call of the map) and
    ``problem.jvp(z, v)`` (a counted Jacobian-vector product of the map).

    Steps must not modify ``z``, ``fz`` or tensors of earlier states in place, and must be
    written with out-of-place operations wherever autograd may see them (``Unrolled``).

    Three optional parts of the protocol:

    * ``differentiable`` (class attribute, default True): False when ``Unrolled`` cannot
      differentiate through the steps; ``why_not_differentiable`` then says why, and the solve
      refuses the pairing at call time.
    * ``run(problem, z0, options) -> LoopOutput``: a solver with a loop of its own (such as
      ``TorchDEQSolver``) implements this hook instead of ``step``; the solve calls it in place
      of the shared loop and reads the same record back.
    * ``select(state, rows) -> state``: the state of the samples at positions ``rows`` (a
      LongTensor into the current batch), in that order. With ``active_set=True`` the loop then
      compacts its working tensors to the samples still iterating, so steps shrink with them;
      a solver without it steps over the whole batch, and only f is evaluated on the active
      rows. deqkit's solvers have it.
    """

    differentiable: ClassVar[bool] = True

    def init(self, z: Tensor, fz: Tensor, problem: Any) -> Any:
        """The state before the first step (default: none)."""
        return None

    @abc.abstractmethod
    def step(self, z: Tensor, fz: Tensor, state: Any, problem: Any) -> tuple[Tensor, Any]:
        """Return the next iterate for the whole batch and the new state."""


def select_rows(state: tuple[Any, ...], rows: Tensor) -> Any:
    """A solver's ``select`` for a NamedTuple state whose tensor fields are all per-sample
    (batch first): each tensor indexed by ``rows`` along dim 0, other fields kept.

    Example:
        >>> import torch
        >>> from typing import NamedTuple
        >>> class State(NamedTuple):
        ...     memory: torch.Tensor
        ...     count: int
        >>> select_rows(State(torch.arange(6).reshape(3, 2), 7), torch.tensor([2, 0]))
        State(memory=tensor([[4, 5],
                [0, 1]]), count=7)
    """
    return type(state)(*(x.index_select(0, rows) if isinstance(x, Tensor) else x for x in state))


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of solver arithmetic: float32 or better, whatever the state's dtype."""
    return torch.promote_types(dtype, torch.float32)


# The three products below are written in the forms that hit fast kernels: on CPU,
# einsum("bmd,bd->bm") and einsum("bd,bd->b") fall onto a matrix-times-column-vector path
# that is 10-30x slower for large d than these (measured on torch 2.13).


def batched_dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample inner product of two (B, d) tensors -> (B,)."""
    return (a * b).sum(dim=1)


def rows_dot(rows: Tensor, v: Tensor) -> Tensor:
    """Inner products of each of m rows with v, per sample: (B, m, d), (B, d) -> (B, m)."""
    return torch.bmm(v.unsqueeze(1), rows.transpose(1, 2)).squeeze(1)


def combine(weights: Tensor, rows: Tensor) -> Tensor:
    """Weighted sum of rows, per sample: (B, m), (B, m, d) -> (B, d)."""
    return torch.bmm(weights.unsqueeze(1), rows).squeeze(1)


def check_positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_unit_interval(name: str, value: Any) -> None:
    """Check 0 < value <= 1 (a damping or mixing factor)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")


def check_positive(name: str, value: Any, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (value >= 0 if allow_zero else value > 0) and value == value
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a number {bound}, got {value!r}")
