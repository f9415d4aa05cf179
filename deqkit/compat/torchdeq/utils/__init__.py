"""torchdeq's utilities: its configuration, ``add_deq_args``, ``mixed_init``, ``mem_gc``, the state wrappers.

``DEQConfig`` is torchdeq's: a dict, an argparse namespace (shared: keyword updates land in it)
or an object. A program's own flags (DEQ-Flow's ``--gma``) pass silently; what torchdeq ignores
but was probably meant for it (a keyword it does not read, a key spelt like an option, with
its prefix: ``f_thres``) is ignored with one warning naming the closest option.
"""

from __future__ import annotations

import argparse
import difflib
import warnings

import numpy as np
import torch

from .mem import mem_gc

__all__ = ["add_deq_args", "mem_gc", "mixed_init", "DEQConfig", "DEQWrapper", "MDEQWrapper", "SpeedyMDEQWrapper",
           "deq_decorator", "TorchDEQCompatWarning"]

_SOLVERS = ["anderson", "broyden", "fixed_point_iter", "simple_fixed_point_iter"]
# torchdeq's command-line options (flag, argparse keywords), in its order
_OPTIONS = [
    ("f_solver", dict(default="fixed_point_iter", type=str, help="forward solver: " + ", ".join(_SOLVERS))),
    ("b_solver", dict(default="fixed_point_iter", type=str, choices=_SOLVERS, help="backward (IFT) solver")),
    ("f_max_iter", dict(type=int, default=40, help="max calls of f (NFE) in the forward solver")),
    ("b_max_iter", dict(type=int, default=40, help="max steps of the backward solver")),
    ("f_tol", dict(type=float, default=1e-3, help="forward stopping tolerance")),
    ("b_tol", dict(type=float, default=1e-6, help="backward stopping tolerance")),
    ("f_stop_mode", dict(type=str, default="abs", help="forward residual: abs or rel")),
    ("b_stop_mode", dict(type=str, default="abs", help="backward residual: abs or rel")),
    ("eval_factor", dict(type=float, default=1.0, help="f_max_iter at test = f_max_iter * eval_factor")),
    ("eval_f_max_iter", dict(type=int, default=0, help="f_max_iter at test (overrides eval_factor when > 0)")),
    ("norm_type", dict(default="weight_norm", type=str, help="none, weight_norm or spectral_norm")),
    ("norm_no_scale", dict(action="store_true", help="no learnable scale: use norm_target_norm")),
    ("norm_clip", dict(action="store_true", help="clip the rescaling factor at norm_clip_value")),
    ("norm_clip_value", dict(default=1.0, type=float, help="upper bound of the rescaling factor")),
    ("norm_target_norm", dict(default=1.0, type=float, help="target norm without a learnable scale")),
    ("sn_n_power_iters", dict(default=1, type=int, help="power iterations of spectral norm")),
    ("core", dict(default="sliced", type=str, help="DEQ graph: indexing or sliced")),
    ("ift", dict(action="store_true", help="implicit differentiation")),
    ("hook_ift", dict(action="store_true", help="implicit differentiation (hook variant)")),
    ("n_states", dict(type=int, default=1, help="number of uniformly spaced supervised states")),
    ("indexing", dict(type=int, nargs="+", default=[], help="solver steps of supervised states")),
    ("gamma", dict(type=float, default=0.8, help="decay of the fixed-point correction weights")),
    ("grad", dict(type=int, nargs="+", default=[1], help="phantom gradient steps")),
    ("tau", dict(type=float, default=1.0, help="damping of the phantom gradient steps")),
    ("sup_gap", dict(type=int, default=-1, help="keep every sup_gap-th phantom step")),
    ("sup_loc", dict(type=int, nargs="+", default=[], help="phantom steps to keep")),
    ("jac_loss_weight", dict(type=float, default=0.0, help="Jacobian regularisation weight")),
    ("jac_loss_freq", dict(type=float, default=0.0, help="frequency of Jacobian regularisation")),
    ("jac_incremental", dict(type=int, default=0, help="raise jac_loss_weight by 0.1 after this many steps")),
    ("sradius_mode", dict(action="store_true", help="estimate the spectral radius in evaluation")),
]
DEQ_KEYS = frozenset(name for name, _ in _OPTIONS)
_PREFIXES = ("f_", "b_", "norm_", "sn_", "jac_")


class TorchDEQCompatWarning(UserWarning):
    """Something torchdeq would ignore silently, or where this layer departs from torchdeq."""


_warned: set = set()


def warn_once(message: str, stacklevel: int = 3) -> None:
    """``message`` as a ``TorchDEQCompatWarning``, the first time only."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, TorchDEQCompatWarning, stacklevel=stacklevel)


_RENAMED = {"f_thres": "f_max_iter", "b_thres": "b_max_iter", "stop_mode": "f_stop_mode", "writer": "backward_writer"}


def ignored(where: str, names, known) -> None:
    """Warn once per name that ``where`` ignores it as torchdeq does, naming the closest known name."""
    for name in names:
        close = [_RENAMED[name]] if _RENAMED.get(name) in known else \
            difflib.get_close_matches(str(name), sorted(known), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        warn_once(f"{where} ignores {name!r}{hint}, as torchdeq does")


def add_deq_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add torchdeq's options to ``parser`` (same flags, types and defaults); returns it."""
    for name, kwargs in _OPTIONS:
        parser.add_argument("--" + name, **kwargs)  # type: ignore[arg-type]
    return parser


class DEQConfig:
    """torchdeq's configuration: ``get(key, default)`` over ``config`` (dict, namespace, object)."""

    def __init__(self, config=None):
        if config is None:
            config = {}
        if isinstance(config, DEQConfig):
            config = config.config
        elif not isinstance(config, (dict, argparse.Namespace)):
            warn_once(f"Unrecognized config type: {type(config)}. Processed using get_attr.")
        self.config = config if isinstance(config, dict) else vars(config)
        ignored("torchdeq", [k for k in self.config if isinstance(k, str) and k.startswith(_PREFIXES)
                             and k not in DEQ_KEYS], DEQ_KEYS)

    def get(self, key, default=None):
        return self.config.get(key, default)

    def update(self, **kwargs):
        """Set ``kwargs`` (keyword options win over ``args``, as in torchdeq)."""
        ignored("torchdeq", [k for k in kwargs if k not in DEQ_KEYS], DEQ_KEYS)
        self.config.update(kwargs)


def mixed_init(z_shape, device=None) -> torch.Tensor:
    """Standard normal entries of shape ``z_shape``, each zeroed with probability 1/2 (Anil et al.
    2022, path-independent DEQs), drawn from torch's global generator as torchdeq draws them."""
    z = torch.randn(*z_shape, device=device)
    return z * torch.zeros_like(z).bernoulli_(0.5)


def _flat(z):
    return z.flatten(start_dim=1) if z.dim() >= 2 else z.reshape(z.numel(), 1)


class DEQWrapper:
    """``f`` on a tensor state; ``wrapper(z, tau)`` is the damped step ``tau f(z) + (1 - tau) z``."""

    def __init__(self, func, z_init=None):
        self.func = func

    def list2vec(self, z):
        return z

    def vec2list(self, z):
        return z

    def detach(self, z):
        return z.detach()

    def damp(self, out, z, tau):
        return out if tau == 1.0 else tau * out + (1 - tau) * z

    def __call__(self, z, tau=1.0):
        return self.damp(self.func(z), z, tau)

    def norm_diff(self, z_new, z_old, **kwargs):
        return (z_new - z_old).norm(p=1)


class MDEQWrapper(DEQWrapper):
    """``f(*states)`` on a list of states seen as one (B, D) vector: each state flattened per
    sample and concatenated in order (``list2vec``), split back by ``vec2list``."""

    def __init__(self, func, z_init):
        super().__init__(func)
        self.z_shape = [z.shape for z in z_init]
        self.z_indexing = np.cumsum([0] + [_flat(z)[0].numel() for z in z_init])

    def list2vec(self, z_list):
        return torch.cat([_flat(z) for z in z_list], dim=1)

    def vec2list(self, z):
        cut = self.z_indexing
        return [z[:, cut[i]:cut[i + 1]].view(shape) for i, shape in enumerate(self.z_shape)]

    def __call__(self, z, tau=1.0):
        return self.damp(self.list2vec(self.func(*self.vec2list(z))), z, tau)

    def norm_diff(self, z_new, z_old, show_list=False):  # type: ignore[override]
        if show_list:
            return [(a - b).norm(p=1).item() for a, b in zip(self.vec2list(z_new), self.vec2list(z_old))]
        return (z_new - z_old).norm(p=1).item()


class SpeedyMDEQWrapper(DEQWrapper):
    """``f(*states)`` on the list of states itself (no flattening): ``tau`` damps each state."""

    def detach(self, z_list):
        return [z.detach() for z in z_list]

    def __call__(self, z_list, tau=1.0):
        return [self.damp(out, z, tau) for out, z in zip(self.func(*z_list), z_list)]

    def norm_diff(self, z_new, z_old, show_list=False):  # type: ignore[override]
        diff = [(a - b).norm(p=1).item() for a, b in zip(z_new, z_old)]
        return diff if show_list else np.sum(diff)


def deq_decorator(func, z_init=None, no_stat=True):
    """``(wrapper, state)``: for a tensor ``z_init`` the tensor; for a list/tuple of tensors the list
    itself (``no_stat``, ``SpeedyMDEQWrapper``) or one flattened vector (``MDEQWrapper``)."""
    if torch.is_tensor(z_init):
        return DEQWrapper(func, z_init), z_init
    if not isinstance(z_init, (list, tuple)) or not all(torch.is_tensor(z) for z in z_init):
        raise TypeError(f"z_init must be a tensor or a list/tuple of tensors, got {type(z_init).__name__} "
                        "(torchdeq fails with an AssertionError)")
    if no_stat:
        return SpeedyMDEQWrapper(func, z_init), z_init
    wrapper = MDEQWrapper(func, z_init)
    return wrapper, wrapper.list2vec(z_init)
