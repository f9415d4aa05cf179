"""``mixed_init``: the half-zero random start for path-independent DEQs."""

from __future__ import annotations

import torch

__all__ = ["mixed_init"]


def mixed_init(z_shape, device=None) -> torch.Tensor:
    """A tensor of shape ``z_shape``: standard normal entries, each zeroed with probability 1/2
    (Anil et al. 2022, "Path independent equilibrium models can better exploit test-time
    computation"). Draws from torch's global generator as torchdeq does."""
    z = torch.randn(*z_shape, device=device)
    keep = torch.zeros_like(z).bernoulli_(0.5)
    return z * keep
