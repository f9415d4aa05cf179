"""Which solve is running, and which rows of its batch f is being called on.

``fixed_point`` opens a solve scope; code inside f (``deqkit.nn.VariationalDropout``) can ask
for the current solve, to keep one dropout mask per solve, and for the rows being evaluated,
to slice per-sample state when ``active_set`` calls f on a subset of the batch.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Optional

from torch import Tensor


class SolveToken:
    """Identifies one solve; compared by identity."""

    __slots__ = ("batch_size",)

    def __init__(self, batch_size: int):
        self.batch_size = batch_size


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
