"""torchdeq's weight and spectral normalisation, with torchdeq's parameter names and numbers.

``apply_norm(model, 'weight_norm')`` replaces the weight of every ``nn.Linear``,
``nn.Conv1d/2d/3d`` (norm over dim 0) and ``nn.ConvTranspose1d/2d/3d`` (dim 1) by torchdeq's
``weight_g`` (learnt scale; none with ``norm_no_scale``) and ``weight_v``:
``W = v * min(clip_value, g / ||v||)``; ``'spectral_norm'`` by ``weight_orig``, ``weight_g`` and
the power iteration's buffers ``weight_u``/``weight_v``: ``W = W_orig * g / sigma``. So
``named_parameters()``, ``state_dict()`` and their order are torchdeq's. ``module.weight`` is
computed when read, as torchdeq's ``reset_norm`` computes it, and reused until the next reset, a
change of the parameters or a backward through it: never stale, deep-copyable, picklable. A
write into it lands where torchdeq's lands (docs/migrating.md).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn import functional as F

from .utils import DEQConfig, warn_once

__all__ = ["apply_norm", "reset_norm", "remove_norm", "register_norm", "register_norm_module", "WeightNorm",
           "SpectralNorm"]

_TARGETS = {nn.Linear: ("weight", 0), nn.Conv1d: ("weight", 0), nn.Conv2d: ("weight", 0), nn.Conv3d: ("weight", 0),
            nn.ConvTranspose1d: ("weight", 1), nn.ConvTranspose2d: ("weight", 1), nn.ConvTranspose3d: ("weight", 1)}


def _norm(p, dim):
    """The L2 norm of ``p`` over every dim but ``dim`` (None: the whole tensor), broadcastable."""
    if dim is None:
        return p.norm()
    if dim == 0:
        return p.contiguous().view(p.size(0), -1).norm(dim=1).view(p.size(0), *[1] * (p.dim() - 1))
    if dim == p.dim() - 1:
        return p.contiguous().view(-1, p.size(-1)).norm(dim=0).view(*[1] * (p.dim() - 1), p.size(-1))
    return _norm(p.transpose(0, dim), 0).transpose(0, dim)


def _matrix(weight, dim):
    if dim != 0:
        weight = weight.permute(dim, *[d for d in range(weight.dim()) if d != dim])
    return weight.reshape(weight.shape[0], -1)


_classes: dict = {}


def _rebuild(base, names, state):
    module = object.__new__(_normed_class(base, names))
    module.__setstate__(state)
    return module


def _normed_class(base, names):
    """A subclass of ``base`` (same name) whose ``names`` are read through the module's norm."""
    key = (base, tuple(names))
    if key not in _classes:
        def reduce(self, protocol):  # pickle and deepcopy rebuild the subclass from its base
            state = {k: v for k, v in self.__getstate__().items() if not k.startswith("_deq_w_")}
            return _rebuild, (base, tuple(names), state)

        attrs = {name: property(lambda m, n=name: m._deq_norm.weight(m, n),  # type: ignore[misc]
                                lambda m, w, n=name: m._deq_norm.assigned(m, n, w))  # type: ignore[misc]
                 for name in names}
        _classes[key] = type(base.__name__, (base,), dict(attrs, _deq_base=base, __reduce_ex__=reduce))
    return _classes[key]


class _Norm:
    """What weight and spectral norm share: options, the weight read from the parameters, writes
    into it, reset and removal."""

    _target_modules: dict = {}

    def __init__(self, names, dims, learn_scale=True, target_norm=1.0, clip=False, clip_value=1.0):
        self.names, self.dims = names, dims
        self.learn_scale, self.target_norm, self.clip, self.clip_value = learn_scale, target_norm, clip, clip_value
        self.resets = 0

    @classmethod
    def _setup(cls, module, deq_args, names, dims, learn_scale, target_norm, clip, clip_value):
        """``(names, dims, options)``, the options from ``deq_args`` where it has them, as in torchdeq."""
        if names is None or dims is None:
            names, dims = cls._target_modules[type(module)]
        names = [names] if isinstance(names, str) else list(names)
        dims = [dims] if isinstance(dims, int) or dims is None else list(dims)
        if len(names) != len(dims):
            raise ValueError(f"names {names} and dims {dims} differ in length (torchdeq fails with an AssertionError)")
        args = DEQConfig(deq_args)
        return names, dims, dict(learn_scale=not args.get("norm_no_scale", not learn_scale), clip=args.get("norm_clip", clip),
                                 target_norm=args.get("norm_target_norm", target_norm),
                                 clip_value=args.get("norm_clip_value", clip_value)), args

    def _install(self, module, register):
        """Replace each weight by ``register(name, dim, weight)``'s parameters; reads go through self."""
        for name, dim in zip(self.names, self.dims):
            register(name, dim, module._parameters.pop(name))
        module._deq_norm = self
        module.__class__ = _normed_class(type(module), self.names)
        return self

    def compute(self, module, name, dim):
        raise NotImplementedError

    def _scale(self, module, name, denom):
        factor = (getattr(module, name + "_g") if self.learn_scale else self.target_norm) / denom
        if self.clip:
            factor = torch.minimum(self.clip_value * torch.ones_like(factor), factor)
        return factor

    def weight(self, module, name):
        """The normalised ``name`` of ``module``, as torchdeq's ``reset_norm`` computes it (with its
        graph), reused until a reset, a change of the parameters, or a backward pass through it."""
        entry = module.__dict__.get("_deq_w_" + name)  # (w, its version, a copy, the parameters' stamp, used)
        if entry is not None:
            written = entry[0]._version != entry[1]  # an in-place write: used until the next reset, as in torchdeq
            if not entry[4] and entry[3] == self._stamp(module, name) and (not written or self.keeps_writes()):
                return entry[0]
            self.flush(module, name)
        inference = torch.is_inference_mode_enabled()
        with contextlib.nullcontext() if inference else torch.enable_grad():
            w = self.compute(module, name, self.dims[self.names.index(name)])
        if not inference:
            self._hand_out(module, name, w)
        return w

    def _hand_out(self, module, name, w):
        used: list = []
        if w.requires_grad:
            w.register_hook(lambda grad: used.append(True))  # its graph is gone after this backward
        module.__dict__["_deq_w_" + name] = (w, w._version, w.detach().clone(), self._stamp(module, name), used)

    def keeps_writes(self):
        """Whether an in-place write into the weight handed out stays in it until the next reset."""
        return True

    def _stamp(self, module, name):  # the tensors the weight is computed from, as they are now
        return [(id(t), t.dtype, t.device, t._version) for k, t in [*module._parameters.items(), *module._buffers.items()]
                if k.startswith(name + "_") and t is not None]

    def assigned(self, module, name, value):
        """``module.name = value``: ``value`` (with its graph) is the weight until the next reset,
        as torchdeq's attribute is (IGNN projects its weight so after each ``reset_norm``)."""
        self.flush(module, name)
        if not torch.is_tensor(value):
            raise TypeError(f"{type(module).__name__}.{name} must be a tensor, got {type(value).__name__}")
        self._hand_out(module, name, value)

    def flush(self, module, *names):
        """Forget the weights handed out (all, or ``names``), acting on writes into them since."""
        for name in names or self.names:
            entry = module.__dict__.pop("_deq_w_" + name, None)
            if entry is not None and (entry[0]._version != entry[1] or
                                      not torch.allclose(entry[0].detach(), entry[2], rtol=0, atol=0, equal_nan=True)):
                self.written(module, name, entry[0].detach())  # (the second test catches writes through .data)

    def written(self, module, name, value):
        warn_once(f"a write into {type(module).__name__}.{name} after apply_norm is dropped, as torchdeq drops it at "
                  f"the next reset_norm: write {name}_v or {name}_g (weight norm) or {name}_orig (spectral norm), "
                  "or initialise before apply_norm", stacklevel=5)

    def __call__(self, module):
        """torchdeq's reset (``reset_norm``): nothing to recompute; spectral norm overrides it."""
        self.flush(module)
        self.resets += 1

    def remove(self, module):
        """A plain parameter with the current normalised value for each name, as in torchdeq."""
        self.flush(module)
        with torch.no_grad():
            weights = [self.compute(module, name, dim) for name, dim in zip(self.names, self.dims)]
        module.__class__ = module._deq_base
        for name, weight in zip(self.names, weights):
            for part in ("_g", "_v", "_orig", "_u"):
                module._parameters.pop(name + part, None)
                module._buffers.pop(name + part, None)
            module.register_parameter(name, nn.Parameter(weight.detach()))


class WeightNorm(_Norm):
    """torchdeq's weight norm: ``W = v * min(clip_value, g / ||v||)`` (``g`` learnt, or
    ``target_norm`` with ``learn_scale=False``)."""

    _target_modules = dict(_TARGETS)

    def compute(self, module, name, dim):
        v = getattr(module, name + "_v")
        return v * self._scale(module, name, _norm(v, dim))

    @classmethod
    def apply(cls, module, deq_args=None, names=None, dims=None, learn_scale=True, target_norm=1.0, clip=False,
              clip_value=1.0):
        names, dims, options, _ = cls._setup(module, deq_args, names, dims, learn_scale, target_norm, clip, clip_value)
        fn = cls(names, dims, **options)

        def register(name, dim, weight):
            if fn.learn_scale:
                module.register_parameter(name + "_g", nn.Parameter(_norm(weight, dim).data))
            module.register_parameter(name + "_v", nn.Parameter(weight.data))

        return fn._install(module, register)


class SpectralNorm(_Norm):
    """torchdeq's spectral norm: ``W = W_orig * min(clip_value, g / sigma)``, ``sigma = u^T W v``
    from a power iteration advanced by ``n_power_iterations`` steps at each ``reset_norm`` of a
    module in training mode (``u``, ``v`` drawn from torch's global generator at ``apply``)."""

    _target_modules = dict(_TARGETS)

    def __init__(self, names, dims, learn_scale=True, target_norm=1.0, clip=False, clip_value=1.0,
                 n_power_iterations=1, eps=1e-12):
        super().__init__(names, dims, learn_scale, target_norm, clip, clip_value)
        if n_power_iterations <= 0:
            raise ValueError(f"Expected n_power_iterations to be positive, but got n_power_iterations={n_power_iterations}")
        self.n_power_iterations, self.eps = n_power_iterations, eps

    def compute(self, module, name, dim):
        weight = getattr(module, name + "_orig")
        u, v = getattr(module, name + "_u").clone(), getattr(module, name + "_v").clone()
        return weight * self._scale(module, name, torch.dot(u, torch.mv(_matrix(weight, dim), v)))

    def keeps_writes(self):  # torchdeq's weight is weight_orig's data until the first reset_norm
        return self.resets > 0

    def written(self, module, name, value):
        if self.resets:
            super().written(module, name, value)
        else:  # torchdeq's weight is weight_orig's data until the first reset_norm
            getattr(module, name + "_orig").data.copy_(value)

    def __call__(self, module):
        super().__call__(module)
        if module.training:
            with torch.no_grad():
                for name, dim in zip(self.names, self.dims):
                    mat, u, v = _matrix(getattr(module, name + "_orig"), dim), getattr(module, name + "_u"), getattr(module, name + "_v")
                    for _ in range(self.n_power_iterations):
                        v.copy_(F.normalize(torch.mv(mat.t(), u), dim=0, eps=self.eps))
                        u.copy_(F.normalize(torch.mv(mat, v), dim=0, eps=self.eps))

    @classmethod
    def apply(cls, module, deq_args=None, names=None, dims=None, learn_scale=True, target_norm=1.0, clip=False,
              clip_value=1.0, n_power_iterations=1, eps=1e-12):
        names, dims, options, args = cls._setup(module, deq_args, names, dims, learn_scale, target_norm, clip, clip_value)
        fn = cls(names, dims, **options, n_power_iterations=args.get("sn_n_power_iters", n_power_iterations), eps=eps)

        def register(name, dim, weight):
            h, w = _matrix(weight.detach(), dim).shape
            u = F.normalize(weight.new_empty(h).normal_(0, 1), dim=0, eps=fn.eps)
            v = F.normalize(weight.new_empty(w).normal_(0, 1), dim=0, eps=fn.eps)
            module.register_parameter(name + "_orig", weight)
            if fn.learn_scale:
                shape = [s if i == dim else 1 for i, s in enumerate(weight.shape)]
                module.register_parameter(name + "_g", nn.Parameter((fn.target_norm * torch.ones(h)).reshape(shape)))
            module.register_buffer(name + "_u", u)
            module.register_buffer(name + "_v", v)

        return fn._install(module, register)


_norm_class: dict = {"weight_norm": WeightNorm, "spectral_norm": SpectralNorm}


def register_norm(norm_type, norm_class):
    """Register a norm class (with ``apply``, ``remove`` and ``_target_modules``) as ``norm_type``."""
    _norm_class[norm_type] = norm_class


def register_norm_module(module_class, norm_type, names="weight", dims=0):
    """Make ``norm_type`` apply to ``module_class`` (its parameter ``names`` over ``dims``)."""
    _norm_class[norm_type]._target_modules[module_class] = (names, dims)


def apply_norm(model, norm_type="weight_norm", prefix_filter_out=None, filter_out=None, args=None, **norm_kwargs):
    """Normalise every supported submodule of ``model`` in place, as torchdeq does.

    Skips submodules whose name starts with a ``prefix_filter_out`` entry or contains a
    ``filter_out`` entry (a string or a list). ``args`` (torchdeq's config: ``norm_type``,
    ``norm_no_scale``, ``norm_target_norm``, ``norm_clip``, ``norm_clip_value``,
    ``sn_n_power_iters``) wins over ``norm_type`` and over ``norm_kwargs`` (``learn_scale``,
    ``target_norm``, ``clip``, ``clip_value``, ``names``, ``dims``, and for spectral norm
    ``n_power_iterations``, ``eps``). ``'none'`` does nothing.

    Example:
        >>> import torch
        >>> from deqkit.compat.torchdeq import apply_norm
        >>> net = torch.nn.Linear(3, 3)
        >>> w = net.weight.detach().clone()
        >>> apply_norm(net)
        >>> [name for name, _ in net.named_parameters()], torch.allclose(net.weight, w)
        (['bias', 'weight_g', 'weight_v'], True)
    """
    args = DEQConfig(args)
    args.config.update(norm_kwargs)  # torchdeq keeps them in args (and so in a namespace given as args)
    norm_type = args.get("norm_type", norm_type)
    if norm_type == "none":
        return
    if norm_type not in _norm_class:
        raise ValueError(f"unknown norm_type {norm_type!r}; registered: {sorted(_norm_class)} "
                         "(torchdeq fails with an AssertionError)")
    norm = _norm_class[norm_type]
    prefixes = [prefix_filter_out] if isinstance(prefix_filter_out, str) else prefix_filter_out or []
    parts = [filter_out] if isinstance(filter_out, str) else filter_out or []
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in prefixes) or any(p in name for p in parts):
            continue
        if hasattr(module, "_deq_norm") and getattr(module, "_deq_base", type(module)) in norm._target_modules:
            raise ValueError(f"{name or type(module).__name__} is already normalised (torchdeq fails with a KeyError); "
                             "call remove_norm first")
        if type(module) in norm._target_modules:
            module._deq_norm = norm.apply(module, deq_args=args, **norm_kwargs)


def reset_norm(model):
    """torchdeq's per-step reset of every normalised submodule: advances spectral norm's power
    iteration in training mode (the weights themselves are always current here)."""
    for module in model.modules():
        if hasattr(module, "_deq_norm"):
            module._deq_norm(module)


def remove_norm(model):
    """Replace every normalised weight by a plain parameter holding its current value."""
    for module in model.modules():
        if hasattr(module, "_deq_norm"):
            module._deq_norm.remove(module)
            del module._deq_norm
