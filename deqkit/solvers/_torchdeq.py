"""torchdeq's solvers as deqkit solvers (an adapter for comparisons and migration)."""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._ledger import LoopOutput
from .._numerics import residual_norms
from .._result import Result
from ._base import AbstractSolver

_NAMES = ("anderson", "broyden", "fixed_point_iter", "simple_fixed_point_iter")


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
        module = _import_torchdeq()
        import inspect

        fn = module.get_solver(name)
        accepted = set(inspect.signature(fn).parameters) - {"func", "x0", "max_iter", "tol", "stop_mode", "indexing", "kwargs"}
        unknown = sorted(set(kwargs) - accepted)
        if unknown:
            raise ValueError(
                f"unknown keyword(s) {unknown} for torchdeq's {name!r} solver; it accepts {sorted(accepted)}"
            )
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
        fn = _import_torchdeq().get_solver(self.name)
        stop_mode = options.stop_mode
        abs_hist: list[Tensor] = []
        res_hist: list[Tensor] = []
        calls: list[tuple[Tensor, Tensor]] = []

        def func(z: Tensor) -> Tensor:
            z = z.reshape(z0.shape)
            out: Tensor = problem.f(z)
            diff, size = residual_norms(z, out)
            diff, size = diff.double(), size.double()
            abs_hist.append(diff)
            res_hist.append(diff if stop_mode == "abs" else diff / (size + 1e-9))
            calls.append((z, out))
            return out

        tol = 0.0 if options.tol is None else options.tol  # torchdeq stops when max < tol: never at 0
        kwargs = dict(self.kwargs)
        if options.tol is None and self.name != "simple_fixed_point_iter":
            kwargs["return_final"] = True  # a fixed number of iterations returns the last one
        value, _, info = fn(func, z0, max_iter=options.max_steps, tol=tol, stop_mode=stop_mode, **kwargs)
        value = value.reshape(z0.shape)
        best_z = self._preimage(value, calls)
        res_dtype = torch.promote_types(z0.dtype, torch.float32)
        trace = torch.stack(res_hist, dim=1)
        abs_trace = torch.stack(abs_hist, dim=1)
        lowest = torch.cummin(trace, dim=1).values
        below = lowest <= tol
        n = trace.shape[1]
        steps = torch.where(below.any(dim=1), below.float().argmax(dim=1) + 1, torch.full_like(below[:, 0], n, dtype=torch.long)).long()
        if options.tol is None:
            steps = torch.full_like(steps, n)
        residual = info[f"{stop_mode}_lowest"].reshape(-1).to(device=trace.device, dtype=res_dtype)
        status = torch.full_like(steps, int(Result.SUCCESS if options.tol is None else Result.MAX_STEPS))
        if options.divergence is not None:
            first = abs_trace[:, :1].nan_to_num(0.0).clamp_min(torch.finfo(abs_trace.dtype).tiny)
            status = torch.where((abs_trace > options.divergence * first).any(dim=1), int(Result.DIVERGED), status)
        status = torch.where(torch.isfinite(trace).all(dim=1), status, int(Result.NONFINITE))
        if options.tol is not None:
            status = torch.where(residual <= tol, int(Result.SUCCESS), status)
        return LoopOutput(
            best_z=best_z, best_fz=value, residual=residual, status=status, steps=steps, trace=trace.to(res_dtype),
            trajectory=tuple(calls[-options.trajectory:]) if options.trajectory else (), nfev=problem.nfev, sample_evals=problem.sample_evals,
        )

    @staticmethod
    def _preimage(value: Tensor, calls: list[tuple[Tensor, Tensor]]) -> Tensor:
        """Each sample's ``z_k`` with ``f(z_k)`` = the row torchdeq returned (the latest such call);
        the value itself for a sample torchdeq returned unchanged from its start."""
        b = value.shape[0]
        flat = value.reshape(b, -1)
        found = torch.zeros(b, dtype=torch.bool, device=value.device)
        pre = value
        for z, out in reversed(calls):
            match = (out.reshape(b, -1) == flat).all(dim=1) & ~found
            if bool(match.any()):
                pre = torch.where(match.reshape((-1,) + (1,) * (value.dim() - 1)), z, pre)
                found = found | match
            if bool(found.all()):
                break
        return pre
