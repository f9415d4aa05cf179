"""torchdeq's solvers inside deqkit, and the one translation of a torchdeq-style run into deqkit's record.

A torchdeq-style solver is a function with a loop of its own,
``fn(func, x0, max_iter, tol, stop_mode, indexing, **kw) -> (z, states, info)``: torchdeq's
four, or their ports in ``deqkit.compat.torchdeq``. ``run_torchdeq_style`` runs one and reads
deqkit's record (``LoopOutput``) off the calls it made; ``TorchDEQSolver`` (torchdeq's own
functions inside ``fixed_point``) and the compat layer's solves both go through it, so the
two report values, residuals, status and steps by the same rules.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib
import inspect
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor

from .._ledger import LoopOutput
from .._result import Result
from ._base import AbstractSolver

_NAMES = ("anderson", "broyden", "fixed_point_iter", "simple_fixed_point_iter")
# the arguments of torchdeq's call that a run sets itself
_CALL_ARGS = frozenset({"func", "x0", "max_iter", "tol", "stop_mode", "indexing", "kwargs"})


def _flat(x: Tensor) -> Tensor:
    """(B, ...) -> (B, D), torchdeq's batch flattening: a 1-D (or 0-D) tensor is B samples of one value."""
    return x.flatten(start_dim=1) if x.dim() >= 2 else x.reshape(-1, 1)


def run_torchdeq_style(fn: Callable[..., Any], f: Callable[[Tensor], Tensor], z0: Tensor, *, max_iter: Any,
                       tol: float, stop_mode: str, fixed: bool = False, divergence: float | None = None,
                       keep: int = 0, preimage: bool = False, **kwargs: Any) -> tuple[Any, Any, Any]:
    """Run ``fn(f, z0, max_iter=, tol=, stop_mode=, **kwargs)`` and translate it: returns
    ``(LoopOutput, states, info)``, the last two as ``fn`` returned them.

    The record, per sample: ``best_fz`` is the tensor ``fn`` returned (torchdeq's value, its
    lowest-residual image); ``best_z`` the ``z_k`` whose image it is (with ``preimage``; else
    the value itself); ``residual`` its residual as ``fn`` reports it
    (``info[stop_mode + '_lowest']``); ``trace`` the residual of every call of ``f`` (one column
    per call); ``status`` NONFINITE where a call's residual was NaN or Inf, else SUCCESS where
    the residual is at most ``tol`` (always with ``fixed``: a fixed number of iterations), else
    DIVERGED where the absolute residual grew past ``divergence`` times its first value, else
    MAX_STEPS; ``steps`` the first call whose residual reached ``tol`` (every call made with
    ``fixed`` or when none did); ``trajectory`` the last ``keep`` pairs ``(z, f(z))``;
    ``nfev`` the calls of ``f``. No graph is kept: call it under ``torch.no_grad()``.
    """
    res_dtype = torch.promote_types(z0.dtype, torch.float32)
    abs_hist: list[Tensor] = []
    res_hist: list[Tensor] = []
    kept: collections.deque[tuple[Tensor, Tensor]] = collections.deque(maxlen=None if preimage else keep)

    def func(z: Tensor, tau: float = 1.0) -> Tensor:  # (torchdeq's simple_fixed_point_iter passes tau)
        out = f(z)
        out = out if tau == 1.0 else tau * out + (1 - tau) * z
        diff = torch.linalg.vector_norm(_flat(out - z).to(res_dtype), dim=1)
        abs_hist.append(diff)
        res_hist.append(diff if stop_mode == "abs" else diff / (torch.linalg.vector_norm(_flat(out).to(res_dtype), dim=1) + 1e-9))
        if kept.maxlen != 0:
            kept.append((z, out))
        return out

    value, states, info = fn(func, z0, max_iter=max_iter, tol=tol, stop_mode=stop_mode, **kwargs)
    value = value if value.shape == z0.shape else value.reshape(z0.shape)
    batch, calls = _flat(z0).shape[0], len(res_hist)
    trace = torch.stack(res_hist, dim=1) if calls else torch.zeros(batch, 0, dtype=res_dtype, device=z0.device)
    lowest = info.get(f"{stop_mode}_lowest") if isinstance(info, dict) else None
    if isinstance(lowest, Tensor) and lowest.numel() == batch:
        residual = lowest.reshape(batch).to(device=z0.device, dtype=res_dtype)
    else:  # a registered solver without torchdeq's statistics
        residual = trace.min(dim=1).values if calls else torch.full((batch,), float("nan"), device=z0.device)
    steps = torch.full((batch,), calls, dtype=torch.long, device=z0.device)
    if calls and not fixed:
        reached = torch.cummin(trace, dim=1).values <= tol
        steps = torch.where(reached.any(dim=1), reached.to(torch.uint8).argmax(dim=1) + 1, steps)
    status = torch.full_like(steps, int(Result.SUCCESS) if fixed else int(Result.MAX_STEPS))
    if divergence is not None and calls:
        abs_trace = torch.stack(abs_hist, dim=1)
        start = abs_trace[:, :1].nan_to_num(0.0).clamp_min(torch.finfo(abs_trace.dtype).tiny)
        status = torch.where((abs_trace > divergence * start).any(dim=1), int(Result.DIVERGED), status)
    if not fixed:  # a sample that came back below tol after growing is at a fixed point
        status = torch.where(residual <= tol, int(Result.SUCCESS), status)
    status = torch.where(torch.isfinite(trace).all(dim=1) & torch.isfinite(residual), status, int(Result.NONFINITE))
    best_z = _preimage(value, list(kept)) if preimage else value
    out = LoopOutput(best_z=best_z, best_fz=value, residual=residual, status=status, steps=steps, trace=trace,
                     trajectory=tuple(kept)[-keep:] if keep else (), nfev=calls, sample_evals=calls * batch)
    return out, states, info


def _preimage(value: Tensor, calls: list[tuple[Tensor, Tensor]]) -> Tensor:
    """Each sample's ``z_k`` with ``f(z_k)`` equal to its row of ``value`` (the latest such call);
    the value itself for a sample returned unchanged from its start."""
    flat = _flat(value)
    found = torch.zeros(flat.shape[0], dtype=torch.bool, device=value.device)
    pre = value
    for z, out in reversed(calls):
        match = (_flat(out) == flat).all(dim=1) & ~found
        if bool(match.any()):
            pre = torch.where(match.reshape((-1,) + (1,) * (value.dim() - 1)), z.reshape(value.shape), pre)
            found = found | match
        if bool(found.all()):
            break
    return pre


def _import_torchdeq() -> Any:
    try:
        return importlib.import_module("torchdeq.solver")
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "TorchDEQSolver needs the torchdeq package: pip install 'deqkit[torchdeq]' "
            "(or pip install torchdeq==0.1.0)"
        ) from err


@dataclasses.dataclass(frozen=True, init=False)
class TorchDEQSolver(AbstractSolver):
    """Run one of torchdeq's solvers inside deqkit, faithfully, with its stats in deqkit's record.

    torchdeq's solver runs its own loop (through the ``run`` hook of the solver protocol) and
    stops batch-wide: the batch iterates until every sample is below ``tol``. The value is
    exactly the tensor torchdeq returns (each sample's lowest-residual image ``f(z_k)``), the
    residual is that of ``z_k`` (torchdeq's ``{stop_mode}_lowest``), and ``stats.nfev`` counts
    the calls torchdeq made. ``stats.steps`` is the first call at which each sample was below
    ``tol`` (or all calls made). ``trajectory`` keeps the images of torchdeq's last calls;
    DIVERGED is judged after the run from the residual history (torchdeq does not stop on it).
    With ``tol=None`` torchdeq runs every step and returns the last one (its ``return_final``).
    The translation into deqkit's record is ``run_torchdeq_style``, shared with the compat layer.

    Pairings: ``Implicit`` (also as its adjoint solver, ``Implicit(solver=TorchDEQSolver(...))``),
    ``Phantom`` and ``OneStep`` work as with deqkit's solvers. Refused with an error at call
    time: ``Unrolled`` (torchdeq detaches its iterates, so no gradient could flow through them)
    and ``active_set=True`` (torchdeq iterates the whole batch).

    Args:
        name: ``"anderson"``, ``"broyden"``, ``"fixed_point_iter"`` or ``"simple_fixed_point_iter"``.
        **kwargs: passed to the torchdeq solver (e.g. ``m=6, lam=1e-4, tau=1.0`` for anderson,
            ``LBFGS_thres``, ``ls`` for broyden). Checked against its signature.

    Example:
        >>> import torch, deqkit
        >>> sol = deqkit.fixed_point(torch.cos, torch.zeros(2, 3), tol=1e-5,
        ...                          solver=deqkit.TorchDEQSolver("anderson", m=5))
        >>> round(float(sol.value[0, 0]), 4)
        0.7391
    """

    name: str
    kwargs: tuple[tuple[str, Any], ...]
    differentiable: ClassVar[bool] = False
    why_not_differentiable: ClassVar[str] = "torchdeq detaches its iterates, so no gradient can flow through them"

    def __init__(self, name: str, **kwargs: Any):
        if name not in _NAMES:
            raise ValueError(f"unknown torchdeq solver {name!r}; available: {', '.join(_NAMES)}")
        accepted = set(inspect.signature(_import_torchdeq().get_solver(name)).parameters) - _CALL_ARGS
        unknown = sorted(set(kwargs) - accepted)
        if unknown:
            raise ValueError(f"unknown keyword(s) {unknown} for torchdeq's {name!r} solver; it accepts {sorted(accepted)}")
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "kwargs", tuple(sorted(kwargs.items())))

    def step(self, z: Tensor, fz: Tensor, state: Any, problem: Any) -> tuple[Tensor, Any]:  # pragma: no cover - the adapter runs torchdeq's own loop
        raise RuntimeError("TorchDEQSolver runs torchdeq's loop; it is driven through run()")

    def run(self, problem: Any, z0: Tensor, options: Any) -> Any:
        """Solve with torchdeq's loop; return the shared loop's record (``LoopOutput``)."""
        if options.active_set:
            raise ValueError(
                f"{self!r} cannot run with active_set=True: torchdeq's loop iterates the whole batch. "
                "Use a deqkit solver for active-set solves."
            )
        fixed = options.tol is None
        kwargs = dict(self.kwargs)
        if fixed and self.name != "simple_fixed_point_iter":
            kwargs["return_final"] = True  # a fixed number of iterations returns the last one
        out, _, _ = run_torchdeq_style(
            _import_torchdeq().get_solver(self.name), problem.f, z0, max_iter=options.max_steps,
            tol=0.0 if fixed else options.tol,  # torchdeq stops when max < tol: never at 0
            stop_mode=options.stop_mode, fixed=fixed, divergence=options.divergence, keep=options.trajectory,
            preimage=True, **kwargs)
        return out
