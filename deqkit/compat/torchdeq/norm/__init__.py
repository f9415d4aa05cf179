"""torchdeq's weight normalisation, as a torch parametrisation (always current, no reset).

``apply_norm(model, 'weight_norm')`` re-parametrises the weight of every ``nn.Linear``,
``nn.Conv1d/2d/3d`` (norm over dim 0) and ``nn.ConvTranspose1d/2d/3d`` (dim 1) as torchdeq
does: ``W = v * g / ||v||`` with a learnable scale ``g`` (initialised to ``||W||``) or, with
``norm_no_scale``, ``W = v * target_norm / ||v||``; with ``norm_clip`` the factor is capped at
``norm_clip_value``. Numbers and gradients are torchdeq's.

What differs: the weight is recomputed on every access (torch.nn.utils.parametrize), so it
is never stale after ``.to()``, a model deep-copies, and forgetting ``reset_norm`` cannot
raise "backward through the graph a second time" (``reset_norm`` is kept as a no-op). The
parameters are ``parametrizations.weight.original0`` (g) and ``...original1`` (v) rather than
``weight_g``/``weight_v``.

``apply_norm(model, 'spectral_norm')`` is torchdeq's spectral norm (see ``spectral_norm``);
its parameters are ``parametrizations.weight.original0`` (the weight) and ``...original1``
(g), and ``reset_norm`` advances its power iteration, as in torchdeq.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..utils.config import DEQConfig
from .spectral_norm import SpectralNorm

__all__ = ["apply_norm", "reset_norm", "remove_norm", "register_norm", "register_norm_module", "WeightNorm", "SpectralNorm",
           "torchdeq_state_dict"]


def _norm(p: torch.Tensor, dim) -> torch.Tensor:
    """L2 norm of p over every dim but ``dim`` (None: the whole tensor), kept broadcastable."""
    if dim is None:
        return p.norm()
    moved = p.transpose(0, dim)
    out = moved.reshape(moved.shape[0], -1).norm(dim=1).reshape((moved.shape[0],) + (1,) * (p.dim() - 1))
    return out.transpose(0, dim)


class _Scaled(nn.Module):
    """``W = v * min(clip_value, scale / ||v||)`` with ``scale = g`` (learnt) or ``target_norm``."""

    def __init__(self, dim, learn_scale: bool, target_norm: float, clip: bool, clip_value: float):
        super().__init__()
        self.dim, self.learn_scale = dim, learn_scale
        self.target_norm, self.clip, self.clip_value = target_norm, clip, clip_value

    def forward(self, *tensors):
        v = tensors[-1]
        factor = (tensors[0] if self.learn_scale else self.target_norm) / _norm(v, self.dim)
        if self.clip:
            factor = torch.minimum(self.clip_value * torch.ones_like(factor), factor)
        return v * factor

    def right_inverse(self, weight):
        return (_norm(weight, self.dim).detach().clone(), weight) if self.learn_scale else weight


class WeightNorm:
    """torchdeq's weight norm: the modules it applies to and how (``_target_modules``)."""

    _target_modules: dict = {
        nn.Linear: ("weight", 0), nn.Conv1d: ("weight", 0), nn.Conv2d: ("weight", 0), nn.Conv3d: ("weight", 0),
        nn.ConvTranspose1d: ("weight", 1), nn.ConvTranspose2d: ("weight", 1), nn.ConvTranspose3d: ("weight", 1),
    }

    def __init__(self, names, dims):
        self.names, self.dims = names, dims

    @classmethod
    def apply(cls, module: nn.Module, deq_args=None, names=None, dims=None, learn_scale: bool = True,
              target_norm: float = 1.0, clip: bool = False, clip_value: float = 1.0) -> "WeightNorm":
        if names is None or dims is None:
            names, dims = cls._target_modules[type(module)]
        names = [names] if isinstance(names, str) else list(names)
        dims = [dims] if isinstance(dims, int) or dims is None else list(dims)
        if len(names) != len(dims):
            raise ValueError(f"names {names} and dims {dims} must have the same length")
        args = deq_args if deq_args is not None else DEQConfig()
        learn_scale = not args.get("norm_no_scale", not learn_scale)
        target_norm = args.get("norm_target_norm", target_norm)
        clip = args.get("norm_clip", clip)
        clip_value = args.get("norm_clip_value", clip_value)
        for name, dim in zip(names, dims):
            if parametrize.is_parametrized(module, name):
                raise ValueError(f"{type(module).__name__}.{name} is already normalised; call remove_norm first")
            parametrize.register_parametrization(module, name, _Scaled(dim, learn_scale, target_norm, clip, clip_value),
                                                 unsafe=True)
        return cls(names, dims)

    def __call__(self, module: nn.Module) -> None:
        """Nothing to do: the parametrised weight is recomputed on access."""
        return None

    def remove(self, module: nn.Module) -> None:
        for name in self.names:
            parametrize.remove_parametrizations(module, name, leave_parametrized=True)


_norm_class: dict[str, Any] = {"weight_norm": WeightNorm, "spectral_norm": SpectralNorm}


def register_norm(norm_type: str, norm_class) -> None:
    """Register a norm class (with ``apply``, ``remove`` and ``_target_modules``)."""
    _norm_class[norm_type] = norm_class


def register_norm_module(module_class: type, norm_type: str, names="weight", dims=0) -> None:
    """Make ``norm_type`` apply to ``module_class`` (its parameter ``names`` over ``dims``)."""
    if norm_type not in _norm_class:
        raise ValueError(f"unknown norm_type {norm_type!r}; registered: {sorted(_norm_class)}")
    _norm_class[norm_type]._target_modules[module_class] = (names, dims)


def apply_norm(model: nn.Module, norm_type: str = "weight_norm", prefix_filter_out=None, filter_out=None,
               args=None, **norm_kwargs) -> None:
    """Normalise every supported submodule of ``model`` in place.

    Skips submodules whose name starts with a ``prefix_filter_out`` entry or contains a
    ``filter_out`` entry (a string or a list). ``args`` (torchdeq's config: ``norm_type``,
    ``norm_no_scale``, ``norm_target_norm``, ``norm_clip``, ``norm_clip_value``) wins over
    ``norm_type`` and over ``norm_kwargs`` (``learn_scale``, ``target_norm``, ``clip``,
    ``clip_value``, ``names``, ``dims``). ``'none'`` does nothing.

    Example:
        >>> import torch
        >>> from deqkit.compat.torchdeq import apply_norm, remove_norm
        >>> net = torch.nn.Linear(3, 3)
        >>> w = net.weight.detach().clone()
        >>> apply_norm(net)
        >>> torch.allclose(net.weight, w)
        True
        >>> remove_norm(net)
    """
    config = DEQConfig(args)
    norm_type = config.get("norm_type", norm_type)
    if norm_type == "none":
        return
    if norm_type not in _norm_class:
        raise ValueError(f"unknown norm_type {norm_type!r}; registered: {sorted(_norm_class)}")
    norm = _norm_class[norm_type]
    prefixes = [prefix_filter_out] if isinstance(prefix_filter_out, str) else list(prefix_filter_out or [])
    parts = [filter_out] if isinstance(filter_out, str) else list(filter_out or [])
    for name, module in list(model.named_modules()):
        if any(name.startswith(p) for p in prefixes) or any(p in name for p in parts):
            continue
        if type(module) in norm._target_modules:
            module._deq_norm = norm.apply(module, deq_args=config, **norm_kwargs)
            module._deq_norm_hook = module.register_load_state_dict_pre_hook(_load_torchdeq_keys)


def _torchdeq_key_map(norm, name: str, keys) -> dict[str, str]:
    """torchdeq's state_dict keys for ``name`` (relative to the module) -> this layer's keys."""
    base = f"parametrizations.{name}."
    scaled = f"{name}_g" in keys
    if isinstance(norm, SpectralNorm):
        return {f"{name}_orig": base + ("original0" if scaled else "original"), f"{name}_g": base + "original1",
                f"{name}_u": base + "0._u", f"{name}_v": base + "0._v"}
    return {f"{name}_g": base + "original0", f"{name}_v": base + ("original1" if scaled else "original")}


def _load_torchdeq_keys(module, state_dict, prefix, *_):
    """load_state_dict pre-hook: rename torchdeq's keys (``weight_g``/``weight_v``, or spectral
    norm's ``weight_orig``/``weight_g``/``weight_u``/``weight_v``) to the parametrisation's."""
    norm = getattr(module, "_deq_norm", None)
    if norm is None:
        return
    for name in norm.names:
        local = {k[len(prefix):] for k in state_dict if k.startswith(prefix)}
        for old, new in _torchdeq_key_map(norm, name, local).items():
            if old in local and prefix + new not in state_dict:
                value = state_dict.pop(prefix + old)
                target = module.get_parameter(new) if "._" not in new else module.get_buffer(new)
                state_dict[prefix + new] = value.reshape(target.shape) if value.numel() == target.numel() else value


def torchdeq_state_dict(model: nn.Module) -> dict:
    """``model.state_dict()`` with torchdeq's key names for the normalised weights, so a model
    normalised by torchdeq's ``apply_norm`` can load it (the reverse of the load hook)."""
    state = model.state_dict()
    for mod_name, module in model.named_modules():
        norm = getattr(module, "_deq_norm", None)
        if norm is None:
            continue
        prefix = mod_name + "." if mod_name else ""
        for name in norm.names:
            local = {k[len(prefix):] for k in state if k.startswith(prefix)}
            scaled = f"parametrizations.{name}.original0" in local
            mapping = _torchdeq_key_map(norm, name, {f"{name}_g"} if scaled else set())
            for old, new in mapping.items():
                if new in local:
                    state[prefix + old] = state.pop(prefix + new)
    return state


def reset_norm(model: nn.Module) -> None:
    """torchdeq's per-iteration reset: advances spectral norm's power iteration (training mode);
    nothing else to do, since normalised weights are always current."""
    for module in model.modules():
        if hasattr(module, "_deq_norm"):
            module._deq_norm(module)


def remove_norm(model: nn.Module) -> None:
    """Replace every normalised weight by a plain parameter holding its current value."""
    for module in model.modules():
        if hasattr(module, "_deq_norm"):
            module._deq_norm.remove(module)
            del module._deq_norm
            if hasattr(module, "_deq_norm_hook"):
                module._deq_norm_hook.remove()
                del module._deq_norm_hook
