"""torchdeq's DEQ layers on deqkit: ``get_deq`` -> ``DEQSliced`` (default) or ``DEQIndexing``.

``deq(func, z_init)`` returns ``(z_out, info)`` as torchdeq does: in training, ``z_out`` is
the list of supervised states, each the output of a gradient functor (phantom steps or IFT,
see ``grad``) applied to a solver state; in evaluation, ``[z_star]``, the solver's estimate.
``info`` is the last solve's ``SolverStat``.

The two cores differ in training only. ``sliced`` cuts the ``f_max_iter`` budget into
segments (``n_states`` equal ones, or cut at ``indexing``); each segment's solve starts from
the previous gradient functor's output. ``indexing`` runs one solve and applies the gradient
functors to the states it passed at the given steps.

What differs from torchdeq, on purpose: unknown or misspelt options raise (torchdeq ignores
them); with ``core='indexing'`` and a solve that stops before a sampled step, every gradient
functor is still applied (torchdeq silently dropped the last ones, IFT included, and trained
with the phantom step instead); ``hook_ift`` runs the bounded implicit backward.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .dropout import reset_dropout
from .grad import backward_factory, make_pair
from .loss import power_method
from .norm import reset_norm
from .solver import check_solver_options, get_solver
from .solver._engine import solve_like_torchdeq
from .utils.config import DEQConfig
from .utils.layer_utils import deq_decorator

__all__ = ["get_deq", "reset_deq", "register_deq", "DEQBase", "DEQSliced", "DEQIndexing"]

_STOP_MODES = ("abs", "rel")


def _int_at_least(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


class DEQBase(nn.Module):
    """What both cores share: the checked configuration and the solve at evaluation.

    Options (torchdeq's names and defaults): ``f_solver``/``b_solver`` ('fixed_point_iter'),
    ``no_stat``, ``f_max_iter``/``b_max_iter`` (40), ``f_tol`` (1e-3), ``b_tol`` (1e-6),
    ``f_stop_mode``/``b_stop_mode`` ('abs'), ``eval_factor`` (1.0), ``eval_f_max_iter`` (0:
    ``int(f_max_iter * eval_factor)`` at evaluation).
    """

    def __init__(self, args=None, f_solver="fixed_point_iter", b_solver="fixed_point_iter", no_stat=None,
                 f_max_iter=40, b_max_iter=40, f_tol=1e-3, b_tol=1e-6, f_stop_mode="abs", b_stop_mode="abs",
                 eval_factor=1.0, eval_f_max_iter=0, **kwargs):
        super().__init__()
        self.args = args if isinstance(args, DEQConfig) else DEQConfig(args)
        self.args.update(**kwargs)
        get = self.args.get
        self.f_solver_name = get("f_solver", f_solver)
        self.b_solver_name = get("b_solver", b_solver)
        self.f_solver = get_solver(self.f_solver_name)
        self.b_solver = get_solver(self.b_solver_name)
        self.no_stat = (self.f_solver_name == "simple_fixed_point_iter") if no_stat is None else no_stat
        self.f_max_iter = _int_at_least("f_max_iter", get("f_max_iter", f_max_iter), 0)
        self.b_max_iter = _int_at_least("b_max_iter", get("b_max_iter", b_max_iter), 0)
        self.f_tol = _positive("f_tol", get("f_tol", f_tol))
        self.b_tol = _positive("b_tol", get("b_tol", b_tol))
        self.f_stop_mode = get("f_stop_mode", f_stop_mode)
        self.b_stop_mode = get("b_stop_mode", b_stop_mode)
        for name in ("f_stop_mode", "b_stop_mode"):
            if getattr(self, name) not in _STOP_MODES:
                raise ValueError(f"{name} must be one of {_STOP_MODES}, got {getattr(self, name)!r}")
        eval_f_max_iter = _int_at_least("eval_f_max_iter", get("eval_f_max_iter", eval_f_max_iter), 0)
        eval_factor = get("eval_factor", eval_factor)
        self.eval_f_max_iter = eval_f_max_iter if eval_f_max_iter > 0 else int(self.f_max_iter * eval_factor)
        self.hook = None

    def _solver_kwargs(self, solver_kwargs) -> dict:
        solver_kwargs = {} if solver_kwargs is None else dict(solver_kwargs)
        options = {k: v for k, v in solver_kwargs.items() if k != "f_max_iter"}
        check_solver_options(self.f_solver_name, options)
        return solver_kwargs

    def _solve(self, deq_func, z_init, max_iter, solver_kwargs, indexing=None):
        options = {k: v for k, v in solver_kwargs.items() if k != "f_max_iter"}
        return solve_like_torchdeq(self.f_solver, deq_func, z_init, int(max_iter), self.f_tol, self.f_stop_mode,
                                   indexing=indexing, **options)

    def _eval(self, deq_func, z_init, solver_kwargs, sradius_mode):
        max_iter = solver_kwargs.get("f_max_iter", self.eval_f_max_iter)
        z_star, _, info = self._solve(deq_func, z_init, max_iter, solver_kwargs)
        if sradius_mode:
            with torch.enable_grad():
                z = z_star.detach().requires_grad_()
                _, info["sradius"] = power_method(deq_func(z), z, n_iters=100)
        else:
            info["sradius"] = torch.zeros(1, device=z_star.device)
        return [deq_func.vec2list(z_star)], info

    @staticmethod
    def _check_call(kwargs) -> None:
        if kwargs:
            raise TypeError(f"unknown keyword(s) {sorted(kwargs)} for the DEQ call; it takes func, z_init, "
                            "solver_kwargs, sradius_mode, backward_writer (torchdeq would ignore them)")

    def _gradient_functors(self, args_grad, tau, sup_gap, sup_loc, ift, hook_ift, segments):
        grad = self.args.get("grad", args_grad)
        grad = [grad] if isinstance(grad, (int, np.integer)) and not isinstance(grad, bool) else grad
        if not isinstance(grad, (list, tuple)) or not grad:
            raise ValueError(f"grad must be an integer >= 1 or a list of them, got {grad!r}")
        grad = [_int_at_least("grad", g, 1) for g in grad]
        tau = self.args.get("tau", tau)
        sup_gap = self.args.get("sup_gap", sup_gap)
        sup_loc = self.args.get("sup_loc", sup_loc)
        sup_loc = [] if sup_loc is None else list(sup_loc)
        produce = [backward_factory(grad_type=g, tau=tau, sup_gap=sup_gap, sup_loc=sup_loc)
                   for g in make_pair(segments, grad)]
        if self.args.get("ift", ift) or self.args.get("hook_ift", hook_ift):
            produce[-1] = backward_factory(
                grad_type="ift", b_solver=self.b_solver,
                b_solver_kwargs=dict(max_iter=self.b_max_iter, tol=self.b_tol, stop_mode=self.b_stop_mode))
        return produce

    def _states_option(self, n_states, indexing):
        n_states = _int_at_least("n_states", self.args.get("n_states", n_states), 1)
        indexing = self.args.get("indexing", indexing)
        indexing = [] if indexing is None else [_int_at_least("indexing", i, 0) for i in indexing]
        return n_states, indexing


class DEQSliced(DEQBase):
    """Training graph of ``core='sliced'``: solve a segment without a graph, apply a gradient
    functor, solve the next segment from its output, and so on.

    Extra options: ``ift``/``hook_ift`` (False; the last segment's functor becomes IFT),
    ``grad`` (1, an int or one per segment), ``tau`` (1.0), ``sup_gap`` (-1), ``sup_loc``,
    ``n_states`` (1), ``indexing``.
    """

    def __init__(self, args=None, ift=False, hook_ift=False, grad=1, tau=1.0, sup_gap=-1, sup_loc=None,
                 n_states=1, indexing=None, **kwargs):
        super().__init__(args, **kwargs)
        self.arg_n_states, self.arg_indexing = self._states_option(n_states, indexing)
        self.indexing = self._compute_f_iter(self.f_max_iter)
        self.produce_grad = self._gradient_functors(grad, tau, sup_gap, sup_loc, ift, hook_ift, self.indexing)

    def _compute_f_iter(self, f_max_iter) -> list:
        """Solver iterations of each segment."""
        if self.arg_n_states > 1:
            return [int(f_max_iter // self.arg_n_states)] * self.arg_n_states
        return np.diff([0, *self.arg_indexing, f_max_iter]).tolist()

    def forward(self, func: Callable, z_init, solver_kwargs=None, sradius_mode: bool = False,
                backward_writer=None, **kwargs):
        self._check_call(kwargs)
        deq_func, z_star = deq_decorator(func, z_init, no_stat=self.no_stat)
        solver_kwargs = self._solver_kwargs(solver_kwargs)
        if not self.training:
            return self._eval(deq_func, z_star, solver_kwargs, sradius_mode)
        budget = solver_kwargs.get("f_max_iter")
        segments = self._compute_f_iter(budget) if isinstance(budget, (int, float)) else self.indexing
        z_out, info = [], None
        for max_iter, produce in zip(segments, self.produce_grad):
            z_star, _, info = self._solve(deq_func, z_star, int(max_iter), solver_kwargs)
            z_star = deq_func.detach(z_star)
            z_out += produce(self, deq_func, z_star, writer=backward_writer)
            z_star = z_out[-1]  # the next segment resumes from the functor's output
        return [deq_func.vec2list(z) for z in z_out], info


class DEQIndexing(DEQBase):
    """Training graph of ``core='indexing'``: one solve; gradient functors applied to the
    states it passed at the sampled steps (``n_states`` uniform ones, or ``indexing``, and
    always ``f_max_iter``). Same options as ``DEQSliced``.

    When the solve stops before a sampled step, that state is the solve's best estimate, so
    every functor (IFT included) is applied; torchdeq dropped the missing ones.
    """

    def __init__(self, args=None, ift=False, hook_ift=False, grad=1, tau=1.0, sup_gap=-1, sup_loc=None,
                 n_states=1, indexing=None, **kwargs):
        super().__init__(args, **kwargs)
        self.arg_n_states, self.arg_indexing = self._states_option(n_states, indexing)
        self.indexing = self._compute_f_iter(self.f_max_iter)
        self.produce_grad = self._gradient_functors(grad, tau, sup_gap, sup_loc, ift, hook_ift, self.indexing)

    def _compute_f_iter(self, f_max_iter) -> list:
        """The solver steps (1-based) whose states are supervised."""
        if self.arg_n_states > 1:
            n = max(min(f_max_iter, self.arg_n_states), 1)
            delta = int(f_max_iter // n)
            if f_max_iter % n == 0:
                return [(k + 1) * delta for k in range(n)]
            return [f_max_iter - (n - k - 1) * delta for k in range(n)]
        return [*self.arg_indexing, f_max_iter]

    def forward(self, func: Callable, z_init, solver_kwargs=None, sradius_mode: bool = False,
                backward_writer=None, **kwargs):
        self._check_call(kwargs)
        deq_func, z_init = deq_decorator(func, z_init, no_stat=self.no_stat)
        solver_kwargs = self._solver_kwargs(solver_kwargs)
        if not self.training:
            return self._eval(deq_func, z_init, solver_kwargs, sradius_mode)
        budget = solver_kwargs.get("f_max_iter")
        indexing = self._compute_f_iter(budget) if isinstance(budget, (int, float)) else self.indexing
        max_iter = int(solver_kwargs.get("f_max_iter", self.f_max_iter))
        z_best, trajectory, info = self._solve(deq_func, z_init, max_iter, solver_kwargs, indexing=indexing)
        trajectory = list(trajectory)
        produce_grad = self.produce_grad
        if len(produce_grad) != len(indexing):  # a run-time budget changed the number of states
            produce_grad = make_pair(indexing, produce_grad[:1]) if len(produce_grad) == 1 else produce_grad
        trajectory += [z_best] * (len(produce_grad) - len(trajectory))  # a solve that stopped early
        z_out = []
        for z_pred, produce in zip(trajectory, produce_grad):
            z_out += produce(self, deq_func, deq_func.detach(z_pred), writer=backward_writer)
        return [deq_func.vec2list(z) for z in z_out], info


_core: dict[str, type] = {"indexing": DEQIndexing, "sliced": DEQSliced}


def register_deq(deq_type: str, core: type) -> None:
    """Register a DEQ class under ``deq_type`` for ``get_deq(core=deq_type)``."""
    _core[deq_type] = core


def get_deq(args=None, **kwargs) -> DEQBase:
    """The DEQ layer of ``core`` ('sliced' by default, or 'indexing'), configured by ``args``
    (dict, argparse Namespace, object) and keywords (which win). Unknown keywords raise.

    Example:
        >>> import torch
        >>> from deqkit.compat.torchdeq import get_deq
        >>> deq = get_deq(f_solver="anderson", f_max_iter=20, f_tol=1e-6).eval()
        >>> z_out, info = deq(lambda z: 0.5 * torch.cos(z), torch.zeros(2, 3))
        >>> z_star = z_out[-1]
        >>> round(float(z_star[0, 0]), 4), tuple(info["abs_lowest"].shape)
        (0.4502, (2,))
    """
    config = DEQConfig(args, **kwargs)
    core = config.get("core", "sliced")
    if core not in _core:
        raise ValueError(f"unknown core {core!r}; registered: {sorted(_core)}")
    return _core[core](config)


def reset_deq(model: nn.Module) -> None:
    """torchdeq's per-iteration reset: new variational dropout masks at the next call (the
    normalised weights need no reset here: they are always current)."""
    reset_norm(model)
    reset_dropout(model)
