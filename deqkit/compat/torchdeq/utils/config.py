"""torchdeq's configuration: ``args`` (a dict, an argparse Namespace or any object with
attributes) updated by keywords, with every key checked.

torchdeq ignores keys it does not know, so a misspelt ``f_stop_mod`` or a ``stop_mode`` meant
as ``f_stop_mode`` silently leaves the default in place. Here a keyword argument that is not a
torchdeq option raises ``TypeError``. An ``args`` object from a training script may carry its
own unrelated options (learning rate, batch size), so those are allowed, except names that look
like a misspelt torchdeq option (close to one, or starting with ``f_``/``b_``/``norm_``).
"""

from __future__ import annotations

import argparse
import difflib
from typing import Any

# every option torchdeq 0.1.0 reads from its config (layer, norms, training scripts)
DEQ_KEYS = frozenset({
    "core", "f_solver", "b_solver", "no_stat", "f_max_iter", "b_max_iter", "f_tol", "b_tol", "f_stop_mode",
    "b_stop_mode", "eval_factor", "eval_f_max_iter", "ift", "hook_ift", "grad", "tau", "sup_gap", "sup_loc",
    "n_states", "indexing", "gamma", "norm_type", "norm_no_scale", "norm_clip", "norm_clip_value",
    "norm_target_norm", "sn_n_power_iters", "jac_loss_weight", "jac_loss_freq", "jac_incremental", "sradius_mode",
})
_PREFIXES = ("f_", "b_", "norm_", "sn_", "jac_")


def _near(key: str) -> list:
    return difflib.get_close_matches(key, sorted(DEQ_KEYS), n=1, cutoff=0.75)


def _as_dict(config: Any) -> dict:
    if config is None:
        return {}
    if isinstance(config, DEQConfig):
        return dict(config.config)
    if isinstance(config, dict):
        return dict(config)
    if isinstance(config, argparse.Namespace) or hasattr(config, "__dict__"):
        return dict(vars(config))
    raise TypeError(f"args must be a dict, an argparse.Namespace or an object with attributes, got {type(config).__name__}")


class DEQConfig:
    """A checked view of ``args`` plus keyword overrides (keywords win, as in torchdeq)."""

    def __init__(self, config: Any = None, **kwargs: Any):
        base = _as_dict(config)
        for key in base:
            if key not in DEQ_KEYS and (_near(key) or key.startswith(_PREFIXES)):
                close = _near(key)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"args has {key!r}, which is not a torchdeq option{hint}; torchdeq would ignore it "
                                 "silently. Rename it, or remove it from args.")
        for key in kwargs:
            if key not in DEQ_KEYS:
                close = _near(key)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise TypeError(f"unknown torchdeq option {key}={kwargs[key]!r}{hint}; torchdeq would ignore it "
                                f"silently. Known options: {', '.join(sorted(DEQ_KEYS))}")
        base.update(kwargs)
        self.config = base

    def get(self, key: str, default: Any = None) -> Any:
        return self.config.get(key, default)

    def update(self, **kwargs: Any) -> None:
        self.config.update(DEQConfig(None, **kwargs).config)
