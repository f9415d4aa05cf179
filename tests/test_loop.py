"""Per-sample semantics of the shared iteration loop: stopping, freezing, counting, active sets."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.autograd import forward_ad

import deqkit
from _zoo import HETEROGENEOUS_RATES, Counter, cos, heterogeneous, mlp_cell, residual, solve
from conftest import PER_SAMPLE_SOLVERS, SOLVERS

F64 = torch.float64


# -- a batch is a set of independent solves ---------------------------------------------------


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("make", [heterogeneous, mlp_cell], ids=["heterogeneous", "mlp_cell"])
def test_batch_equals_each_sample_alone(solver, make):
    case = make()
    tol = 1e-9
    batch = solve(case.f, case.z0, inputs=case.inputs, solver=solver, tol=tol, max_steps=1000)
    assert batch.success
    for i in range(case.z0.shape[0]):
        rows = slice(i, i + 1)
        alone = solve(case.f, case.z0[rows], inputs=tuple(x[rows] for x in case.inputs), solver=solver, tol=tol, max_steps=1000)
        assert alone.success
        # both are within ~tol / (1 - contraction) of the same fixed point
        torch.testing.assert_close(batch.value[rows], alone.value, rtol=0, atol=1e-7)
        if solver in [p.values[0] for p in PER_SAMPLE_SOLVERS]:
            assert int(batch.stats.steps[i]) == int(alone.stats.steps[0])


def test_fixed_point_steps_follow_each_samples_contraction_rate():
    # z_i -> c_i Q z_i + b_i with Q orthogonal: the residual shrinks by exactly c_i per step,
    # so sample i stops after 1 + ceil(log(tol / r0_i) / log(c_i)) evaluations (r0_i = ||b_i||).
    case = heterogeneous()
    tol = 1e-8
    sol = solve(case.f, case.z0, inputs=case.inputs, solver=deqkit.FixedPoint(), tol=tol, stop_mode="abs", max_steps=2000)
    r0 = torch.linalg.vector_norm(case.inputs[1], dim=1)
    expected = [1 + math.ceil(math.log(tol / float(r)) / math.log(c)) for r, c in zip(r0, HETEROGENEOUS_RATES)]
    assert sol.stats.steps.tolist() == expected
    assert expected == sorted(expected) and len(set(expected)) == len(expected)  # all different
    assert sol.stats.nfev == max(expected)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("max_steps", [3, 8, 300])
@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
def test_converged_is_exactly_residual_below_tol(solver, max_steps, stop_mode):
    case = heterogeneous()
    tol = 1e-6
    s = solve(case.f, case.z0, inputs=case.inputs, solver=solver, tol=tol, stop_mode=stop_mode, max_steps=max_steps, throw=False).stats
    assert torch.equal(s.converged, s.residual <= tol)
    expected_status = torch.where(s.converged, int(deqkit.Result.SUCCESS), int(deqkit.Result.MAX_STEPS))
    assert torch.equal(s.status, expected_status)
    assert s.stop_mode == stop_mode and s.tol == tol
    assert bool((s.steps >= 1).all()) and bool((s.steps <= max_steps).all())
    # a sample still running at the end used the whole budget
    assert bool((s.steps[~s.converged] == max_steps).all())


@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
def test_a_residual_equal_to_tol_counts_as_converged(stop_mode):
    # f(z) = z / 2 + 1 from z0 = 2 - 2^-9: f(z0) - z0 = 2^-10 exactly, in binary floating point
    z0 = torch.full((2, 1), 2 - 2.0**-9, dtype=F64)
    fz0 = 2 - 2.0**-10
    tol = 2.0**-10 if stop_mode == "abs" else float(torch.tensor(2.0**-10, dtype=F64) / (fz0 + 1e-9))
    sol = solve(lambda z: z / 2 + 1, z0, solver=deqkit.FixedPoint(), tol=tol, stop_mode=stop_mode)
    assert float(sol.stats.residual[0]) == tol
    assert sol.success and sol.stats.steps.tolist() == [1, 1]


@pytest.mark.parametrize("solver", SOLVERS)
def test_trace_is_the_residual_history(solver):
    case = heterogeneous()
    tol = 1e-8
    s = solve(case.f, case.z0, inputs=case.inputs, solver=solver, tol=tol, max_steps=1000).stats
    batch = case.z0.shape[0]
    assert s.trace.shape == (batch, int(s.steps.max()))
    assert s.trace.dtype == s.residual.dtype and s.residual.shape == (batch,)
    # the first entry is the residual of z0, computed here independently
    torch.testing.assert_close(s.trace[:, 0], residual(case.f, case.z0, case.inputs), rtol=1e-12, atol=0)
    for i in range(batch):
        k = int(s.steps[i])
        assert bool((s.trace[i, : k - 1] > tol).all())  # it stops at the first residual <= tol ...
        assert float(s.trace[i, k - 1]) <= tol
        assert bool((s.trace[i, k - 1 :] == s.residual[i]).all())  # ... and keeps it from then on
    assert torch.equal(s.trace[:, -1], s.residual)
    assert torch.equal(s.residual, s.trace.min(dim=1).values)


@pytest.mark.parametrize("active_set", [False, True])
@pytest.mark.parametrize("solver", SOLVERS)
def test_nfev_and_sample_evals_count_calls_of_f(solver, active_set):
    case = heterogeneous()
    f = Counter(case.f)
    s = solve(f, case.z0, inputs=case.inputs, solver=solver, tol=1e-9, max_steps=500, active_set=active_set).stats
    assert s.nfev == f.calls
    assert s.sample_evals == f.rows
    if not active_set:
        assert s.sample_evals == s.nfev * case.z0.shape[0]


def test_nfev_counts_the_backward_modes_call_of_f_too():
    case = mlp_cell()
    f = Counter(case.f)
    sol = deqkit.fixed_point(f, case.z0, inputs=case.inputs, tol=1e-8)  # autograd on: Implicit
    assert sol.stats.nfev == f.calls
    with torch.no_grad():
        plain = deqkit.fixed_point(case.f, case.z0, inputs=case.inputs, tol=1e-8)
    torch.testing.assert_close(sol.value.detach(), plain.value, rtol=0, atol=1e-12)


def test_value_needs_no_grad_when_nothing_does():
    sol = deqkit.fixed_point(torch.cos, torch.zeros(2, 3), tol=1e-6)  # grad mode on, no parameter
    assert not sol.value.requires_grad
    w = torch.tensor(0.5, requires_grad=True)
    sol = deqkit.fixed_point(lambda z: w * torch.cos(z), torch.zeros(2, 3), tol=1e-6)
    assert sol.value.requires_grad


# -- active set ---------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", SOLVERS)
def test_active_set_gives_the_same_values_for_fewer_sample_evals(solver):
    case = heterogeneous()
    kwargs = dict(inputs=case.inputs, solver=solver, tol=1e-10, max_steps=1000)
    full = solve(case.f, case.z0, active_set=False, **kwargs)
    f = Counter(case.f)
    active = solve(f, case.z0, active_set=True, **kwargs)
    torch.testing.assert_close(active.value, full.value, rtol=0, atol=1e-10)
    assert torch.equal(active.stats.steps, full.stats.steps)
    assert active.stats.nfev == full.stats.nfev
    if len(set(full.stats.steps.tolist())) > 1:  # samples finished at different steps
        assert active.stats.sample_evals < full.stats.sample_evals
        assert min(f.batch_sizes) < case.z0.shape[0]
    # each sample entered f exactly as many times as it iterated (JVPs aside)
    if not isinstance(solver, deqkit.NewtonKrylov):
        assert active.stats.sample_evals == int(active.stats.steps.sum())


def test_active_set_slices_per_sample_inputs():
    # f checks that every row of z meets its own input: z and x carry the sample index.
    batch, dim = 5, 3
    rates = torch.tensor([0.1, 0.9, 0.2, 0.95, 0.5], dtype=F64).unsqueeze(1)
    ids = torch.arange(batch, dtype=F64).unsqueeze(1)
    seen = []

    def f(z, c, sample_id):
        assert z.shape[0] == c.shape[0] == sample_id.shape[0]
        seen.append(sample_id[:, 0].tolist())
        return c * z + sample_id  # fixed point: sample_id / (1 - c)

    z0 = torch.zeros(batch, dim, dtype=F64)
    sol = solve(f, z0, inputs=(rates, ids), solver=deqkit.FixedPoint(), tol=1e-10, max_steps=1000, active_set=True)
    expected = (ids / (1 - rates)).expand(batch, dim)
    torch.testing.assert_close(sol.value, expected, rtol=1e-8, atol=1e-8)
    assert [0.0, 1.0, 2.0, 3.0, 4.0] in seen and [3.0] in seen  # the whole batch, then the slowest alone


def test_active_set_with_a_closure_over_the_batch_names_inputs():
    case = heterogeneous()
    c, b = case.inputs

    def captured(z):  # per-sample inputs captured instead of passed through inputs=
        return c * z + b

    with pytest.raises(RuntimeError, match="must match the size") as info:  # f's own error, its own type
        solve(captured, case.z0, solver=deqkit.FixedPoint(), tol=1e-10, max_steps=1000, active_set=True)
    assert type(info.value) is RuntimeError
    assert any("inputs=" in note and "active_set=True" in note for note in info.value.__notes__)
    # without the active set the closure is fine
    assert solve(captured, case.z0, solver=deqkit.FixedPoint(), tol=1e-10, max_steps=1000).success


def test_active_set_with_one_sample_left_and_a_broadcasting_closure_names_inputs():
    # A closure whose batch-sized input broadcasts against a single active row returns the whole
    # batch: the shape check must catch it, not return garbage.
    rates = torch.tensor([[0.1], [0.95]], dtype=F64)
    b = torch.ones(2, 3, dtype=F64)
    with pytest.raises(ValueError, match="inputs="):
        solve(lambda z: rates * z + b, torch.zeros(2, 3, dtype=F64), solver=deqkit.FixedPoint(),
              tol=1e-10, max_steps=1000, active_set=True)


# -- frozen samples, trajectory ----------------------------------------------------------------


@pytest.mark.parametrize("active_set", [False, True])
@pytest.mark.parametrize("solver", SOLVERS)
def test_a_converged_sample_stops_changing(solver, active_set):
    case = heterogeneous(nonlinear=True)
    calls = []

    def f(z, c, b):
        if forward_ad.unpack_dual(z).tangent is None:  # NewtonKrylov's JVP calls aside
            calls.append((z.clone(), c.clone()))
        return case.f(z, c, b)

    sol = solve(f, case.z0, inputs=case.inputs, solver=solver, tol=1e-9, max_steps=1000, active_set=active_set)
    steps = sol.stats.steps
    assert len(set(steps.tolist())) > 1
    for i, c_i in enumerate(case.inputs[0][:, 0].tolist()):
        # the iterates f saw for sample i, in order (rows found by their rate c_i)
        zs = [z[(c[:, 0] == c_i).nonzero()[0, 0]] for z, c in calls if bool((c[:, 0] == c_i).any())]
        k = int(steps[i])
        assert len(zs) == k if active_set else len(zs) >= k  # the active set never calls f on it again
        for later in zs[k:]:  # after its k-th evaluation sample i is never moved again
            assert torch.equal(later, zs[k - 1])
        torch.testing.assert_close(sol.value[i], case.f(zs[k - 1][None], *(x[i : i + 1] for x in case.inputs))[0], rtol=0, atol=1e-14)


@pytest.mark.parametrize("active_set", [False, True])
def test_a_failed_sample_rests_at_its_best_iterate(active_set):
    # Sample 1 runs away (a = 1.5) and f turns NaN past z = 2. The solver below couples the rows
    # (any NaN it is shown spreads to every sample), so the others only succeed if the failed
    # sample is shown its best finite iterate from then on, never the NaN.
    class Coupled:
        def init(self, z, fz, problem):
            return None

        def step(self, z, fz, state, problem):
            assert bool(torch.isfinite(z).all() and torch.isfinite(fz).all())
            return fz + 0 * fz.sum(dim=0, keepdim=True), state

    def f(z, a):
        return torch.where(z > 2, float("nan"), a * z + 1)

    a = torch.tensor([[0.5], [1.5], [0.5]], dtype=F64)
    sol = solve(f, torch.zeros(3, 1, dtype=F64), inputs=(a,), solver=Coupled(), tol=1e-10, stop_mode="abs",
                max_steps=100, active_set=active_set, throw=False)
    assert sol.stats.status.tolist() == [0, int(deqkit.Result.NONFINITE), 0]
    torch.testing.assert_close(sol.value[[0, 2]], torch.full((2, 1), 2.0, dtype=F64), rtol=0, atol=1e-9)
    assert float(sol.value[1, 0]) == 1.0  # f(z0): z0 = 0 had the lowest residual (1, then 1.5)


@pytest.mark.parametrize("k", [0, 1, 3])
def test_trajectory_keeps_the_last_k_images(k):
    case = cos(batch=2, dim=3)
    sol = solve(case.f, case.z0, solver=deqkit.FixedPoint(), tol=1e-6, max_steps=100, trajectory=k)
    assert isinstance(sol.trajectory, tuple) and len(sol.trajectory) == k
    for t in sol.trajectory:
        assert t.shape == case.z0.shape and t.dtype == case.z0.dtype
    if k:
        torch.testing.assert_close(sol.trajectory[-1], sol.value, rtol=0, atol=0)
    for older, newer in zip(sol.trajectory, sol.trajectory[1:]):  # plain iteration: z_{k+1} = f(z_k)
        torch.testing.assert_close(newer, torch.cos(older), rtol=0, atol=0)


def test_trajectory_longer_than_the_run_keeps_every_image():
    case = cos(batch=1, dim=1)
    sol = solve(case.f, case.z0, solver=deqkit.FixedPoint(), tol=1e-3, max_steps=100, trajectory=1000)
    assert len(sol.trajectory) == int(sol.stats.steps[0])
    torch.testing.assert_close(sol.trajectory[0], torch.cos(case.z0), rtol=0, atol=0)


# -- mixed precision ---------------------------------------------------------------------------


def test_f_under_autocast_keeps_the_state_in_float32():
    torch.manual_seed(0)
    layer = nn.Linear(8, 8)
    with torch.no_grad():
        layer.weight.mul_(0.5 / torch.linalg.matrix_norm(layer.weight, ord=2))
    x = torch.randn(4, 8)

    def f(z, x):
        out = torch.tanh(layer(z + x))
        assert out.dtype == torch.bfloat16  # f really runs in bf16
        return out

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        sol = deqkit.fixed_point(f, torch.zeros(4, 8), inputs=(x,), solver=deqkit.Anderson(m=5), tol=2e-2, max_steps=50)
    assert sol.value.dtype == torch.float32 and sol.stats.residual.dtype == torch.float32
    assert sol.success
    with torch.no_grad():  # the float32 map agrees to bf16 accuracy
        exact = solve(lambda z, x: torch.tanh(layer(z + x)), torch.zeros(4, 8), inputs=(x,), tol=1e-6)
    torch.testing.assert_close(sol.value, exact.value, rtol=0, atol=5e-2)


def test_f_returning_another_dtype_without_autocast_is_an_error():
    with pytest.raises(ValueError, match="dtype"):
        solve(lambda z: torch.cos(z).to(torch.bfloat16), torch.zeros(2, 3))


@pytest.mark.parametrize("solver", [deqkit.Anderson(m=5), deqkit.Broyden(memory=10)], ids=["anderson", "broyden"])
def test_bfloat16_state_converges_with_float32_arithmetic(solver):
    x = torch.linspace(-1, 1, 24).reshape(3, 8).to(torch.bfloat16)

    def f(z, x):
        return 0.5 * torch.tanh(z) + x

    z0 = torch.zeros(3, 8, dtype=torch.bfloat16)
    sol = solve(f, z0, inputs=(x,), solver=solver, tol=1e-2, max_steps=50)
    assert sol.success and sol.value.dtype == torch.bfloat16
    assert sol.stats.residual.dtype == torch.float32  # norms in float32, not bf16
    exact = solve(f, z0.double(), inputs=(x.double(),), solver=solver, tol=1e-10, max_steps=100)
    torch.testing.assert_close(sol.value.double(), exact.value, rtol=0, atol=3e-2)
