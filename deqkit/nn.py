"""Building blocks for DEQ cells: weight/spectral normalisation and solve-wide dropout.

Normalisation uses ``torch.nn.utils.parametrizations``, so a normalised weight is an ordinary
parametrised parameter: it follows ``.to()``, deep-copies, saves in ``state_dict`` and needs
no reset between solves. ``fixed_point`` and ``DEQ`` evaluate parametrisations once per solve
(``torch.nn.utils.parametrize.cached``), not once per iteration.
"""

from __future__ import annotations

from typing import Iterable, cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrizations, parametrize

from . import _checks
from ._context import current_rows, current_solve

_DEFAULT_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_KINDS = ("weight", "spectral")


def apply_norm(
    module: nn.Module,
    kind: str = "weight",
    *,
    names: Iterable[str] = ("weight",),
    types: tuple[type[nn.Module], ...] = _DEFAULT_TYPES,
    exclude: Iterable[str] = (),
) -> nn.Module:
    """Parametrise the weights of every ``types`` submodule with weight or spectral norm.

    Args:
        module: the cell (changed in place, and returned).
        kind: "weight" (``w = g v / ||v||``) or "spectral" (``w / sigma_max(w)``, one power
            iteration per training forward).
        names: parameter names to normalise in each submodule.
        types: submodule classes to touch.
        exclude: qualified submodule names to skip.

    Example:
        >>> import torch, deqkit
        >>> cell = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh())
        >>> _ = deqkit.nn.apply_norm(cell, "spectral")
        >>> deqkit.nn.has_norm(cell)
        True
        >>> _ = deqkit.nn.remove_norm(cell); deqkit.nn.has_norm(cell)
        False
    """
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    names, exclude = tuple(names), set(exclude)
    touched = already = 0
    for qual, sub in module.named_modules():
        if qual in exclude or not isinstance(sub, types):
            continue
        for name in names:
            if parametrize.is_parametrized(sub, name):
                already += 1
                continue
            if getattr(sub, name, None) is None:
                continue
            if kind == "weight":
                parametrizations.weight_norm(sub, name)
            else:
                parametrizations.spectral_norm(sub, name)
            touched += 1
    if touched == 0 and already:
        raise ValueError(f"apply_norm: every matching parameter {names} is already parametrised; call remove_norm first")
    if touched == 0:
        raise ValueError(f"apply_norm found no parameter {names} in submodules of types {[t.__name__ for t in types]}")
    return module


def remove_norm(module: nn.Module) -> nn.Module:
    """Remove deqkit/torch parametrisations, keeping the current normalised values as weights."""
    for sub in module.modules():
        if parametrize.is_parametrized(sub):
            for name in list(cast(nn.ModuleDict, sub.parametrizations).keys()):
                parametrize.remove_parametrizations(sub, name, leave_parametrized=True)
    return module


def has_norm(module: nn.Module) -> bool:
    """True if any submodule has a parametrised tensor."""
    return any(parametrize.is_parametrized(sub) for sub in module.modules())


class VariationalDropout(nn.Module):
    """Dropout whose mask is drawn once per solve and shared by all its iterations.

    Ordinary dropout draws a new mask at every call of f, so the map changes from one
    iteration to the next and has no fixed point. Inside ``fixed_point`` (or ``DEQ``) this
    module draws one mask per solve and keeps it with the solve (not on the module), so every
    call of f in that solve uses it: the backward mode's calls after the loop and a
    recomputation in the backward pass (``Unrolled(checkpoint=True)``) included, whatever other
    solves ran in between. With ``active_set=True`` it uses the rows of that mask that belong
    to the samples being evaluated. Outside a solve it acts as plain dropout.

    Args:
        p: drop probability in [0, 1).
        shared_dims: dims (other than the batch) over which one mask value is shared, e.g.
            ``(1,)`` to drop whole token features for all tokens of a (B, N, D) state.

    Example:
        >>> import torch, deqkit
        >>> drop = deqkit.nn.VariationalDropout(0.5).train()
        >>> sol = deqkit.fixed_point(lambda z: 0.5 * drop(torch.ones_like(z)) + 0.1 * z,
        ...                          torch.zeros(3, 8), solver=deqkit.FixedPoint(), tol=1e-6)
        >>> sol.result.name  # one mask for the whole solve, so there is a fixed point
        'SUCCESS'
    """

    def __init__(self, p: float = 0.1, shared_dims: tuple[int, ...] = ()):
        super().__init__()
        if not _checks.is_number(p) or not 0 <= p < 1:
            raise ValueError(f"p must be a number in [0, 1), got {p!r}")
        self.p = float(p)
        self.shared_dims = tuple(shared_dims)
        if not all(_checks.is_integer(d) for d in self.shared_dims):
            raise TypeError(f"shared_dims must be a tuple of dims (ints), got {shared_dims!r}")
        if 0 in self.shared_dims:
            raise ValueError("shared_dims cannot include the batch dim 0")
        self.shared_dims = tuple(int(d) for d in self.shared_dims)

    def extra_repr(self) -> str:
        return f"p={self.p}, shared_dims={self.shared_dims}"

    def _new_mask(self, x: Tensor, batch: int) -> Tensor:
        shape = [batch, *x.shape[1:]]
        for d in self.shared_dims:
            shape[d] = 1
        keep = torch.empty(shape, device=x.device, dtype=x.dtype).bernoulli_(1 - self.p)
        return keep / (1 - self.p)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        token = current_solve()
        if token is None:
            return x * self._new_mask(x, x.shape[0])
        rows = current_rows()
        whole = token.state(self, lambda: self._new_mask(x, token.batch_size))
        mask = whole if rows is None else whole.index_select(0, rows)
        if mask.shape[0] != x.shape[0]:
            raise ValueError(
                f"VariationalDropout got a batch of {x.shape[0]} inside a solve of batch {token.batch_size}"
            )
        return x * mask
