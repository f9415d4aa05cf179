"""Every solver x backward mode x option combination: the right answer, or a clear refusal.

For each (solver, backward mode, norm) and each (trajectory, active set, dtype):

(a) the value and the trajectory are identical with autograd on, under ``torch.no_grad()``,
    under ``torch.inference_mode()`` and with the module in ``eval()``;
(b) where the mode promises a gradient, every parameter that influences the output gets one
    (from ``Solution.value`` and from the first tensor of ``Solution.trajectory``), and in
    float64 it equals the mode's reference: the analytic implicit gradient of the affine map
    for ``Implicit``; finite differences through the same iterations for ``Unrolled``; autograd
    through the mode's surrogate at the solution for ``OneStep`` and ``Phantom``;
(c) a combination that cannot honour this raises at call time, naming it.
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from torch.nn.utils import parametrize
from hypothesis import given, settings
from hypothesis import strategies as st

import deqkit

DIM, BATCH = 4, 3

SOLVERS = {
    "fixed_point": lambda: deqkit.FixedPoint(damping=0.9),
    "anderson": lambda: deqkit.Anderson(m=3),
    "broyden": lambda: deqkit.Broyden(memory=8),
    "newton_krylov": lambda: deqkit.NewtonKrylov(),
}
try:  # torchdeq's solvers through the adapter, where torchdeq is installed
    import torchdeq  # noqa: F401

    SOLVERS["torchdeq_anderson"] = lambda: deqkit.TorchDEQSolver("anderson", m=4)
except ImportError:  # pragma: no cover - the [torchdeq] extra is part of [dev]
    pass

BACKWARDS = {  # built for a dtype: the adjoint tolerance is what the dtype can reach
    "implicit": lambda dtype=torch.float64: deqkit.Implicit(tol=1e-12 if dtype == torch.float64 else 1e-5, max_steps=200),
    "phantom": lambda dtype=torch.float64: deqkit.Phantom(steps=3, tau=0.6),
    "unrolled": lambda dtype=torch.float64: deqkit.Unrolled(),
    "unrolled_ckpt": lambda dtype=torch.float64: deqkit.Unrolled(checkpoint=True),
    "one_step": lambda dtype=torch.float64: deqkit.OneStep(),
}
NORMS = ("none", "weight", "spectral")
GRAD_MODES = (torch.enable_grad, torch.no_grad, torch.inference_mode)


class AffineCell(torch.nn.Module):
    """``f(z, x) = c (W z + b) + x`` with ``||c W|| = 0.6``: its fixed point solves a linear system."""

    def __init__(self, norm: str, dtype: torch.dtype, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = torch.nn.Linear(DIM, DIM).to(dtype)
        if norm != "none":
            deqkit.nn.apply_norm(self, norm)
        with torch.no_grad():
            self.c = 0.6 / float(torch.linalg.matrix_norm(self.lin.weight, ord=2))

    def forward(self, z, x):
        return self.c * self.lin(z) + x

    def fixed_point(self, x):
        """The exact solution, differentiable: ``(I - c W) z = c b + x``."""
        w, b = self.lin.weight, self.lin.bias
        eye = torch.eye(DIM, dtype=x.dtype)
        return torch.linalg.solve(eye - self.c * w, (self.c * b + x).T).T


def options(backward_name: str, trajectory: int, active_set: bool) -> dict:
    if backward_name.startswith("unrolled"):  # a few iterations, not converged: smooth for finite differences
        return dict(tol=None, max_steps=4, trajectory=trajectory, active_set=active_set, divergence=None)
    return dict(tol=1e-12, max_steps=200, trajectory=trajectory, active_set=active_set)


def refusal(solver_name: str, backward_name: str, active_set: bool) -> str | None:
    if solver_name.startswith("torchdeq") and backward_name.startswith("unrolled"):
        return r"Unrolled\(\) cannot differentiate through TorchDEQSolver.*torchdeq detaches its iterates"
    if solver_name == "newton_krylov" and backward_name.startswith("unrolled"):
        return r"Unrolled\(\) cannot differentiate through NewtonKrylov.*GMRES"
    if solver_name.startswith("torchdeq") and active_set:
        return "cannot run with active_set=True"
    return None


def solve(cell, x, solver_name, backward_name, opts):
    z0 = 0.1 * torch.ones_like(x)  # not zero: W influences even the first image
    return deqkit.fixed_point(cell, z0, inputs=(x,), solver=SOLVERS[solver_name](),
                              backward=BACKWARDS[backward_name](x.dtype), **opts)


def restore(cell, buffers):
    """Put back the buffers (spectral norm's power-iteration vectors) without touching parameters,
    whose version counters the graphs already built depend on."""
    with torch.no_grad():
        for name, buf in cell.named_buffers():
            buf.copy_(buffers[name])


def same_values(a: deqkit.Solution, b: deqkit.Solution) -> bool:
    return torch.equal(a.value.detach(), b.value.detach()) and len(a.trajectory) == len(b.trajectory) and all(
        torch.equal(s.detach(), t.detach()) for s, t in zip(a.trajectory, b.trajectory))


def reference_loss(cell, x, sol, backward_name, weights):
    """The mode's reference for ``sum(weights * value)``, differentiable in the cell's parameters and x."""
    if backward_name == "implicit":
        return (cell.fixed_point(x) * weights).sum()
    z = sol.value.detach()  # within tol (1e-12) of the pre-image of the value
    if backward_name == "one_step":
        return (cell(z, x) * weights).sum()
    mode = BACKWARDS[backward_name]()
    for _ in range(mode.steps):
        z = (1 - mode.tau) * z + mode.tau * cell(z, x)
    return (z * weights).sum()


def finite_difference(cell, x, solver_name, backward_name, opts, weights, leaves, direction, eps=1e-6):
    """Central difference of ``sum(weights * value)`` along ``direction`` (one tensor per leaf)."""
    values = []
    for sign in (1.0, -1.0):
        with torch.no_grad():
            for leaf, d in zip(leaves, direction):
                leaf.add_(sign * eps * d)
            values.append(float((solve(cell, x, solver_name, backward_name, opts).value * weights).sum()))
            for leaf, d in zip(leaves, direction):
                leaf.sub_(sign * eps * d)
    return (values[0] - values[1]) / (2 * eps)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("backward_name", list(BACKWARDS))
@pytest.mark.parametrize("solver_name", list(SOLVERS))
def test_combination(solver_name, backward_name, norm):
    for trajectory, active_set, dtype in itertools.product((0, 3), (False, True), (torch.float32, torch.float64)):
        case = f"{solver_name} x {backward_name} x norm={norm} x trajectory={trajectory} x active_set={active_set} x {dtype}"
        cell = AffineCell(norm, dtype)
        x = torch.randn(BATCH, DIM, dtype=dtype, generator=torch.Generator().manual_seed(1)) * torch.tensor(
            [[0.1], [1.0], [10.0]], dtype=dtype)  # samples of different sizes stop at different steps
        x.requires_grad_(True)
        opts = options(backward_name, trajectory, active_set)
        if dtype == torch.float32 and opts["tol"] is not None:
            opts["tol"] = 1e-6

        # (c) refused combinations raise at call time, in every grad mode
        match = refusal(solver_name, backward_name, active_set)
        if match is not None:
            for mode in GRAD_MODES:
                with mode(), pytest.raises(ValueError, match=match):
                    solve(cell, x, solver_name, backward_name, opts)
            continue

        # (a) the same values with autograd, without it, and in eval mode
        state = {k: v.clone() for k, v in cell.named_buffers()}  # spectral norm's power-iteration vectors
        live = solve(cell, x, solver_name, backward_name, opts)
        restore(cell, state)
        with torch.no_grad():
            plain = solve(cell, x, solver_name, backward_name, opts)
        assert same_values(live, plain), f"value depends on grad mode: {case}"
        assert live.result == plain.result and torch.equal(live.stats.steps, plain.stats.steps), case
        restore(cell, state)
        with torch.inference_mode():
            served = solve(cell, x, solver_name, backward_name, opts)
        assert same_values(served, plain), f"value differs under inference_mode: {case}"
        assert served.result == plain.result and torch.equal(served.stats.steps, plain.stats.steps), case
        cell.eval()
        evaluated = solve(cell, x, solver_name, backward_name, opts)
        with torch.no_grad():
            evaluated_plain = solve(cell, x, solver_name, backward_name, opts)
        assert same_values(evaluated, evaluated_plain), f"value depends on grad mode in eval(): {case}"
        assert evaluated.value.requires_grad, f"eval() with autograd built no graph: {case}"
        if norm != "spectral":  # spectral norm's weight itself differs between train() and eval()
            assert same_values(evaluated, plain), f"value depends on train()/eval(): {case}"
        cell.train()
        restore(cell, state)

        # (b) every parameter gets the mode's gradient, from the value and from each kept iterate
        leaves = [x, *cell.parameters()]
        assert len(live.trajectory) == min(trajectory, int(live.stats.steps.max())), case
        for out in (live.value, *live.trajectory):
            grads = torch.autograd.grad(out.square().sum(), leaves, retain_graph=True, allow_unused=True)
            missing = [i for i, g in enumerate(grads) if g is None or not bool(torch.isfinite(g).all()) or not bool(g.abs().sum() > 0)]
            assert not missing, f"leaves {missing} got no gradient: {case}"
        if dtype != torch.float64:
            continue
        weights = torch.randn(BATCH, DIM, dtype=dtype, generator=torch.Generator().manual_seed(2))
        restore(cell, state)
        # spectral norm's training-mode power iteration treats its vectors as constants, so its
        # autograd gradient is not the derivative of the weight finite differences see; in eval()
        # the vectors are fixed and both agree
        cell.train(norm != "spectral")
        sol = solve(cell, x, solver_name, backward_name, opts)
        grads = torch.autograd.grad((sol.value * weights).sum(), leaves)
        if backward_name.startswith("unrolled"):
            direction = [torch.randn(leaf.shape, dtype=dtype, generator=torch.Generator().manual_seed(3 + i)) for i, leaf in enumerate(leaves)]
            expected = finite_difference(cell, x, solver_name, backward_name, opts, weights, leaves, direction)
            got = float(sum((g * d).sum() for g, d in zip(grads, direction)))
            assert abs(got - expected) <= 1e-6 * max(1.0, abs(expected)), f"{got} vs {expected}: {case}"
        else:
            restore(cell, state)
            with parametrize.cached():  # the solve computes its normalised weights once, so does the reference
                reference = torch.autograd.grad(reference_loss(cell, x, sol, backward_name, weights), leaves)
            for g, r in zip(grads, reference):
                torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-8, msg=lambda m: f"{case}: {m}")


@settings(max_examples=30, deadline=None)
@given(
    solver_name=st.sampled_from(sorted(SOLVERS)),
    backward_name=st.sampled_from(sorted(BACKWARDS)),
    batch=st.integers(1, 5),
    dim=st.integers(1, 6),
    rho=st.floats(0.1, 0.95),
    seed=st.integers(0, 2 ** 16),
    trajectory=st.integers(0, 4),
)
def test_values_never_depend_on_grad_mode(solver_name, backward_name, batch, dim, rho, seed, trajectory):
    if refusal(solver_name, backward_name, False):
        return
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    w = (rho * w / torch.linalg.matrix_norm(w, ord=2)).requires_grad_(True)
    x = torch.randn(batch, dim, generator=g, dtype=torch.float64).requires_grad_(True)

    def f(z, x):
        return torch.tanh(z @ w.T + x)

    kw = dict(inputs=(x,), solver=SOLVERS[solver_name](), backward=BACKWARDS[backward_name](), tol=1e-8,
              max_steps=7, trajectory=trajectory, throw=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        live = deqkit.fixed_point(f, torch.zeros(batch, dim, dtype=torch.float64), **kw)
        with torch.no_grad():
            plain = deqkit.fixed_point(f, torch.zeros(batch, dim, dtype=torch.float64), **kw)
        with torch.inference_mode():
            served = deqkit.fixed_point(f, torch.zeros(batch, dim, dtype=torch.float64), **kw)
    assert same_values(live, plain) and same_values(served, plain)
    assert live.value.requires_grad and all(t.requires_grad for t in live.trajectory)
