"""torch's parametrisation cache, as a solve uses it: the one module of deqkit that touches it.

Parametrised weights (``deqkit.nn.apply_norm``: weight or spectral norm through
``torch.nn.utils.parametrize``) are computed once per solve, not once per call of f: a solve
runs inside ``solve_cache()`` (torch's ``parametrize.cached()``), so the forward loop and the
backward mode's calls after it share the very weights that made the value (spectral norm's
power iteration runs once). Two more pieces make the gradient right:

* ``fill_with_graph(f)``: when the forward loop runs without autograd and a backward mode
  attaches its gradient afterwards, the first call of f is made with autograd on (its output
  detached), so the cached weights carry their graph to the parameters.
* ``Reuse``: a call recomputed in the backward pass (activation checkpointing) runs after the
  solve's cache is gone; it reads the cache the original call read, so it recomputes the same
  values with the same graph.

torch offers no public way to hand a cache to a later computation; ``Reuse`` uses the
private ``parametrize._cache`` and ``parametrize._cache_enabled``, which
``tests/test_parametrize.py`` pins.
"""

from __future__ import annotations

from typing import Any, Callable, ContextManager, Optional

import torch
from torch import Tensor
from torch.nn.utils import parametrize


def solve_cache() -> ContextManager[None]:
    """The scope of one solve: parametrised tensors are computed once inside it."""
    return parametrize.cached()


def fill_with_graph(f: Callable[..., Any]) -> Callable[..., Any]:
    """``f``, whose first call runs with autograd on (output detached), so that the weights the
    solve caches at that call carry their graph for the backward mode's calls."""
    first = [True]

    def call(z: Tensor, *inputs: Any) -> Any:
        if first[0]:
            first[0] = False
            with torch.enable_grad():
                out = f(z, *inputs)
            return out.detach() if isinstance(out, Tensor) else out
        return f(z, *inputs)

    return call


def live_cache() -> Optional[dict[Any, Any]]:
    """The dict of parametrised tensors of the running ``solve_cache()``, if one is open."""
    if getattr(parametrize, "_cache_enabled", 0) and isinstance(getattr(parametrize, "_cache", None), dict):
        return parametrize._cache
    return None


class Reuse:
    """Re-enter a cache of parametrised tensors (from ``live_cache()``) on ``with``; nothing
    for None. Reusable and re-entrant, as a checkpoint's recomputation context must be."""

    def __init__(self, cache: Optional[dict[Any, Any]]):
        self.cache = cache
        self.saved: list[dict[Any, Any]] = []

    def __enter__(self) -> None:
        if self.cache is not None:
            self.saved.append(parametrize._cache)
            parametrize._cache = self.cache
            parametrize._cache_enabled += 1

    def __exit__(self, *exc: Any) -> None:
        if self.cache is not None:
            parametrize._cache_enabled -= 1
            parametrize._cache = self.saved.pop()
