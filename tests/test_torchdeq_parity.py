"""deqkit against torchdeq 0.1.0: the same fixed points, the adapter's stats, the cost in calls of f."""

from __future__ import annotations

import pytest
import torch

import deqkit
from _zoo import Case, Counter, affine, cos, generator, mlp_cell, residual, solve, spectral_scale

torchdeq_solver = pytest.importorskip("torchdeq.solver")

F64 = torch.float64

PAIRS = [
    pytest.param(deqkit.FixedPoint(), "fixed_point_iter", {}, id="fixed_point"),
    pytest.param(deqkit.Anderson(m=5), "anderson", dict(m=5), id="anderson"),
    pytest.param(deqkit.Broyden(memory=10), "broyden", {}, id="broyden"),
]

# (builder, an upper bound on the map's contraction factor)
PROBLEMS = [
    pytest.param(lambda: affine(dim=6, batch=3, contraction=0.8), 0.8, id="affine"),
    pytest.param(lambda: mlp_cell(dim=8, batch=4, norm=0.8), 0.8, id="mlp_cell"),
    pytest.param(lambda: cos(batch=3, dim=2), 0.7, id="cos"),
]


def run_torchdeq(name, case, *, tol, stop_mode="abs", max_iter=200, **kwargs):
    """torchdeq's own API: func takes only z, so the inputs go in by closure."""
    f = Counter(lambda z: case.f(z, *case.inputs))
    with torch.no_grad():
        z, _, info = torchdeq_solver.get_solver(name)(f, case.z0, max_iter=max_iter, tol=tol, stop_mode=stop_mode, **kwargs)
    return z, info, f.calls


@pytest.mark.parametrize("make, contraction", PROBLEMS)
@pytest.mark.parametrize("solver, name, kwargs", PAIRS)
def test_same_fixed_point_as_torchdeq(make, contraction, solver, name, kwargs):
    case = make()
    tol = 1e-9
    z_td, info, _ = run_torchdeq(name, case, tol=tol, **kwargs)
    sol = solve(case.f, case.z0, inputs=case.inputs, solver=solver, tol=tol, stop_mode="abs", max_steps=200)
    assert sol.success
    assert float(info["abs_lowest"].max()) < tol  # torchdeq got there too
    # both are within residual / (1 - L) of the one fixed point of an L-contraction
    bound = 2 * tol / (1 - contraction)
    assert float(torch.linalg.vector_norm(sol.value - z_td, dim=1).max()) <= bound
    if case.z_star is not None:
        assert float(torch.linalg.vector_norm(sol.value - case.z_star, dim=1).max()) <= bound


@pytest.mark.parametrize("make, contraction", PROBLEMS)
@pytest.mark.parametrize("name", ["anderson", "broyden", "fixed_point_iter"])
def test_adapter_maps_torchdeqs_stats(make, contraction, name):
    case = make()
    tol = 1e-8
    _, info, torchdeq_calls = run_torchdeq(name, case, tol=tol, stop_mode="rel")
    f = Counter(case.f)
    sol = solve(f, case.z0, inputs=case.inputs, solver=deqkit.TorchDEQSolver(name), tol=tol, max_steps=200)
    s = sol.stats
    batch = case.z0.shape[0]
    assert s.nfev == f.calls == torchdeq_calls  # the value is torchdeq's own: no extra call
    assert s.residual.shape == (batch,) and s.steps.shape == (batch,)
    assert s.trace.shape == (batch, torchdeq_calls)  # one residual per call torchdeq made
    assert bool((s.steps >= 1).all()) and bool((s.steps <= torchdeq_calls).all())
    torch.testing.assert_close(s.residual, info["rel_lowest"].to(s.residual.dtype), rtol=0, atol=0)
    assert torch.equal(s.converged, s.residual <= tol)
    assert sol.success and bool(s.converged.all())
    assert torch.equal(s.status, torch.zeros(batch, dtype=torch.long))
    assert bool((residual(case.f, sol.value, case.inputs) <= 2 * tol).all())


def test_adapter_reports_max_steps_per_sample():
    case = affine(dim=6, batch=3, contraction=0.95)
    sol = solve(case.f, case.z0, inputs=case.inputs, solver=deqkit.TorchDEQSolver("fixed_point_iter"), tol=1e-12, max_steps=5, throw=False)
    assert sol.result == deqkit.Result.MAX_STEPS
    assert not bool(sol.stats.converged.any())
    assert torch.equal(sol.stats.status, torch.full((3,), int(deqkit.Result.MAX_STEPS)))
    with pytest.raises(deqkit.SolveError, match="MAX_STEPS"):
        solve(case.f, case.z0, inputs=case.inputs, solver=deqkit.TorchDEQSolver("fixed_point_iter"), tol=1e-12, max_steps=5, throw_on_max_steps=True)


def test_adapter_trace_is_a_residual_history():
    case = cos(batch=2, dim=2)
    tol = 1e-6
    sol = solve(case.f, case.z0, solver=deqkit.TorchDEQSolver("fixed_point_iter"), tol=tol, max_steps=100)
    s = sol.stats
    # fixed_point_iter's first residual is that of z0: ||cos(0) - 0|| / ||cos(0)|| = 1
    torch.testing.assert_close(s.trace[:, 0], residual(case.f, case.z0), rtol=1e-9, atol=0)
    assert bool((s.trace[:, -1] <= tol).all())  # the residual that stopped it is recorded


def tanh_layer(norm=0.9, dim=32, batch=8) -> Case:
    g = generator(1)
    w = spectral_scale(torch.randn(dim, dim, generator=g), norm)
    x = torch.randn(batch, dim, generator=g)
    return Case(lambda z, x: torch.tanh(z @ w.T + x), torch.zeros(batch, dim), (x,))


@pytest.mark.parametrize(
    "make", [lambda: cos(batch=8, dim=4), lambda: tanh_layer(norm=0.9)], ids=["cos", "tanh_layer_0.9"]
)
def test_anderson_needs_no_more_calls_than_torchdeqs(make):
    case = make()
    tol = 1e-4
    _, info, torchdeq_calls = run_torchdeq("anderson", case, tol=tol, stop_mode="rel", m=5, max_iter=100)
    assert float(info["rel_lowest"].max()) < tol  # torchdeq stops when every sample is below tol
    f = Counter(case.f)
    sol = solve(f, case.z0, inputs=case.inputs, solver=deqkit.Anderson(m=5), tol=tol, stop_mode="rel", max_steps=100)
    assert sol.success
    assert f.calls == sol.stats.nfev <= torchdeq_calls
