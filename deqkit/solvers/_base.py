"""The solver protocol: a solver says how to take one step; the shared loop does the rest."""

from __future__ import annotations

import abc
from typing import Any, ClassVar, Protocol, runtime_checkable

from torch import Tensor

from .._ledger import LoopOutput
from .._loop import iterate
from .._numerics import batched_dot, combine, rows_dot, work_dtype  # noqa: F401  (the solvers' arithmetic)
from .._options import SolveOptions


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
    (BoolTensor[B], samples still iterating), ``problem.residual(z, fz)`` (the loop's own
    ``f(z) - z`` and its norm), ``problem.f(z)`` (a counted call of the map) and
    ``problem.jvp(z, v)`` (a counted Jacobian-vector product of the map).

    Steps must not modify ``z``, ``fz`` or tensors of earlier states in place, and must be
    written with out-of-place operations wherever autograd may see them (``Unrolled``).

    The optional parts of the protocol, declared here with their defaults:

    * ``differentiable`` (default True): False when ``Unrolled`` cannot differentiate through
      the steps; ``why_not_differentiable`` then says why, and the solve refuses the pairing.
    * ``select(state, rows) -> state``: the state of the samples at positions ``rows`` (a
      LongTensor into the current batch), in that order. With ``active_set=True`` the loop then
      compacts its working tensors to the samples still iterating, so steps shrink with them.
      ``selects_rows`` tells whether a solver has it (by default: whether its class overrides
      ``select``); one without it steps over the whole batch, and only f is evaluated on the
      active rows.
    * ``run(problem, z0, options) -> LoopOutput``: the whole forward loop. The default is the
      shared loop; a solver with a loop of its own (``TorchDEQSolver``) or one that runs other
      solvers (``Fallback``) overrides it and returns the same record.
    """

    differentiable: ClassVar[bool] = True
    why_not_differentiable: ClassVar[str] = "its iterations are not recorded by autograd"

    def init(self, z: Tensor, fz: Tensor, problem: Any) -> Any:
        """The state before the first step (default: none)."""
        return None

    @abc.abstractmethod
    def step(self, z: Tensor, fz: Tensor, state: Any, problem: Any) -> tuple[Tensor, Any]:
        """Return the next iterate for the whole batch and the new state."""

    def select(self, state: Any, rows: Tensor) -> Any:
        """The state of the samples at positions ``rows`` (see the class docstring)."""
        raise NotImplementedError(f"{type(self).__name__} cannot select rows of its state")

    @property
    def selects_rows(self) -> bool:
        """True when ``select`` is implemented, so the active set can compact the state."""
        return type(self).select is not AbstractSolver.select

    def run(self, problem: Any, z0: Tensor, options: SolveOptions) -> LoopOutput:
        """The forward loop: the shared one (``deqkit._loop.iterate``) unless overridden."""
        return iterate(self, problem, z0, options)

    @property
    def own_loop(self) -> bool:
        """True when the solver runs a loop of its own (overrides ``run``) rather than steps."""
        return type(self).run is not AbstractSolver.run


class _Adapted(AbstractSolver):
    """A solver object that does not subclass ``AbstractSolver`` (it has ``init`` and ``step``),
    seen through the protocol: its optional hooks where it has them, the defaults where not."""

    def __init__(self, solver: Any):
        self.solver = solver

    def __repr__(self) -> str:
        return repr(self.solver)

    @property
    def differentiable(self) -> bool:  # type: ignore[override]
        return bool(getattr(self.solver, "differentiable", True))

    @property
    def why_not_differentiable(self) -> str:  # type: ignore[override]
        return str(getattr(self.solver, "why_not_differentiable", AbstractSolver.why_not_differentiable))

    def init(self, z: Tensor, fz: Tensor, problem: Any) -> Any:
        return self.solver.init(z, fz, problem)

    def step(self, z: Tensor, fz: Tensor, state: Any, problem: Any) -> tuple[Tensor, Any]:
        return self.solver.step(z, fz, state, problem)  # type: ignore[no-any-return]

    def select(self, state: Any, rows: Tensor) -> Any:
        return self.solver.select(state, rows)

    @property
    def selects_rows(self) -> bool:
        return callable(getattr(self.solver, "select", None))

    def run(self, problem: Any, z0: Tensor, options: SolveOptions) -> LoopOutput:
        if self.own_loop:
            return self.solver.run(problem, z0, options)  # type: ignore[no-any-return]
        return iterate(self, problem, z0, options)

    @property
    def own_loop(self) -> bool:
        return callable(getattr(self.solver, "run", None))


def as_solver(solver: Any, name: str = "solver") -> AbstractSolver:
    """``solver`` as an ``AbstractSolver`` (itself, or a view of an object with init and step);
    anything else (a class, a name, an object without step) is refused, naming the fix."""
    if isinstance(solver, AbstractSolver):
        return solver
    if isinstance(solver, type):
        raise TypeError(f"{name} must be a solver object, not a class: use {name}={solver.__name__}()")
    if isinstance(solver, str):
        raise TypeError(
            f"{name} must be a solver object, got the string {solver!r}: use deqkit.solvers.get({solver!r}) "
            "to turn a name into a solver"
        )
    if not (callable(getattr(solver, "init", None)) and callable(getattr(solver, "step", None))):
        raise TypeError(f"{name} must have init() and step() methods (e.g. deqkit.Anderson()), got {solver!r}")
    return _Adapted(solver)


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


def set_fields(record: Any, **values: Any) -> None:
    """Store checked values on a frozen dataclass while it is being built (in ``__post_init__``)."""
    for name, value in values.items():
        object.__setattr__(record, name, value)
