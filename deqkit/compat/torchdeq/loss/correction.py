"""``fp_correction``: a weighted sum of one loss over the supervised states (torchdeq's rule)."""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["fp_correction", "register_weight_func"]


def _exp(n: int, k: int, gamma: float = 0.8) -> float:
    """``gamma ** (n - k - 1)``: the last state weighs 1, earlier ones decay geometrically."""
    return gamma ** (n - k - 1)


def _linear(n: int, k: int, gamma: float = 0.9, bias: float = 0.0) -> float:
    """``1 - (n - k - 1) / n * gamma + bias``."""
    return 1 - (n - k - 1) / n * gamma + bias


def _const(n: int, k: int, c: float = 1.0) -> float:
    """``c`` for every state (torchdeq returned a CUDA vector here; this is the number)."""
    return c


_weight_funcs: dict[str, Callable] = {"exp": _exp, "linear": _linear, "const": _const}


def register_weight_func(name: str, func: Callable) -> None:
    """Register ``func(n, k, **kwargs) -> weight of state k of n`` under ``name``."""
    if not callable(func):
        raise TypeError(f"func must be callable, got {type(func).__name__}")
    _weight_funcs[name] = func


def fp_correction(crit: Callable, args, weight_func: str = "exp", return_loss_values: bool = False, **kwargs):
    """``sum_k w(n, k) * crit(*args_k)`` over the ``n`` supervised states.

    ``args`` is a tuple of crit's arguments, each a list (one entry per state, e.g. the
    ``z_out`` of a DEQ call) or a single value shared by every term; lists shorter than the
    longest are reused cyclically. ``weight_func``: 'exp' (``gamma=0.8``), 'linear'
    (``gamma=0.9, bias=0``), 'const' (``c=1``) or a registered name; ``kwargs`` go to it.
    With ``return_loss_values`` also returns the list of the terms' values (floats).

    Example:
        >>> import torch
        >>> from deqkit.compat.torchdeq import fp_correction
        >>> crit = torch.nn.MSELoss()
        >>> y = torch.zeros(2)
        >>> round(float(fp_correction(crit, ([torch.ones(2), 2 * torch.ones(2)], y))), 4)
        4.8
    """
    if weight_func not in _weight_funcs:
        raise ValueError(f"unknown weight_func {weight_func!r}; registered: {sorted(_weight_funcs)}")
    weigh = _weight_funcs[weight_func]
    columns = [list(a) if isinstance(a, (list, tuple)) else [a] for a in args]
    n = max((len(c) for c in columns), default=0)
    if n == 0 or any(len(c) == 0 for c in columns):
        raise ValueError("fp_correction needs at least one state: args holds an empty list")
    loss, values = 0.0, []
    for k in range(n):
        term = crit(*[c[k % len(c)] for c in columns])
        loss = loss + weigh(n, k, **kwargs) * term
        if return_loss_values:
            values.append(term.item() if torch.is_tensor(term) else float(term))
    return (loss, values) if return_loss_values else loss
