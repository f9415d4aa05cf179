"""``mem_gc``: gradient checkpointing of one call of a module."""

from __future__ import annotations

from typing import Callable

from torch.utils.checkpoint import checkpoint

__all__ = ["mem_gc"]


def mem_gc(func: Callable, in_args=None):
    """``func(*in_args)`` without keeping its activations: they are recomputed in backward
    (torch.utils.checkpoint, non-reentrant). Same values and gradients as the plain call."""
    return checkpoint(func, *(in_args or ()), use_reentrant=False)
