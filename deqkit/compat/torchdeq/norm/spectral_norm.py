"""torchdeq's spectral norm as a parametrisation: ``W = W_orig * g / sigma``.

``sigma = u^T W_orig v`` with ``u``, ``v`` from the power iteration; ``g`` is a learnable
per-output scale initialised to ``target_norm`` (or, with ``norm_no_scale``, the fixed
``target_norm``), optionally capped at ``clip_value``. As in torchdeq, the power iteration
advances by ``n_power_iterations`` steps at each ``reset_norm`` of a module in training mode,
so the same seed and the same calls give the same numbers. What differs: the weight is
normalised from the start (torchdeq's is the raw weight until the first ``reset_norm``), and
it is recomputed from the current parameters on every access, so it is never stale.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

__all__ = ["SpectralNorm"]


def _as_matrix(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """(out, ...) -> (out, rest) with ``dim`` first."""
    if dim != 0:
        weight = weight.permute(dim, *[d for d in range(weight.dim()) if d != dim])
    return weight.reshape(weight.shape[0], -1)


class _Spectral(nn.Module):
    def __init__(self, weight: torch.Tensor, dim: int, learn_scale: bool, target_norm: float, clip: bool,
                 clip_value: float, n_power_iterations: int, eps: float):
        super().__init__()
        self.dim, self.learn_scale, self.target_norm = dim, learn_scale, target_norm
        self.clip, self.clip_value, self.n_power_iterations, self.eps = clip, clip_value, n_power_iterations, eps
        h, w = _as_matrix(weight.detach(), dim).shape
        self.register_buffer("_u", F.normalize(weight.new_empty(h).normal_(0, 1), dim=0, eps=eps))
        self.register_buffer("_v", F.normalize(weight.new_empty(w).normal_(0, 1), dim=0, eps=eps))

    def forward(self, weight, g=None):
        sigma = torch.dot(self._u, torch.mv(_as_matrix(weight, self.dim), self._v))
        factor = (g if self.learn_scale else self.target_norm) / sigma
        if self.clip:
            factor = torch.minimum(self.clip_value * torch.ones_like(factor), factor)
        return weight * factor

    def right_inverse(self, weight):
        if not self.learn_scale:
            return weight
        shape = [s if i == self.dim else 1 for i, s in enumerate(weight.shape)]
        return weight, (self.target_norm * torch.ones(weight.shape[self.dim])).reshape(shape).to(weight)

    @torch.no_grad()
    def power_iteration(self, weight: torch.Tensor) -> None:
        mat = _as_matrix(weight, self.dim)
        u, v = self._u, self._v
        for _ in range(self.n_power_iterations):
            v = F.normalize(torch.mv(mat.t(), u), dim=0, eps=self.eps)
            u = F.normalize(torch.mv(mat, v), dim=0, eps=self.eps)
        self._u, self._v = u.clone(), v.clone()  # new tensors: graphs made earlier keep theirs


class SpectralNorm:
    """torchdeq's spectral norm: target modules, ``apply``, ``__call__`` (the reset), ``remove``."""

    _target_modules: dict = {
        nn.Linear: ("weight", 0), nn.Conv1d: ("weight", 0), nn.Conv2d: ("weight", 0), nn.Conv3d: ("weight", 0),
        nn.ConvTranspose1d: ("weight", 1), nn.ConvTranspose2d: ("weight", 1), nn.ConvTranspose3d: ("weight", 1),
    }

    def __init__(self, names, dims):
        self.names, self.dims = names, dims

    @classmethod
    def apply(cls, module: nn.Module, deq_args=None, names=None, dims=None, learn_scale: bool = True,
              target_norm: float = 1.0, clip: bool = False, clip_value: float = 1.0, n_power_iterations: int = 1,
              eps: float = 1e-12) -> "SpectralNorm":
        from ..utils.config import DEQConfig

        if names is None or dims is None:
            names, dims = cls._target_modules[type(module)]
        names = [names] if isinstance(names, str) else list(names)
        dims = [dims] if isinstance(dims, int) else list(dims)
        if len(names) != len(dims):
            raise ValueError(f"names {names} and dims {dims} must have the same length")
        args = deq_args if deq_args is not None else DEQConfig()
        learn_scale = not args.get("norm_no_scale", not learn_scale)
        target_norm = args.get("norm_target_norm", target_norm)
        clip = args.get("norm_clip", clip)
        clip_value = args.get("norm_clip_value", clip_value)
        n_power_iterations = args.get("sn_n_power_iters", n_power_iterations)
        if isinstance(n_power_iterations, bool) or not isinstance(n_power_iterations, int) or n_power_iterations < 1:
            raise ValueError(f"n_power_iterations must be an integer >= 1, got {n_power_iterations!r}")
        for name, dim in zip(names, dims):
            if parametrize.is_parametrized(module, name):
                raise ValueError(f"{type(module).__name__}.{name} is already normalised; call remove_norm first")
            weight = getattr(module, name)
            param = _Spectral(weight, dim, learn_scale, target_norm, clip, clip_value, n_power_iterations, eps)
            parametrize.register_parametrization(module, name, param, unsafe=True)
        return cls(names, dims)

    def __call__(self, module: nn.Module) -> None:
        """torchdeq's reset: advance the power iteration (in training mode only)."""
        if not module.training:
            return
        for name in self.names:
            plist = module.parametrizations[name]
            plist[0].power_iteration(plist.original0 if hasattr(plist, "original0") else plist.original)

    def remove(self, module: nn.Module) -> None:
        for name in self.names:
            parametrize.remove_parametrizations(module, name, leave_parametrized=True)
