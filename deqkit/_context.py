"""Which solve is running, and which rows of its batch f is being called on.

``fixed_point`` opens a solve scope; code inside f can ask for the current solve and keep
per-solve state on it (``deqkit.nn.VariationalDropout`` keeps its one mask per solve there), and
for the rows being evaluated, to slice per-sample state when ``active_set`` calls f on a subset
of the batch. ``Replay`` re-enters the solve and rows of a call later, for a recomputation in
the backward pass (``Unrolled(checkpoint=True)``), so that the recomputed call sees what the
original one saw.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
from typing import Any, Callable, Iterator, Optional, TypeVar

import torch
from torch import Tensor

T = TypeVar("T")


HOST_SIDE: list[Any] = []  # functions torch.compile should leave to Python, marked once it is loaded (then empty)


def host_side(obj: T) -> T:
    """Mark a function, or every function of a class, as code torch.compile leaves to Python.

    The loop's bookkeeping works on numpy arrays of host residuals; torch.compile would trace
    that numpy code as tensor code (for no gain, recompiling as the values change, and under
    ``torch.inference_mode`` failing its own guards). ``torch._dynamo``'s ``skip`` marks the
    code objects themselves: no wrapper, so nothing is added to a call in eager mode (a
    ``torch.compiler.disable`` wrapper costs microseconds per call); frames they call (f, the
    solver's step) are still compiled. torch's compiler takes seconds to import, so the marks
    are made by ``mark_host_side()`` at the first solve after it is loaded (every solve asks
    while ``HOST_SIDE`` is not empty, for the price of a dict lookup). Pinned by
    ``tests/test_edges.py``.
    """
    members = list(vars(obj).values()) if isinstance(obj, type) else [obj]
    for member in members:  # functions, and those behind classmethod / staticmethod / property
        for fn in (getattr(member, "__func__", member), getattr(member, "fget", None)):
            if hasattr(fn, "__code__"):
                HOST_SIDE.append(fn)
    return obj


def mark_host_side() -> None:
    """Make the marks of ``host_side`` once torch's compiler is loaded (a no-op until then)."""
    if HOST_SIDE and "torch._dynamo" in sys.modules:
        from torch._dynamo.decorators import skip

        for fn in HOST_SIDE:
            skip(fn)
        HOST_SIDE.clear()


class SolveToken:
    """Identifies one solve (compared by identity) and holds its per-solve state."""

    __slots__ = ("batch_size", "_state")

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self._state: dict[Any, Any] = {}

    def state(self, owner: Any, make: Callable[[], T]) -> T:
        """The state ``owner`` (a module, compared by identity) keeps for this solve, made by
        ``make()`` at its first request. Lives as long as the solve's graph needs it."""
        key = id(owner)
        found: Optional[tuple[Any, Any]] = self._state.get(key)
        if found is None or found[0] is not owner:
            found = (owner, make())
            self._state[key] = found
        return found[1]


_SOLVE: contextvars.ContextVar[Optional[SolveToken]] = contextvars.ContextVar("deqkit_solve", default=None)
_ROWS: contextvars.ContextVar[Optional[Tensor]] = contextvars.ContextVar("deqkit_rows", default=None)


def current_solve() -> Optional[SolveToken]:
    """The token of the innermost running solve, or None outside any solve."""
    return _SOLVE.get()


def current_rows() -> Optional[Tensor]:
    """The batch rows f is being called on (active-set evaluation), or None for all rows."""
    return _ROWS.get()


@contextlib.contextmanager
def solve_scope(batch_size: int) -> Iterator[SolveToken]:
    token = SolveToken(batch_size)
    reset = _SOLVE.set(token)
    try:
        yield token
    finally:
        _SOLVE.reset(reset)


@contextlib.contextmanager
def rows_scope(rows: Optional[Tensor]) -> Iterator[None]:
    reset = _ROWS.set(rows)
    try:
        yield
    finally:
        _ROWS.reset(reset)


class Replay:
    """The solve and rows current when it is made, re-entered on ``with``: a reusable context
    manager (a recomputation may enter it more than once, nested for a second derivative)."""

    def __init__(self) -> None:
        self._solve, self._rows = _SOLVE.get(), _ROWS.get()
        self._resets: list[tuple[contextvars.Token[Optional[SolveToken]], contextvars.Token[Optional[Tensor]]]] = []

    def __enter__(self) -> None:
        self._resets.append((_SOLVE.set(self._solve), _ROWS.set(self._rows)))

    def __exit__(self, *exc: Any) -> None:
        solve, rows = self._resets.pop()
        _ROWS.reset(rows)
        _SOLVE.reset(solve)


def under_functorch(t: Tensor) -> bool:
    """True when ``t`` is batched by a vmap (torch.func's, or the older one that
    ``torch.autograd.functional.jacobian(vectorize=True)`` and ``autograd.grad(is_grads_batched=True)``
    use) or wrapped by torch.func's grad, or a torch.func transform is running. False while
    torch.compile traces (it cannot trace the check, and a traced solve is not under a torch.func
    transform). torch has no public test for these; the private ones it needs are pinned by
    ``tests/test_edges.py``."""
    if torch.compiler.is_compiling():
        return False
    functorch = torch._C._functorch
    return bool(functorch.maybe_current_level() is not None or functorch.is_batchedtensor(t)
                or functorch.is_gradtrackingtensor(t) or "Batched" in str(torch._C._dispatch_keys(t)))
