"""torchdeq's variational dropout: one mask per solve, kept until ``reset_dropout``.

A module draws its mask at its first training call after a reset and reuses it for every
call of f in the solve, so f stays one fixed map. ``...Dropout{1,2,3}d`` share a mask across
tokens (one value per sample and channel), ``...DropToken{1,2,3}d`` across channels (one value
per sample and position); ``token_first`` says whether the channel dim is last (True) or
second. Masks are drawn from torch's global generator on the CPU in the default dtype, as in
torchdeq, so the same seed gives the same masks; unlike torchdeq they are then moved to the
input's device.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["VariationalDropout", "VariationalDropout1d", "VariationalDropout2d", "VariationalDropout3d",
           "VariationalDropToken1d", "VariationalDropToken2d", "VariationalDropToken3d", "reset_dropout"]


class _VariationalDropoutNd(nn.Module):
    """Base: ``mask_shape(x)`` says which dims get their own mask value (the rest are 1)."""

    spatial: int | None = None  # dims after (batch, channel); None: any shape, elementwise mask
    per_token = False

    def __init__(self, dropout: float = 0.5, token_first: bool = True):
        super().__init__()
        if not 0 <= dropout <= 1:
            raise ValueError(f"dropout probability has to be between 0 and 1, but got {dropout}")
        self.dropout = dropout
        self.token_first = token_first
        self.mask: Tensor | None = None

    def extra_repr(self) -> str:
        return f"dropout={self.dropout}"

    def mask_shape(self, shape) -> list:
        if self.spatial is None:
            return list(shape)
        if len(shape) != self.spatial + 2:
            raise ValueError(f"{type(self).__name__} expects a {self.spatial + 2}-D input, got shape {tuple(shape)}")
        channel = len(shape) - 1 if self.token_first else 1
        keep = [d for d in range(len(shape)) if (d != channel) == self.per_token or d == 0]
        return [shape[d] if d in keep else 1 for d in range(len(shape))]

    def reset_mask(self, x: Tensor) -> None:
        m = torch.zeros(*self.mask_shape(x.shape)).bernoulli_(1 - self.dropout)
        self.mask = (m / (1 - self.dropout)).to(x.device)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.dropout == 0.0:
            return x
        if self.mask is None:
            self.reset_mask(x)
        assert self.mask is not None
        return self.mask.expand_as(x) * x


class VariationalDropout(_VariationalDropoutNd):
    """One mask value per element of the input."""

    def __init__(self, dropout: float = 0.5):
        super().__init__(dropout)


class VariationalDropout1d(_VariationalDropoutNd):
    """(B, L, D) (or (B, D, L)): one value per sample and channel."""

    spatial = 1


class VariationalDropout2d(_VariationalDropoutNd):
    """(B, H, W, D) (or (B, D, H, W)): one value per sample and channel."""

    spatial = 2


class VariationalDropout3d(_VariationalDropoutNd):
    """(B, T, H, W, D) (or (B, D, T, H, W)): one value per sample and channel."""

    spatial = 3


class VariationalDropToken1d(_VariationalDropoutNd):
    """(B, L, D) (or (B, D, L)): one value per sample and token."""

    spatial, per_token = 1, True


class VariationalDropToken2d(_VariationalDropoutNd):
    """(B, H, W, D) (or (B, D, H, W)): one value per sample and position."""

    spatial, per_token = 2, True


class VariationalDropToken3d(_VariationalDropoutNd):
    """(B, T, H, W, D) (or (B, D, T, H, W)): one value per sample and position."""

    spatial, per_token = 3, True


def reset_dropout(model: nn.Module) -> None:
    """Forget every variational dropout mask in ``model``: the next training call draws anew."""
    for module in model.modules():
        if isinstance(module, _VariationalDropoutNd):
            module.mask = None
