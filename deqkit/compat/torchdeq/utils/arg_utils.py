"""``add_deq_args(parser)``: torchdeq's command-line options, same names and defaults."""

from __future__ import annotations

import argparse

__all__ = ["add_deq_args"]

_SOLVERS = ["anderson", "broyden", "fixed_point_iter", "simple_fixed_point_iter"]

# (flag, argparse keywords): one table, in torchdeq's order
_OPTIONS = [
    ("--f_solver", dict(default="fixed_point_iter", type=str, help="forward solver: " + ", ".join(_SOLVERS))),
    ("--b_solver", dict(default="fixed_point_iter", type=str, choices=_SOLVERS, help="backward (IFT) solver")),
    ("--f_max_iter", dict(type=int, default=40, help="max calls of f (NFE) in the forward solver")),
    ("--b_max_iter", dict(type=int, default=40, help="max steps of the backward solver")),
    ("--f_tol", dict(type=float, default=1e-3, help="forward stopping tolerance")),
    ("--b_tol", dict(type=float, default=1e-6, help="backward stopping tolerance")),
    ("--f_stop_mode", dict(type=str, default="abs", help="forward residual: abs or rel")),
    ("--b_stop_mode", dict(type=str, default="abs", help="backward residual: abs or rel")),
    ("--eval_factor", dict(type=float, default=1.0, help="f_max_iter at test = f_max_iter * eval_factor")),
    ("--eval_f_max_iter", dict(type=int, default=0, help="f_max_iter at test (overrides eval_factor when > 0)")),
    ("--norm_type", dict(default="weight_norm", type=str, help="none, weight_norm or spectral_norm")),
    ("--norm_no_scale", dict(action="store_true", help="no learnable scale: use norm_target_norm")),
    ("--norm_clip", dict(action="store_true", help="clip the rescaling factor at norm_clip_value")),
    ("--norm_clip_value", dict(default=1.0, type=float, help="upper bound of the rescaling factor")),
    ("--norm_target_norm", dict(default=1.0, type=float, help="target norm without a learnable scale")),
    ("--sn_n_power_iters", dict(default=1, type=int, help="power iterations of spectral norm")),
    ("--core", dict(default="sliced", type=str, help="DEQ graph: indexing or sliced")),
    ("--ift", dict(action="store_true", help="implicit differentiation")),
    ("--hook_ift", dict(action="store_true", help="implicit differentiation (hook variant)")),
    ("--n_states", dict(type=int, default=1, help="number of uniformly spaced supervised states")),
    ("--indexing", dict(type=int, nargs="+", default=[], help="solver steps of supervised states")),
    ("--gamma", dict(type=float, default=0.8, help="decay of the fixed-point correction weights")),
    ("--grad", dict(type=int, nargs="+", default=[1], help="phantom gradient steps")),
    ("--tau", dict(type=float, default=1.0, help="damping of the phantom gradient steps")),
    ("--sup_gap", dict(type=int, default=-1, help="keep every sup_gap-th phantom step")),
    ("--sup_loc", dict(type=int, nargs="+", default=[], help="phantom steps to keep")),
    ("--jac_loss_weight", dict(type=float, default=0.0, help="Jacobian regularisation weight")),
    ("--jac_loss_freq", dict(type=float, default=0.0, help="frequency of Jacobian regularisation")),
    ("--jac_incremental", dict(type=int, default=0, help="raise jac_loss_weight by 0.1 after this many steps")),
    ("--sradius_mode", dict(action="store_true", help="estimate the spectral radius in evaluation")),
]


def add_deq_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add torchdeq's options to ``parser`` (same flags, types and defaults); returns it."""
    for flag, kwargs in _OPTIONS:
        parser.add_argument(flag, **kwargs)  # type: ignore[arg-type]
    return parser
