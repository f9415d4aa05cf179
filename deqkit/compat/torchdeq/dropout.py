"""torchdeq's variational dropout: one mask per training step, kept until ``reset_dropout``.

A module draws its mask at its first training call after a reset and reuses it for every call
of f, so f stays one fixed map. ``...Dropout{1,2,3}d`` share a value across positions (one per
sample and channel), ``...DropToken{1,2,3}d`` across channels (one per sample and position);
``token_first`` puts the channel dim last (True) or second. Masks come from torch's global
generator on the CPU in the default dtype, as in torchdeq (same seed, same masks), and are then
moved to the input's device (torchdeq's stay on the CPU: a crash for a GPU input).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["VariationalDropout", "VariationalDropout1d", "VariationalDropout2d", "VariationalDropout3d",
           "VariationalDropToken1d", "VariationalDropToken2d", "VariationalDropToken3d", "reset_dropout"]


class _VariationalDropoutNd(nn.Module):
    spatial = None  # dims after (batch, channel); None: any shape, one value per element
    per_token = False

    def __init__(self, dropout=0.5, token_first=True):
        super().__init__()
        if not 0 <= dropout <= 1:
            raise ValueError(f"dropout probability has to be between 0 and 1, but got {dropout}")
        self.dropout, self.token_first, self.mask = dropout, token_first, None

    def extra_repr(self):
        return f"dropout={self.dropout}"

    def reset_mask(self, x):
        shape = list(x.shape)
        if self.spatial is not None:
            if len(shape) != self.spatial + 2:
                raise ValueError(f"{type(self).__name__} expects a {self.spatial + 2}-D input, got shape {tuple(shape)}")
            channel = len(shape) - 1 if self.token_first else 1
            shape = [s if d == 0 or (d == channel) != self.per_token else 1 for d, s in enumerate(shape)]
        self.mask = (torch.zeros(*shape).bernoulli_(1 - self.dropout) / (1 - self.dropout)).to(x.device)

    def forward(self, x):
        if not self.training or self.dropout == 0.0:
            return x
        if self.mask is None:
            self.reset_mask(x)
        return self.mask.expand_as(x) * x


class VariationalDropout(_VariationalDropoutNd):
    """One mask value per element of the input."""

    def __init__(self, dropout=0.5):
        super().__init__(dropout)


def _variant(name, spatial, per_token):
    what = "position" if per_token else "channel"
    doc = f"{spatial}-D inputs (B, ..., D) or (B, D, ...): one mask value per sample and {what}."
    return type(name, (_VariationalDropoutNd,), dict(spatial=spatial, per_token=per_token, __doc__=doc,
                                                     __module__=__name__, __qualname__=name))


VariationalDropout1d, VariationalDropout2d, VariationalDropout3d = (_variant(f"VariationalDropout{n}d", n, False)
                                                                    for n in (1, 2, 3))
VariationalDropToken1d, VariationalDropToken2d, VariationalDropToken3d = (_variant(f"VariationalDropToken{n}d", n, True)
                                                                          for n in (1, 2, 3))


def reset_dropout(model):
    """Forget every variational dropout mask in ``model``: the next training call draws anew."""
    for module in model.modules():
        if isinstance(module, _VariationalDropoutNd):
            module.mask = None
