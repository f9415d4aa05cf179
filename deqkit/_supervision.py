"""Fixed-point correction: a loss on several iterates of the solve (deep supervision)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor


def fp_weights(n: int, gamma: float = 0.8) -> list[float]:
    """The weights ``gamma^(n-1-i)`` of iterates ``i = 0 .. n-1`` (the last gets 1)."""
    return [gamma ** (n - 1 - i) for i in range(n)]


def fp_correction(
    loss_fn: Callable[[Tensor], Tensor],
    trajectory: Sequence[Tensor],
    gamma: float = 0.8,
) -> Tensor:
    """Weighted sum of ``loss_fn(z_i)`` over the iterates, weight ``gamma^(n-1-i)``.

    The fixed-point correction of Bai et al. (2022) as GET uses it: every iterate kept by
    ``fixed_point(..., trajectory=n)`` (or a backward mode's own steps) gets the loss, the
    later ones more (gamma = 0.8 over 6 iterates: 0.328, 0.410, 0.512, 0.64, 0.8, 1.0).
    ``loss_fn`` maps an iterate to a scalar loss (decode it first if needed).

    Example:
        >>> import torch, deqkit
        >>> traj = [torch.full((2,), float(i)) for i in range(3)]
        >>> deqkit.fp_correction(lambda z: z.mean(), traj, gamma=0.5)  # 0.25*0 + 0.5*1 + 1*2
        tensor(2.5000)
    """
    if len(trajectory) == 0:
        raise ValueError("trajectory is empty: ask fixed_point for iterates with trajectory=n")
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 < gamma <= 1:
        raise ValueError(f"gamma must be a number in (0, 1], got {gamma!r}")
    total: Tensor | None = None
    for weight, z in zip(fp_weights(len(trajectory), gamma), trajectory):
        loss = loss_fn(z)
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            raise ValueError(f"loss_fn must return a scalar tensor, got {type(loss).__name__} of shape {getattr(loss, 'shape', None)}")
        total = weight * loss if total is None else total + weight * loss
    assert total is not None  # the trajectory is not empty
    return total
