"""torchdeq's DEQ layers: ``get_deq`` -> ``DEQSliced`` (default) or ``DEQIndexing``.

``deq(func, z_init)`` returns ``(z_out, info)``: in training, the supervised states, each a
gradient functor's output (phantom steps or IFT, see ``grad``) on a solver state; in
evaluation, ``[z_star]`` without a graph. ``sliced`` cuts the ``f_max_iter`` budget into
segments (``n_states`` equal ones, or cut at ``indexing``), each resuming from the previous
functor's output; ``indexing`` runs one solve and applies the functors to the states it passed
at the sampled steps. Every solve goes through ``run_torchdeq_style``, deqkit's one translation
of a torchdeq-style run into its record (``deqkit.TorchDEQSolver`` uses it too). Departures from
torchdeq (warnings for ignored keywords, errors for ``indexing`` it would mishandle) are listed
in docs/migrating.md.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn

from ...solvers._torchdeq import run_torchdeq_style
from .dropout import reset_dropout
from .grad import backward_factory, make_pair
from .loss import power_method
from .norm import reset_norm
from .solver import anderson_solver, broyden_solver, fixed_point_iter, get_solver
from .utils import DEQConfig, deq_decorator, ignored, warn_once

__all__ = ["get_deq", "reset_deq", "register_deq", "DEQBase", "DEQSliced", "DEQIndexing"]


def run(fn, func, x0, **kwargs):
    """``fn(func, x0, **kwargs)``, a solver with torchdeq's call, run without a graph through
    deqkit's record of a torchdeq-style run; returns torchdeq's ``(z, states, info)``."""
    with torch.no_grad():
        out, states, info = run_torchdeq_style(fn, func, x0, **kwargs)
    return out.best_fz, states, info


def _number(name, value):
    """A numeric option as a Python number: numpy scalars and one-element tensors pass, as torchdeq
    uses them too (a bool counts as 0 or 1, as in torchdeq)."""
    if isinstance(value, np.generic) or (isinstance(value, torch.Tensor) and value.numel() == 1):
        value = value.item()
    if not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r} (torchdeq fails using it)")
    return value


class DEQBase(nn.Module):
    """What both cores share: the configuration (torchdeq's names and defaults: ``f_solver``/
    ``b_solver`` 'fixed_point_iter', ``f_max_iter``/``b_max_iter`` 40, ``f_tol`` 1e-3, ``b_tol``
    1e-6, ``f_stop_mode``/``b_stop_mode`` 'abs', ``eval_factor`` 1.0, ``eval_f_max_iter`` 0) and
    the solves."""

    def __init__(self, args=None, f_solver="fixed_point_iter", b_solver="fixed_point_iter", no_stat=None,
                 f_max_iter=40, b_max_iter=40, f_tol=1e-3, b_tol=1e-6, f_stop_mode="abs", b_stop_mode="abs",
                 eval_factor=1.0, eval_f_max_iter=0, **kwargs):
        super().__init__()
        self.args = DEQConfig(args)
        self.args.update(**kwargs)
        get = self.args.get
        self.f_solver, self.b_solver = get_solver(get("f_solver", f_solver)), get_solver(get("b_solver", b_solver))
        self.no_stat = get("f_solver", f_solver) == "simple_fixed_point_iter" if no_stat is None else no_stat
        self.f_max_iter, self.b_max_iter = _number("f_max_iter", get("f_max_iter", f_max_iter)), get("b_max_iter", b_max_iter)
        self.f_tol, self.b_tol = _number("f_tol", get("f_tol", f_tol)), get("b_tol", b_tol)
        self.f_stop_mode, self.b_stop_mode = get("f_stop_mode", f_stop_mode), get("b_stop_mode", b_stop_mode)
        if self.f_stop_mode not in ("abs", "rel") and self.f_solver in (anderson_solver, broyden_solver, fixed_point_iter):
            raise ValueError(f"f_stop_mode must be 'abs' or 'rel', got {self.f_stop_mode!r} (torchdeq fails with a KeyError)")
        eval_f_max_iter, eval_factor = get("eval_f_max_iter", eval_f_max_iter), get("eval_factor", eval_factor)
        self.eval_f_max_iter = eval_f_max_iter if eval_f_max_iter > 0 else int(self.f_max_iter * eval_factor)
        self.hook = None

    def _sradius(self, deq_func, z_star):
        """The spectral radius of f's Jacobian at ``z_star`` by 100 power iterations (torchdeq's)."""
        with torch.enable_grad():
            new_z_star = deq_func(z_star.requires_grad_())
        return power_method(new_z_star, z_star, n_iters=100)[1]

    def _solve_fixed_point(self, deq_func, z_init, f_max_iter=None, solver_kwargs=None, **kwargs):
        """A core's solve (each core defines it; a subclass may override it, as in torchdeq)."""
        raise NotImplementedError

    def _run(self, deq_func, z_init, f_max_iter, solver_kwargs, **indexing):
        options = {k: v for k, v in solver_kwargs.items() if k != "f_max_iter"}
        return run(self.f_solver, deq_func, z_init, max_iter=f_max_iter, tol=self.f_tol, stop_mode=self.f_stop_mode,
                   **indexing, **options)

    def _begin(self, func, z_init, solver_kwargs, kwargs):
        ignored("the DEQ call", kwargs, ("func", "z_init", "solver_kwargs", "sradius_mode", "backward_writer"))
        # states are one flattened vector whatever no_stat says (same numbers; torchdeq's list path fails on hook_ift)
        deq_func, z = deq_decorator(func, z_init, no_stat=False)
        return deq_func, z, {} if solver_kwargs is None else solver_kwargs

    def _eval_out(self, deq_func, z_star, info, sradius_mode, sradius_device=None):
        info["sradius"] = self._sradius(deq_func, z_star) if sradius_mode else torch.zeros(1, device=sradius_device)
        return [deq_func.vec2list(z_star)], info


class _Graph(DEQBase):
    """torchdeq's training graphs: the supervised states and their gradient functors. Options:
    ``ift``/``hook_ift`` (the last functor becomes IFT), ``grad`` (1, an int or one per state),
    ``tau`` (1.0), ``sup_gap`` (-1), ``sup_loc``, ``n_states`` (1), ``indexing``."""

    def __init__(self, args=None, ift=False, hook_ift=False, grad=1, tau=1.0, sup_gap=-1, sup_loc=None, n_states=1,
                 indexing=None, **kwargs):
        super().__init__(args, **kwargs)
        get = self.args.get
        grad = get("grad", grad)
        grad = [grad] if isinstance(grad, int) and not isinstance(grad, bool) else grad
        if not isinstance(grad, (list, tuple)) or not all(type(g) is int and g >= 1 for g in grad):
            raise ValueError(f"grad must be an integer >= 1 or a list of them, got {grad!r} "
                             "(torchdeq fails with an AssertionError)")
        self.arg_n_states, self.arg_indexing = n_states, [] if indexing is None else indexing
        self.indexing = self._compute_f_iter(self.f_max_iter)
        self.produce_grad = [backward_factory(grad_type=g, tau=get("tau", tau), sup_gap=get("sup_gap", sup_gap),
                                              sup_loc=get("sup_loc", [] if sup_loc is None else sup_loc))
                             for g in make_pair(self.indexing, grad)]
        if get("ift", ift) or get("hook_ift", hook_ift):
            _number("b_tol", self.b_tol)
            self.produce_grad[-1] = backward_factory(
                grad_type="ift", hook_ift=get("hook_ift", hook_ift), b_solver=functools.partial(run, self.b_solver),
                b_solver_kwargs=dict(max_iter=self.b_max_iter, tol=self.b_tol, stop_mode=self.b_stop_mode))

    def _states(self):
        n_states = self.args.get("n_states", self.arg_n_states)
        n_states = _number("n_states", n_states)
        if not isinstance(n_states, int):
            raise ValueError(f"n_states must be an integer, got {n_states!r} (torchdeq fails using it)")
        if n_states > 1:  # torchdeq reads no indexing then (a YAML `indexing: null` passes)
            return int(n_states), []
        indexing = self.args.get("indexing", self.arg_indexing)
        return int(n_states), [] if indexing is None else list(indexing)

    def _budget(self, solver_kwargs):
        budget = solver_kwargs.get("f_max_iter")
        if type(budget) in (int, float):
            return self._compute_f_iter(budget)
        if budget is not None:
            warn_once(f"solver_kwargs['f_max_iter'] = {budget!r} is not a Python int or float, so torchdeq's "
                      "training cuts its supervised steps from the configured f_max_iter, and so does this layer "
                      f"(pass int({budget!r}) to use it)")
        return self.indexing


class DEQSliced(_Graph):
    """``core='sliced'``: solve a segment without a graph, apply a gradient functor, solve the next
    segment from its output, and so on (``indexing``: the steps at which to cut)."""

    def _compute_f_iter(self, f_max_iter):
        """Solver iterations of each segment."""
        n_states, indexing = self._states()
        if n_states > 1:
            return [int(f_max_iter // n_states) for _ in range(n_states)]
        segments = np.diff([0, *indexing, f_max_iter]).tolist()
        if any(s < 0 for s in segments):
            raise ValueError(f"indexing={indexing} with f_max_iter={f_max_iter}: the cuts must not decrease nor pass "
                             f"f_max_iter (torchdeq would run segments of {segments} iterations, a negative one as none)")
        return segments

    def _solve_fixed_point(self, deq_func, z_init, f_max_iter=None, solver_kwargs=None, **kwargs):
        """One segment's solve, without a graph: ``(z_star, info)``."""
        z_star, _, info = self._run(deq_func, z_init, f_max_iter, solver_kwargs)
        return z_star, info

    def forward(self, func, z_star, solver_kwargs=None, sradius_mode=False, backward_writer=None, **kwargs):
        deq_func, z_star, solver_kwargs = self._begin(func, z_star, solver_kwargs, kwargs)
        if not self.training:
            max_iter = solver_kwargs.get("f_max_iter", self.eval_f_max_iter)
            z_star, info = self._solve_fixed_point(deq_func, z_star, f_max_iter=max_iter, solver_kwargs=solver_kwargs)
            return self._eval_out(deq_func, z_star, info, sradius_mode)
        z_out = []
        for max_iter, produce in zip(self._budget(solver_kwargs), self.produce_grad):
            z_star, info = self._solve_fixed_point(deq_func, z_star, f_max_iter=max_iter, solver_kwargs=solver_kwargs)
            z_out += produce(self, deq_func, deq_func.detach(z_star), writer=backward_writer)
            z_star = z_out[-1]  # the next segment resumes from the functor's output
        return [deq_func.vec2list(z) for z in z_out], info


class DEQIndexing(_Graph):
    """``core='indexing'``: one solve; gradient functors applied to the states it passed at the
    sampled steps (``n_states`` uniform ones, or ``indexing``, and always ``f_max_iter``)."""

    def _compute_f_iter(self, f_max_iter):
        """The solver steps (1-based) whose states are supervised."""
        n_states, indexing = self._states()
        if n_states > 1:
            n = max(min(f_max_iter, n_states), 1)
            delta = int(f_max_iter // n)
            if f_max_iter % n == 0:
                return [(k + 1) * delta for k in range(n)]
            return [f_max_iter - (n - k - 1) * delta for k in range(n)]
        if any(not 1 <= i <= f_max_iter for i in indexing):
            raise ValueError(f"indexing={indexing} with f_max_iter={f_max_iter}: steps must lie in 1..f_max_iter "
                             "(torchdeq would never sample the others and drop their gradient functors)")
        return [*indexing, f_max_iter]

    # torchdeq's signature (indexing before solver_kwargs)
    def _solve_fixed_point(  # type: ignore[override]
            self, deq_func, z_init, f_max_iter=None, indexing=None, solver_kwargs=None, **kwargs):
        """One solve, without a graph: ``(z_star, states at indexing (training only), info)``."""
        return self._run(deq_func, z_init, f_max_iter, solver_kwargs, indexing=indexing if self.training else None)

    def forward(self, func, z_init, solver_kwargs=None, sradius_mode=False, backward_writer=None, **kwargs):
        deq_func, z_init, solver_kwargs = self._begin(func, z_init, solver_kwargs, kwargs)
        if not self.training:
            max_iter = solver_kwargs.get("f_max_iter", self.eval_f_max_iter)
            z_star, _, info = self._solve_fixed_point(deq_func, z_init, f_max_iter=max_iter, solver_kwargs=solver_kwargs)
            return self._eval_out(deq_func, z_star, info, sradius_mode, z_star.device)
        max_iter = solver_kwargs.get("f_max_iter", self.f_max_iter)
        _, states, info = self._solve_fixed_point(deq_func, z_init, f_max_iter=max_iter,
                                                  indexing=self._budget(solver_kwargs), solver_kwargs=solver_kwargs)
        if len(states) < len(self.produce_grad):
            warn_once("core='indexing': the solve stopped before a sampled step (or, with anderson, the step was "
                      "1 or 2, which it never samples), so fewer states come back than asked for and the "
                      "gradient functors of the missing ones (the IFT with ift=True) are dropped: torchdeq's "
                      "behaviour, kept")
        z_out = []
        for z_pred, produce in zip(states, self.produce_grad):
            z_out += produce(self, deq_func, deq_func.detach(z_pred), writer=backward_writer)
        return [deq_func.vec2list(z) for z in z_out], info


_core = {"indexing": DEQIndexing, "sliced": DEQSliced}


def register_deq(deq_type, core):
    """Register a DEQ class under ``deq_type`` for ``get_deq(core=deq_type)``."""
    _core[deq_type] = core


def get_deq(args=None, **kwargs):
    """The DEQ layer of ``core`` ('sliced' by default, or 'indexing'), configured by ``args``
    (dict, argparse namespace, object: a program's own flags in it are left alone) and
    keywords (which win). A keyword torchdeq does not read is ignored, with one warning.

    Example:
        >>> import torch
        >>> from deqkit.compat.torchdeq import get_deq
        >>> deq = get_deq(f_solver="anderson", f_max_iter=20, f_tol=1e-6).eval()
        >>> z_out, info = deq(lambda z: 0.5 * torch.cos(z), torch.zeros(2, 3))
        >>> z_star = z_out[-1]
        >>> round(float(z_star[0, 0]), 4), tuple(info["abs_lowest"].shape)
        (0.4502, (2,))
    """
    args = DEQConfig(args)
    args.update(**kwargs)
    core = args.get("core", "sliced")
    if core not in _core:
        raise ValueError(f"unknown core {core!r}; registered: {sorted(_core)} (torchdeq fails with an AssertionError)")
    return _core[core](args)


def reset_deq(model):
    """torchdeq's per-step reset: advances spectral norm's power iteration (``reset_norm``) and
    forgets variational dropout masks (``reset_dropout``)."""
    reset_norm(model)
    reset_dropout(model)
