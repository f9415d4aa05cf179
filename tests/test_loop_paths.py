"""The loop's cost-saving paths give the plain loop's answers: active-set compaction (the
solver's state shrinks with the samples still iterating), ``check_every`` (fewer tests of
convergence) and the one host synchronisation per test."""

from __future__ import annotations

import collections
import math

import pytest
import torch
from torch.overrides import TorchFunctionMode

import deqkit
from _zoo import heterogeneous, solve

F64 = torch.float64
# eight samples contracting from fast to slow: most stop early, so the working set is compacted
RATES = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.9, 0.97)
STATEFUL = [
    pytest.param(deqkit.FixedPoint(), id="fixed_point"),
    pytest.param(deqkit.Anderson(m=5), id="anderson"),
    pytest.param(deqkit.Broyden(memory=10), id="broyden"),
    pytest.param(deqkit.NewtonKrylov(krylov_dim=8, krylov_rtol=1e-8), id="newton_krylov"),
]


class Recording:
    """Wraps a solver and records the batch size of every step (and whether it can compact)."""

    def __init__(self, solver, with_select: bool = True):
        self.solver = solver
        self.sizes: list[int] = []
        if with_select:
            self.select = solver.select

    def init(self, z, fz, problem):
        return self.solver.init(z, fz, problem)

    def step(self, z, fz, state, problem):
        self.sizes.append(z.shape[0])
        return self.solver.step(z, fz, state, problem)


def _case(nonlinear: bool = True):
    return heterogeneous(dim=6, rates=RATES, nonlinear=nonlinear)


@pytest.mark.parametrize("solver", STATEFUL)
def test_compacted_active_set_gives_the_whole_batch_values(solver):
    case = _case()
    kwargs = dict(inputs=case.inputs, tol=1e-10, max_steps=400)
    whole = solve(case.f, case.z0, solver=solver, **kwargs)
    recording = Recording(solver)
    active = solve(case.f, case.z0, solver=recording, active_set=True, **kwargs)
    assert active.success and whole.success
    torch.testing.assert_close(active.value, whole.value, rtol=1e-6, atol=0)
    torch.testing.assert_close(active.stats.trace, whole.stats.trace, rtol=1e-6, atol=1e-14)
    assert torch.equal(active.stats.steps, whole.stats.steps)
    assert torch.equal(active.stats.status, whole.stats.status)
    torch.testing.assert_close(active.stats.residual, whole.stats.residual, rtol=1e-6, atol=1e-14)
    # the steps ran on fewer rows once most samples had stopped
    assert recording.sizes[0] == len(RATES) and min(recording.sizes) < len(RATES) / 2
    assert recording.sizes == sorted(recording.sizes, reverse=True)


def test_compaction_is_done_a_few_times_not_at_every_stop():
    rates = tuple(0.05 + 0.9 * i / 31 for i in range(32))  # 32 samples, each stopping at its own step
    case = heterogeneous(dim=4, rates=rates)
    recording = Recording(deqkit.FixedPoint())
    sol = solve(case.f, case.z0, inputs=case.inputs, solver=recording, tol=1e-10, max_steps=2000, active_set=True)
    assert sol.success and len(set(sol.stats.steps.tolist())) > 16
    sizes = sorted(set(recording.sizes), reverse=True)
    assert 3 <= len(sizes) <= 16  # compacted O(log B) times, each time to at most 3/4 of the rows
    assert all(b <= math.floor(0.75 * a) for a, b in zip(sizes, sizes[1:]))


def test_a_solver_without_select_steps_over_the_whole_batch():
    case = _case()
    kwargs = dict(inputs=case.inputs, tol=1e-10, max_steps=400)
    recording = Recording(deqkit.Anderson(m=5), with_select=False)
    active = solve(case.f, case.z0, solver=recording, active_set=True, **kwargs)
    whole = solve(case.f, case.z0, solver=deqkit.Anderson(m=5), **kwargs)
    assert set(recording.sizes) == {len(RATES)}
    torch.testing.assert_close(active.value, whole.value, rtol=1e-6, atol=0)
    assert active.stats.sample_evals < whole.stats.sample_evals


@pytest.mark.parametrize("k", [1, 3])
def test_trajectory_under_compaction_is_the_whole_batch_trajectory(k):
    case = _case()
    kwargs = dict(inputs=case.inputs, solver=deqkit.Anderson(m=5), tol=1e-10, max_steps=400, trajectory=k)
    whole = solve(case.f, case.z0, **kwargs)
    active = solve(case.f, case.z0, active_set=True, **kwargs)
    assert len(active.trajectory) == len(whole.trajectory) == k
    for a, w in zip(active.trajectory, whole.trajectory):
        assert a.shape == w.shape
        torch.testing.assert_close(a, w, rtol=1e-6, atol=0)


def test_f_sees_its_own_rows_after_compaction():
    # sample i carries i in its input; f checks each row against the rows deqkit says it gets
    from deqkit._context import current_rows

    case = _case(nonlinear=False)
    index = torch.arange(len(RATES), dtype=F64).unsqueeze(1)
    seen = []

    def f(z, c, b, i):
        rows = current_rows()
        expected = torch.arange(len(RATES)) if rows is None else rows
        assert torch.equal(i[:, 0].long(), expected)
        seen.append(z.shape[0])
        return case.f(z, c, b)

    sol = solve(f, case.z0, inputs=case.inputs + (index,), solver=deqkit.Anderson(m=5), tol=1e-10, max_steps=400,
                active_set=True)
    assert sol.success and min(seen) < len(RATES) / 2
    torch.testing.assert_close(sol.value, case.z_star, rtol=0, atol=1e-8)


@pytest.mark.parametrize("solver", [deqkit.FixedPoint(), deqkit.Anderson(m=3), deqkit.Broyden(memory=5)], ids=["fp", "anderson", "broyden"])
def test_unrolled_gradients_under_compaction_equal_the_whole_batch_ones(solver):
    case = _case()
    c, b = (x.clone().requires_grad_(True) for x in case.inputs)
    grads = []
    for active_set in (False, True):
        sol = deqkit.fixed_point(case.f, case.z0, inputs=(c, b), solver=solver, backward=deqkit.Unrolled(), tol=1e-8,
                                 max_steps=200, active_set=active_set)
        grads.append(torch.autograd.grad(sol.value.pow(2).sum(), (c, b)))
    for whole, active in zip(*grads):
        assert torch.isfinite(active).all() and active.abs().sum() > 0
        torch.testing.assert_close(active, whole, rtol=1e-6, atol=1e-12)


def test_a_failed_sample_keeps_its_status_and_best_iterate_after_compaction():
    case = _case(nonlinear=False)

    def f(z, c, b):
        out = case.f(z, c, b)
        return torch.where(c > 0.95, out * float("nan"), out)  # the slowest sample goes NaN at once

    kwargs = dict(inputs=case.inputs, solver=deqkit.Anderson(m=5), tol=1e-10, max_steps=400, throw=False)
    whole = solve(f, case.z0, **kwargs)
    active = solve(f, case.z0, active_set=True, **kwargs)
    assert active.stats.status.tolist() == whole.stats.status.tolist()
    assert int(active.stats.status[-1]) == int(deqkit.Result.NONFINITE)
    torch.testing.assert_close(active.value, whole.value, rtol=1e-6, atol=0, equal_nan=True)


# -- check_every -------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", STATEFUL)
@pytest.mark.parametrize("k", [2, 5])
def test_check_every_with_a_fixed_number_of_steps_gives_the_same_value(solver, k):
    case = _case()
    kwargs = dict(inputs=case.inputs, solver=solver, tol=None, max_steps=12)
    every = solve(case.f, case.z0, **kwargs)
    sparse = solve(case.f, case.z0, check_every=k, **kwargs)
    assert torch.equal(sparse.value, every.value)
    assert sparse.stats.steps.tolist() == [12] * len(RATES)
    tested = [i for i in range(1, 13) if i % k == 0 or i == 12]
    assert sparse.stats.trace.shape == (len(RATES), len(tested))
    torch.testing.assert_close(sparse.stats.trace, every.stats.trace[:, [i - 1 for i in tested]], rtol=1e-12, atol=0)


@pytest.mark.parametrize("k", [3, 7])
def test_check_every_stops_each_sample_at_its_first_tested_iteration_below_tol(k):
    case = _case(nonlinear=False)  # plain iteration: each residual falls monotonically
    kwargs = dict(inputs=case.inputs, solver=deqkit.FixedPoint(), tol=1e-8, stop_mode="abs", max_steps=2000)
    every = solve(case.f, case.z0, **kwargs)
    sparse = solve(case.f, case.z0, check_every=k, **kwargs)
    assert sparse.success
    # iterations k, 2k, ... are tested: a sample stops at the first multiple of k at or after
    # the iteration where the plain loop stopped it
    expected = [k * math.ceil(s / k) for s in every.stats.steps.tolist()]
    assert expected != every.stats.steps.tolist()
    assert sparse.stats.steps.tolist() == expected
    assert (sparse.stats.residual <= 1e-8).all()


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_check_every_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match="check_every must be an integer >= 1"):
        deqkit.fixed_point(torch.cos, torch.zeros(2, 2), check_every=bad)
    with pytest.raises(ValueError, match="check_every"):
        deqkit.DEQ(torch.nn.Identity(), check_every=bad)


def test_deq_passes_check_every_to_its_solve():
    deq = deqkit.DEQ(lambda z, x: 0.5 * z + x, solver=deqkit.FixedPoint(), tol=None, max_steps=9, check_every=4)
    with torch.no_grad():
        sol = deq(torch.ones(3, 2))
    assert sol.stats.trace.shape == (3, 3)  # tested at 4, 8 and the last, 9


# -- host synchronisations ---------------------------------------------------------------------

# operations that make the host wait for the device (a copy to the host, or a value the host
# needs to go on)
_SYNCING = {"cpu", "item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "argwhere",
            "masked_select", "unique", "numpy"}


class SyncCounter(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _SYNCING and not (name == "numpy"):  # .numpy() follows .cpu(): one transfer
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def _syncs(solver, max_steps: int, **kwargs) -> int:
    case = _case()
    with torch.no_grad(), SyncCounter() as counter:
        deqkit.fixed_point(case.f, case.z0, inputs=case.inputs, solver=solver, max_steps=max_steps, **kwargs)
    return sum(counter.counts.values())


@pytest.mark.parametrize("solver", STATEFUL[:3])
def test_one_host_synchronisation_per_iteration(solver):
    assert _syncs(solver, 24, tol=None) - _syncs(solver, 12, tol=None) == 12


@pytest.mark.parametrize("solver", STATEFUL[:3])
def test_check_every_k_synchronises_once_per_k_iterations(solver):
    assert _syncs(solver, 24, tol=None, check_every=4) - _syncs(solver, 12, tol=None, check_every=4) == 3


def test_the_active_set_adds_no_synchronisation():
    case = _case()
    for active_set in (False, True):
        with torch.no_grad(), SyncCounter() as counter:
            sol = deqkit.fixed_point(case.f, case.z0, inputs=case.inputs, solver=deqkit.Anderson(m=5), tol=1e-10,
                                     max_steps=400, active_set=active_set)
        iterations = sol.stats.nfev - 1
        assert sum(counter.counts.values()) <= iterations + 8, counter.counts


# -- the safeguards the fast paths must keep ---------------------------------------------------


def test_anderson_takes_a_plain_step_and_restarts_when_its_least_squares_overflows():
    # sample 0's stored residuals are ~1e20 (float32): g g^T overflows and the solve gives NaN;
    # sample 1 is ordinary. The step falls back to f(z) for sample 0 and forgets its memory.
    from deqkit._problem import Problem

    solver = deqkit.Anderson(m=3)
    z = torch.zeros(2, 4)
    problem = Problem(lambda z: z, z)  # computes the residual itself (the loop has none to share)
    state = solver.init(z, z, problem)
    big = torch.tensor([[1e20] * 4, [1.0] * 4])
    for k in range(2):  # two stored residuals
        fz = z + big / (k + 1)
        z, state = solver.step(z, fz, state, problem)
    fz = z + big / 3
    z_next, state = solver.step(z, fz, state, problem)
    assert torch.isfinite(z_next).all()
    assert torch.equal(z_next[0], fz[0])  # the plain step
    slot = 2  # the third step writes slot 2
    assert state.valid[0].tolist() == [1.0 if i == slot else 0.0 for i in range(3)]
    assert state.valid[1].tolist() == [1.0, 1.0, 1.0]


def test_a_sample_with_no_finite_residual_reports_nan_not_inf():
    def f(z):
        return torch.cat([z[:1] * float("nan"), 0.5 * z[1:] + 1])

    sol = solve(f, torch.zeros(2, 3), solver=deqkit.Anderson(m=3), tol=1e-8, max_steps=50, throw=False)
    assert sol.stats.status.tolist() == [int(deqkit.Result.NONFINITE), int(deqkit.Result.SUCCESS)]
    assert math.isnan(float(sol.stats.residual[0])) and float(sol.stats.residual[1]) <= 1e-8


@pytest.mark.parametrize("backward", [deqkit.Implicit(tol=1e-12, max_steps=500), deqkit.OneStep()], ids=["implicit", "onestep"])
def test_gradients_at_the_fixed_point_survive_several_compactions(backward):
    # 32 samples stopping at many different steps: the working set is compacted several times,
    # and each sample's best iterate (where the backward mode attaches) must be its own
    rates = tuple(0.05 + 0.9 * i / 31 for i in range(32))
    case = heterogeneous(dim=4, rates=rates, nonlinear=True)
    c, b = (x.clone().requires_grad_(True) for x in case.inputs)
    grads, values = [], []
    for active_set in (False, True):
        recording = Recording(deqkit.FixedPoint())
        sol = deqkit.fixed_point(case.f, case.z0, inputs=(c, b), solver=recording, backward=backward, tol=1e-10,
                                 max_steps=2000, active_set=active_set)
        if active_set:
            assert len(set(recording.sizes)) >= 3
        values.append(sol.value.detach())
        grads.append(torch.autograd.grad(sol.value.pow(2).sum(), (c, b)))
    torch.testing.assert_close(values[1], values[0], rtol=1e-9, atol=0)
    for whole, active in zip(*grads):
        torch.testing.assert_close(active, whole, rtol=1e-8, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch's synchronisation debug mode needs CUDA")
@pytest.mark.parametrize("k", [1, 4])
def test_cuda_synchronisations_counted_by_torch(k):
    # torch warns at every synchronising CUDA call: the difference between 24 and 12 iterations
    # is what the iterations themselves cost
    case = _case()
    f = lambda z, c, b: case.f(z, c, b)  # noqa: E731
    inputs = tuple(x.cuda() for x in case.inputs)

    def warnings_for(steps: int) -> int:
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with torch.no_grad():
                    deqkit.fixed_point(f, case.z0.cuda(), inputs=inputs, solver=deqkit.Anderson(m=5), tol=None,
                                       max_steps=steps, check_every=k)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    assert warnings_for(24) - warnings_for(12) == 12 // k


@pytest.mark.parametrize("k", [2, 6])
def test_check_every_keeps_every_iterate_in_the_trajectory(k):
    case = _case()
    kwargs = dict(inputs=case.inputs, solver=deqkit.Anderson(m=3), tol=None, max_steps=6, trajectory=6)
    every = solve(case.f, case.z0, **kwargs)
    sparse = solve(case.f, case.z0, check_every=k, **kwargs)
    assert len(sparse.trajectory) == len(every.trajectory) == 6
    for a, b in zip(sparse.trajectory, every.trajectory):
        assert torch.equal(a, b)
