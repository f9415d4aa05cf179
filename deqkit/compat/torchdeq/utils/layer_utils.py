"""How torchdeq's layer sees f: one tensor state, or a list of states flattened into one."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import Tensor

__all__ = ["DEQWrapper", "MDEQWrapper", "deq_decorator"]


class DEQWrapper:
    """``f`` on a tensor state; ``wrapper(z, tau)`` is the damped step ``tau f(z) + (1 - tau) z``."""

    def __init__(self, func: Callable, z_init=None):
        self.func = func

    def list2vec(self, z):
        return z

    def vec2list(self, z):
        return z

    def detach(self, z: Tensor) -> Tensor:
        return z.detach()

    def __call__(self, z: Tensor, tau: float = 1.0) -> Tensor:
        out = self.func(z)
        return out if tau == 1.0 else tau * out + (1 - tau) * z

    def norm_diff(self, z_new: Tensor, z_old: Tensor, **kwargs) -> Tensor:
        return (z_new - z_old).norm(p=1)


class MDEQWrapper(DEQWrapper):
    """``f(*states)`` on a list of states, seen as one (B, D) vector: each state flattened per
    sample and concatenated in order (``list2vec``), split back by ``vec2list``."""

    def __init__(self, func: Callable, z_init):
        super().__init__(func)
        self.z_shape = [z.shape for z in z_init]
        sizes = [0] + [(z.flatten(start_dim=1) if z.dim() >= 2 else z.reshape(z.numel(), 1))[0].numel() for z in z_init]
        self.z_indexing = np.cumsum(sizes)

    def list2vec(self, z_list) -> Tensor:
        return torch.cat([z.flatten(start_dim=1) if z.dim() >= 2 else z.reshape(z.numel(), 1) for z in z_list], dim=1)

    def vec2list(self, z: Tensor) -> list:
        cut = self.z_indexing
        return [z[:, cut[i]:cut[i + 1]].reshape(shape) for i, shape in enumerate(self.z_shape)]

    def __call__(self, z: Tensor, tau: float = 1.0) -> Tensor:
        out = self.list2vec(self.func(*self.vec2list(z)))
        return out if tau == 1.0 else tau * out + (1 - tau) * z

    def norm_diff(self, z_new, z_old, show_list: bool = False):  # type: ignore[override]
        if show_list:
            return [(a - b).norm(p=1).item() for a, b in zip(self.vec2list(z_new), self.vec2list(z_old))]
        return (z_new - z_old).norm(p=1).item()


def deq_decorator(func: Callable, z_init=None, no_stat: bool = True):
    """``(wrapper, state)`` for a tensor ``z_init`` or a list/tuple of tensors (flattened into
    one vector, so every solver and its statistics see the whole state)."""
    if torch.is_tensor(z_init):
        return DEQWrapper(func, z_init), z_init
    if not isinstance(z_init, (list, tuple)) or not all(torch.is_tensor(z) for z in z_init):
        raise TypeError(f"z_init must be a tensor or a list/tuple of tensors, got {type(z_init).__name__}")
    wrapper = MDEQWrapper(func, z_init)
    return wrapper, wrapper.list2vec(z_init)
