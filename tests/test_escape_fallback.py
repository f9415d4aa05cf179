"""Escape detection (a relative test met only because |z| grew is not SUCCESS) and
``deqkit.Fallback`` (samples one solver fails are solved again by the next)."""

from __future__ import annotations

import pickle
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import deqkit

F64 = torch.float64
R = deqkit.Result
SOLVERS = [deqkit.FixedPoint(), deqkit.Anderson(), deqkit.Broyden(), deqkit.NewtonKrylov()]


# -- escape detection ---------------------------------------------------------------------------


@pytest.mark.parametrize("solver", SOLVERS, ids=repr)
@pytest.mark.parametrize("tol", [5e-2, 1e-2, 1e-3, 1e-4])
@pytest.mark.parametrize("start", ["zeros", "randn"])
def test_a_drift_is_never_a_fixed_point(solver, tol, start):
    # from a start whose residual is not already within tol (a sample within tol at its start,
    # as a warm start is, has nothing to judge: it stops there)
    g = torch.Generator().manual_seed(0)
    c = torch.randn(4, 16, generator=g, dtype=F64)
    z0 = torch.randn(4, 16, generator=g, dtype=F64) if start == "randn" else torch.zeros(4, 16, dtype=F64)
    sol = deqkit.fixed_point(lambda z, c: z + c, z0, inputs=(c,), solver=solver, tol=tol, max_steps=3000, throw=False)
    assert not bool((sol.stats.status == R.SUCCESS).any()), sol.stats.status
    assert not bool(sol.stats.converged.any())
    assert set(sol.stats.status.tolist()) <= {int(R.ESCAPED), int(R.MAX_STEPS)}
    if sol.result == R.ESCAPED:
        with pytest.raises(deqkit.SolveError, match="ESCAPED.*only because"):
            deqkit.fixed_point(lambda z, c: z + c, z0, inputs=(c,), solver=solver, tol=tol, max_steps=3000)


class PreLNBlock(torch.nn.Module):
    """A pre-LayerNorm transformer block, ``z + attn(LN(z)) + mlp(LN(z))``, as GET's equilibrium
    map stacks them: while the residual branch stays away from zero the iterate drifts."""

    def __init__(self, dim: int, heads: int = 2):
        super().__init__()
        self.ln1, self.ln2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.attn = torch.nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(), torch.nn.Linear(4 * dim, dim))

    def forward(self, z):
        h = self.ln1(z)
        z = z + self.attn(h, h, h, need_weights=False)[0]
        return z + self.mlp(self.ln2(z))


@pytest.mark.parametrize("solver", SOLVERS[:3], ids=repr)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_get_like_pre_ln_map_at_initialisation_is_never_a_success(solver, seed):
    torch.manual_seed(seed)
    blocks = torch.nn.Sequential(*(PreLNBlock(16) for _ in range(2))).double().eval()
    x = torch.randn(3, 8, 16, dtype=F64)
    f = lambda z, x: blocks(z + x)  # noqa: E731
    with torch.no_grad():
        for tol in (1e-2, 1e-3):
            sol = deqkit.fixed_point(f, torch.randn(3, 8, 16, dtype=F64), inputs=(x,), solver=solver, tol=tol,
                                     max_steps=100, throw=False, divergence=None)
            assert not bool((sol.stats.status == R.SUCCESS).any()), (tol, sol.stats.status)


@settings(max_examples=60, deadline=None)
@given(
    rho=st.floats(0.05, 0.99),
    scale=st.sampled_from([0.0, 1.0, 100.0, 1e4]),
    inject=st.sampled_from([1e-3, 0.1, 1.0, 10.0]),
    dim=st.integers(1, 12),
    batch=st.integers(1, 4),
    tol=st.sampled_from([1e-3, 1e-5, 1e-8]),
    kind=st.sampled_from(["tanh", "linear", "scalar"]),
    solver=st.sampled_from(["fixed_point", "anderson", "broyden"]),
    seed=st.integers(0, 2 ** 16),
)
def test_no_alarm_on_contractions_from_any_start(rho, scale, inject, dim, batch, tol, kind, solver, seed):
    # contractions by more than tol per step: started at 0, near, or far away (|z| shrinking), with
    # small and large injections (|z| growing by up to 1/(1 - rho) from 0)
    g = torch.Generator().manual_seed(seed)
    if kind == "scalar":  # the slowest: every direction contracts by rho
        w = rho * torch.eye(dim, dtype=F64)
    else:
        w = torch.randn(dim, dim, generator=g, dtype=F64)
        w = rho * w / torch.linalg.matrix_norm(w, ord=2)
    x = inject * torch.randn(batch, dim, generator=g, dtype=F64)
    z0 = scale * torch.randn(batch, dim, generator=g, dtype=F64)
    f = (lambda z, x: torch.tanh(z @ w.T + x)) if kind == "tanh" else (lambda z, x: z @ w.T + x)
    s = {"fixed_point": deqkit.FixedPoint(), "anderson": deqkit.Anderson(), "broyden": deqkit.Broyden()}[solver]
    sol = deqkit.fixed_point(f, z0, inputs=(x,), solver=s, tol=tol, max_steps=5000, throw=False)
    assert not bool(sol.stats.escaped.any()), (sol.stats.status, sol.stats.residual)


def test_escape_thresholds_and_switch():
    c = torch.ones(2, 4, dtype=F64)
    kw = dict(inputs=(c,), solver=deqkit.FixedPoint(), throw=False, max_steps=2000)
    drift = lambda z, c: z + c  # noqa: E731
    assert deqkit.fixed_point(drift, torch.zeros(2, 4, dtype=F64), tol=1e-2, **kw).result == R.ESCAPED
    # escape=None: the old, silent answer
    assert deqkit.fixed_point(drift, torch.zeros(2, 4, dtype=F64), tol=1e-2, escape=None, **kw).result == R.SUCCESS
    # stop_mode="abs" never passes on a drift: no escape to judge, the budget runs out
    assert deqkit.fixed_point(drift, torch.zeros(2, 4, dtype=F64), tol=1e-2, stop_mode="abs", max_steps=50,
                              inputs=(c,), solver=deqkit.FixedPoint(), throw=False).result == R.MAX_STEPS
    # the growth factor: tol=0.1 passes at ||f(z)|| = 10 ||f(z0)||; escape=20 lets it pass, 5 does not
    assert deqkit.fixed_point(drift, torch.zeros(2, 4, dtype=F64), tol=0.1, escape=20.0, **kw).result == R.SUCCESS
    assert deqkit.fixed_point(drift, torch.zeros(2, 4, dtype=F64), tol=0.1, escape=5.0, **kw).result == R.ESCAPED
    # the absolute residual halving is a fall: f = z + c (1 - z/(2 zmax)) contracts late
    with pytest.raises(ValueError, match="escape must be a number > 1"):
        deqkit.SolveOptions(escape=1.0)
    # tol=None tests nothing, so nothing escapes
    assert deqkit.fixed_point(drift, torch.zeros(2, 4, dtype=F64), tol=None, max_steps=20, inputs=(c,),
                              solver=deqkit.FixedPoint()).result == R.SUCCESS


def test_a_residual_that_fell_from_its_peak_is_a_fall_and_one_that_rounds_to_zero_is_not():
    # a map that first amplifies a tiny start (unstable at 0), then settles at +-1 far away:
    # ||f(z)|| grows 1000x, the residual rises, then falls from its peak: a fixed point
    x = torch.full((2, 3), 1e-3, dtype=F64)
    bistable = lambda z, x: torch.tanh(3.0 * z + x)  # noqa: E731
    sol = deqkit.fixed_point(bistable, torch.zeros(2, 3, dtype=F64), inputs=(x,), solver=deqkit.FixedPoint(), tol=1e-2,
                             max_steps=200)
    assert sol.success and float(sol.value.abs().min()) > 0.9
    first = float(torch.linalg.vector_norm(torch.tanh(x[0])))
    assert float(torch.linalg.vector_norm(sol.value[0])) > 100 * first  # grew, and still a success
    # Broyden leaps out until f(z) - z rounds to 0: growth with a round-off residual is an escape
    sol = deqkit.fixed_point(lambda z, c: z + c, torch.zeros(4, 16, dtype=F64), inputs=(torch.randn(4, 16, dtype=F64),),
                             solver=deqkit.Broyden(), tol=1e-4, max_steps=200, throw=False)
    assert sol.result == R.ESCAPED


def test_escaped_samples_rest_where_they_escaped_and_others_go_on():
    c = torch.tensor([[1.0], [0.0]], dtype=F64)  # sample 0 drifts, sample 1 contracts to 0.5
    f = lambda z, c: torch.where(c > 0, z + c, 0.5 * z + 0.25)  # noqa: E731
    sol = deqkit.fixed_point(f, torch.zeros(2, 1, dtype=F64), inputs=(c,), solver=deqkit.FixedPoint(), tol=1e-2,
                             max_steps=500, throw=False)
    assert sol.stats.status.tolist() == [int(R.ESCAPED), int(R.SUCCESS)]
    assert sol.stats.escaped.tolist() == [True, False]
    assert float(sol.value[0]) == pytest.approx(100.0) and float(sol.value[1]) == pytest.approx(0.5, abs=1e-2)
    assert int(sol.stats.steps[0]) == 100


# -- Fallback ------------------------------------------------------------------------------------


def mixed_batch(dtype=F64, seed=0):
    """``f(z, x) = a * (W z) + x`` per sample with contraction a: 0.3, 0.3, 0.97, 0.3, 0.99 (fast
    and slow samples), an affine map whose fixed point is a linear solve."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(4, 4, generator=g, dtype=dtype)
    w = w / torch.linalg.matrix_norm(w, ord=2)
    a = torch.tensor([[0.3], [0.3], [0.97], [0.3], [0.99]], dtype=dtype)
    x = torch.randn(5, 4, generator=g, dtype=dtype)
    return w, a, x


def test_fallback_keeps_what_the_first_solver_finished_bit_for_bit():
    w, a, x = mixed_batch()
    f = lambda z, a, x: a * (z @ w.T) + x  # noqa: E731
    kw = dict(inputs=(a, x), tol=1e-10, max_steps=40, throw=False, trajectory=3)
    with torch.no_grad():
        first = deqkit.fixed_point(f, torch.zeros(5, 4, dtype=F64), solver=deqkit.FixedPoint(), **kw)
        chain = deqkit.fixed_point(f, torch.zeros(5, 4, dtype=F64), solver=deqkit.Fallback(deqkit.FixedPoint(), deqkit.Anderson(m=4)), **kw)
    done = first.stats.status == R.SUCCESS
    assert done.tolist() == [True, True, False, True, False]
    assert chain.success and chain.stats.finished_by.tolist() == [0, 0, 1, 0, 1]
    for i in torch.nonzero(done).flatten().tolist():
        assert torch.equal(chain.value[i], first.value[i])
        assert int(chain.stats.steps[i]) == int(first.stats.steps[i])
        assert float(chain.stats.residual[i]) == float(first.stats.residual[i])
        assert torch.equal(chain.stats.trace[i, : first.stats.trace.shape[1]], first.stats.trace[i])
        assert all(torch.equal(c[i], p[i]) for c, p in zip(chain.trajectory, first.trajectory))
    for i in (2, 4):  # the failed samples went on from their best iterate: more steps, tol met
        assert int(chain.stats.steps[i]) > 40 and float(chain.stats.residual[i]) <= 1e-10
    assert sum(chain.stats.nfev_by_solver) == chain.stats.nfev and chain.stats.nfev_by_solver[0] == first.stats.nfev
    exact = torch.linalg.solve(torch.eye(4, dtype=F64) - a[:, :, None] * w, x.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(chain.value, exact, rtol=1e-8, atol=1e-9)


def test_fallback_costs_nothing_when_the_first_solver_succeeds():
    w, a, x = mixed_batch()
    f = lambda z, a, x: 0.3 * (z @ w.T) + x  # noqa: E731
    with torch.no_grad():
        alone = deqkit.fixed_point(f, torch.zeros(5, 4, dtype=F64), inputs=(a, x), solver=deqkit.Anderson(), tol=1e-10)
        chain = deqkit.fixed_point(f, torch.zeros(5, 4, dtype=F64), inputs=(a, x), tol=1e-10,
                                   solver=deqkit.Fallback(deqkit.Anderson(), deqkit.Broyden()))
    assert torch.equal(chain.value, alone.value) and chain.stats.nfev == alone.stats.nfev
    assert chain.stats.nfev_by_solver == (alone.stats.nfev, 0) and chain.stats.finished_by.tolist() == [0] * 5


def test_fallback_rescues_what_it_can_and_never_turns_an_escape_into_a_success():
    g = torch.Generator().manual_seed(0)
    c = torch.randn(3, 16, generator=g, dtype=F64) * torch.tensor([[1.0], [0.0], [0.0]], dtype=F64)
    slow = torch.tensor([[0.0], [1.0], [0.0]], dtype=F64)
    # sample 0 drifts (no solver can), sample 1 contracts slowly (plain iteration runs out), 2 is fast
    f = lambda z, c, s: torch.where(c.abs().sum(1, keepdim=True) > 0, z + c,  # noqa: E731
                                    torch.where(s > 0, 0.95 * z + 0.05, 0.5 * z + 0.25))
    with torch.no_grad():
        sol = deqkit.fixed_point(f, torch.zeros(3, 16, dtype=F64), inputs=(c, slow), tol=1e-3, max_steps=20, throw=False,
                                 solver=deqkit.Fallback(deqkit.FixedPoint(), deqkit.Broyden()))
    assert sol.stats.status.tolist() == [int(R.ESCAPED), int(R.SUCCESS), int(R.SUCCESS)]
    assert sol.stats.finished_by.tolist() == [1, 1, 0]
    # the drift ran out of steps at rel 1/21 with plain iteration; Broyden went on from there and
    # met tol only far away: judged against the sample's first test, an escape, not a success
    drift = lambda z, c: z + c  # noqa: E731
    for first in (deqkit.FixedPoint(), deqkit.Broyden(), deqkit.Anderson()):
        for then in (deqkit.FixedPoint(), deqkit.Anderson(), deqkit.Broyden()):
            with torch.no_grad():
                out = deqkit.fixed_point(drift, torch.zeros(2, 16, dtype=F64), inputs=(c[:1].expand(2, 16),), tol=1e-2,
                                         max_steps=60, throw=False, solver=deqkit.Fallback(first, then))
            assert not bool((out.stats.status == R.SUCCESS).any()), (first, then, out.stats.status)


@pytest.mark.parametrize("backward", [deqkit.Implicit(tol=1e-12, max_steps=300), deqkit.OneStep(), deqkit.Phantom(steps=3, tau=0.7),
                                      deqkit.Unrolled()], ids=["implicit", "one_step", "phantom", "unrolled"])
@pytest.mark.parametrize("active_set", [False, True])
def test_fallback_gradients_under_each_backward_mode(backward, active_set):
    w, a, x = mixed_batch()
    x = x.requires_grad_(True)
    wp = w.clone().requires_grad_(True)
    f = lambda z, a, x: a * (z @ wp.T) + x  # noqa: E731
    solver = deqkit.Fallback(deqkit.FixedPoint(), deqkit.Anderson(m=4))
    tol = 1e-6 if isinstance(backward, deqkit.Unrolled) else 1e-12
    opts = dict(tol=tol, max_steps=40, active_set=active_set, backward=backward)
    sol = deqkit.fixed_point(f, torch.zeros(5, 4, dtype=F64), inputs=(a, x), solver=solver, **opts)
    assert sol.stats.finished_by.tolist() == [0, 0, 1, 0, 1]
    weights = torch.randn(5, 4, dtype=F64, generator=torch.Generator().manual_seed(9))
    grads = torch.autograd.grad((sol.value * weights).sum(), [x, wp])
    if isinstance(backward, (deqkit.Implicit,)):
        exact = torch.linalg.solve(torch.eye(4, dtype=F64) - a[:, :, None] * wp, x.unsqueeze(-1)).squeeze(-1)
        reference = torch.autograd.grad((exact * weights).sum(), [x, wp])
    elif isinstance(backward, deqkit.Unrolled):  # central differences through the same iterations
        direction = [torch.randn(t.shape, dtype=F64, generator=torch.Generator().manual_seed(3 + i)) for i, t in enumerate((x, wp))]
        values = []
        for sign in (1.0, -1.0):
            with torch.no_grad():
                xs, ws = x + sign * 1e-6 * direction[0], wp + sign * 1e-6 * direction[1]
                g = lambda z, a, xx: a * (z @ ws.T) + xx  # noqa: E731
                out = deqkit.fixed_point(g, torch.zeros(5, 4, dtype=F64), inputs=(a, xs), solver=solver, tol=tol, max_steps=40,
                                         active_set=active_set)
                values.append(float((out.value * weights).sum()))
        got = float(sum((gr * d).sum() for gr, d in zip(grads, direction)))
        assert abs(got - (values[0] - values[1]) / 2e-6) <= 1e-5 * max(1.0, abs(got))
        return
    else:  # the surrogate at the solution
        z = sol.value.detach()
        if isinstance(backward, deqkit.OneStep):
            out = f(z, a, x)
        else:
            for _ in range(backward.steps):
                z = (1 - backward.tau) * z + backward.tau * f(z, a, x)
            out = z
        reference = torch.autograd.grad((out * weights).sum(), [x, wp])
    for g, r in zip(grads, reference):
        torch.testing.assert_close(g, r, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("check_every", [1, 3])
@pytest.mark.parametrize("active_set", [False, True])
def test_fallback_with_the_active_set_and_sparse_tests_gives_the_whole_batch_answer(check_every, active_set):
    w, a, x = mixed_batch()
    f = lambda z, a, x: a * (z @ w.T) + x  # noqa: E731
    solver = deqkit.Fallback(deqkit.FixedPoint(), deqkit.Broyden(memory=8))
    with torch.no_grad():
        plain = deqkit.fixed_point(f, torch.zeros(5, 4, dtype=F64), inputs=(a, x), solver=solver, tol=1e-10, max_steps=42,
                                   check_every=check_every)
        active = deqkit.fixed_point(f, torch.zeros(5, 4, dtype=F64), inputs=(a, x), solver=solver, tol=1e-10, max_steps=42,
                                    check_every=check_every, active_set=active_set)
    torch.testing.assert_close(active.value, plain.value, rtol=1e-9, atol=1e-10)
    assert active.stats.finished_by.tolist() == plain.stats.finished_by.tolist() == [0, 0, 1, 0, 1]
    if active_set:
        assert active.stats.sample_evals < plain.stats.sample_evals  # the second solver saw only the failed rows


class SlowCell(torch.nn.Module):
    def __init__(self, w):
        super().__init__()
        self.register_buffer("w", w)

    def forward(self, z, x):
        return 0.98 * torch.tanh(z @ self.w.T) + x


def test_fallback_through_deq_the_registry_pickling_and_torch_compile():
    w, a, x = mixed_batch()
    deq = deqkit.DEQ(SlowCell(w), solver=deqkit.solvers.get("fallback", solvers=["fixed_point", {"name": "anderson", "m": 3}]),
                     tol=1e-9, max_steps=25)
    assert deq.solver == deqkit.Fallback(deqkit.FixedPoint(), deqkit.Anderson(m=3))
    sol = deq(x)
    assert sol.success and sol.stats.finished_by.max() == 1
    again = pickle.loads(pickle.dumps(deq))
    assert torch.equal(again(x).value, sol.value)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"torch(\.|$)")
        compiled = torch.compile(deq, backend="eager")(x)
    torch.testing.assert_close(compiled.value, sol.value, rtol=0, atol=1e-12)
    chain = deqkit.Fallback(deqkit.compiled(deqkit.Anderson(m=3), backend="eager"), deqkit.Broyden())
    assert deqkit.fixed_point(lambda z: 0.5 * z + 1, torch.zeros(2, 3), solver=chain, tol=1e-6).success


def test_fallback_refusals():
    with pytest.raises(TypeError) as one:
        deqkit.Fallback(deqkit.Anderson())
    assert str(one.value) == "Fallback needs at least two solvers: Fallback(first, next, ...)"
    with pytest.raises(ValueError) as own:
        deqkit.Fallback(deqkit.Anderson(), deqkit.TorchDEQSolver("anderson"))
    assert str(own.value).startswith("Fallback cannot hand failed samples to TorchDEQSolver(")
    assert str(own.value).endswith(": it runs a loop of its own from its own start, so it cannot continue from another "
                                   "solver's iterates. Put it first, or use a solver that steps.")
    assert deqkit.Fallback(deqkit.TorchDEQSolver("anderson"), deqkit.Anderson()).own_loop  # first is fine
    with pytest.raises(TypeError, match="Fallback's solver 1 must be a solver object"):
        deqkit.Fallback(deqkit.Anderson(), "broyden")
    with pytest.raises(ValueError, match=r"Unrolled\(\) cannot differentiate through Fallback.*NewtonKrylov"):
        deqkit.fixed_point(torch.cos, torch.zeros(2, 2), solver=deqkit.Fallback(deqkit.Anderson(), deqkit.NewtonKrylov()),
                           backward=deqkit.Unrolled())
    with pytest.raises(ValueError, match="compiled cannot compile Fallback"):
        deqkit.compiled(deqkit.Fallback(deqkit.Anderson(), deqkit.Broyden()))
    with pytest.raises(TypeError, match="fallback needs solvers"):
        deqkit.solvers.get("fallback", solvers="anderson")


# -- the chain's bookkeeping (from mutation testing) ---------------------------------------------


def test_fallback_counts_each_call_once_and_adds_each_samples_steps():
    w, a, x = mixed_batch()
    f = lambda z, a, x: a * (z @ w.T) + x  # noqa: E731
    with torch.no_grad():
        first = deqkit.fixed_point(f, torch.zeros(5, 4, dtype=F64), inputs=(a, x), solver=deqkit.FixedPoint(), tol=1e-10,
                                   max_steps=40, throw=False)
        chain = deqkit.fixed_point(f, torch.zeros(5, 4, dtype=F64), inputs=(a, x), tol=1e-10, max_steps=40,
                                   solver=deqkit.Fallback(deqkit.FixedPoint(), deqkit.Anderson(m=4)))
    failed = first.stats.status != R.SUCCESS
    extra = chain.stats.steps[failed] - 40  # the second solver's iterations past its (free) restart test
    assert bool((extra > 0).all())
    # the restart reuses f(best iterate): the second solver's calls are exactly its iterations
    assert chain.stats.nfev_by_solver == (first.stats.nfev, int(extra.max()))
    assert chain.stats.trace.shape[1] == first.stats.trace.shape[1] + int(extra.max()) + 1


def test_after_an_escape_the_next_solver_starts_again_from_z0():
    c = torch.ones(2, 3, dtype=F64)
    starts = []

    def f(z, c):
        starts.append(z.detach().clone())
        return z + c

    with torch.no_grad():
        sol = deqkit.fixed_point(f, torch.zeros(2, 3, dtype=F64), inputs=(c,), tol=1e-2, max_steps=150, throw=False,
                                 solver=deqkit.Fallback(deqkit.FixedPoint(), deqkit.FixedPoint()))
    first_run = 100  # z + c from 0 escapes at its 100th call (the relative residual 1/100)
    assert sol.stats.status.tolist() == [int(R.ESCAPED)] * 2 and sol.stats.finished_by.tolist() == [1, 1]
    assert torch.equal(starts[first_run], torch.zeros(2, 3, dtype=F64))  # the restart: z0, evaluated again
    assert sol.stats.nfev_by_solver == (first_run, first_run)
    assert sol.stats.steps.tolist() == [2 * first_run] * 2  # no free restart test: every step counted


@pytest.mark.parametrize("max_steps,keep,tol", [(40, 3, 1e-10), (3, 6, 0.05)])
def test_fallback_trajectory_pairs_are_iterates_and_their_images(max_steps, keep, tol):
    from deqkit._problem import Problem

    w, a, x = mixed_batch()
    f = lambda z, a, x: a * (z @ w.T) + x  # noqa: E731
    options = deqkit.SolveOptions(tol=tol, max_steps=max_steps, trajectory=keep, throw=False)
    chain = deqkit.Fallback(deqkit.FixedPoint(), deqkit.Anderson(m=4))
    with torch.no_grad():
        out = chain.run(Problem(f, torch.zeros(5, 4, dtype=F64), (a, x)), torch.zeros(5, 4, dtype=F64), options)
        plain = deqkit.FixedPoint().run(Problem(f, torch.zeros(5, 4, dtype=F64), (a, x)), torch.zeros(5, 4, dtype=F64), options)
    assert len(out.trajectory) == keep
    for z, fz in out.trajectory:  # every kept pair is (z_i, f(z_i)), row by row
        torch.testing.assert_close(fz, f(z, a, x), rtol=1e-12, atol=1e-12)
    done = (plain.status == R.SUCCESS).tolist()
    own = list(plain.trajectory)
    own = own[:1] * (keep - len(own)) + own  # padded at the front to the chain's length
    for i, finished in enumerate(done):
        if finished:  # the first solver's own iterates, bit for bit
            assert all(torch.equal(t[1][i], o[1][i]) for t, o in zip(out.trajectory, own))
        elif out.status[i] == R.SUCCESS:  # the chain's last iterates: the last is the value
            assert torch.equal(out.trajectory[-1][1][i], out.best_fz[i])
    assert not all(done) and any(done)


def test_reprs_name_the_solvers():
    class Duck:
        differentiable = False

        def init(self, z, fz, problem):
            return None

        def step(self, z, fz, state, problem):
            return fz, state

        def __repr__(self):
            return "Duck()"

    assert repr(deqkit.Fallback(deqkit.FixedPoint(), deqkit.Anderson(m=2))) == \
        "Fallback(FixedPoint(damping=1.0), Anderson(m=2, beta=1.0, lam=0.0001, restart=4.0))"
    with pytest.raises(ValueError, match=r"^backward=Unrolled\(\) cannot differentiate through Duck\(\): its iterations are not "
                                         r"recorded by autograd\. Use"):
        deqkit.fixed_point(torch.cos, torch.zeros(1, 1), solver=Duck(), backward=deqkit.Unrolled())
    with pytest.raises(RuntimeError, match=r"^Fallback runs its solvers' loops; it is driven through run\(\)$"):
        deqkit.Fallback(deqkit.FixedPoint(), deqkit.Anderson()).step(None, None, None, None)
    deq = deqkit.DEQ(torch.nn.Linear(2, 2), solver=deqkit.FixedPoint(), max_steps=7)
    assert repr(deq) == ("DEQ(\n  solver=FixedPoint(damping=1.0), backward=None, init='zeros', tol=0.0001, stop_mode='rel', "
                         "max_steps=7, active_set=False, divergence=10000.0, escape=10.0, trajectory=0, check_every=1, "
                         "throw=True, throw_on_max_steps=False\n  (cell): Linear(in_features=2, out_features=2, bias=True)\n)")


@pytest.mark.parametrize("images", [
    [1.0, 3.0, 5.0, 8.0, 10.0],   # the last test passes tol, ||f(z)|| is exactly escape (10) x its first value
    [1.0, 3.0, 7.0, 15.0, 19.0],  # ... and ||f(z) - z|| is exactly half its largest value so far
], ids=["grown_exactly", "fallen_exactly_half"])
def test_the_escape_rule_includes_its_thresholds(images):
    """A test that passes tol is ESCAPED when ||f(z)|| >= escape x its first value while
    ||f(z) - z|| >= half its peak: both bounds count (scalar iterates of exact binary numbers)."""
    calls = []

    def f(z):
        calls.append(None)
        return torch.full_like(z, images[len(calls) - 1])

    with torch.no_grad():
        sol = deqkit.fixed_point(f, torch.zeros(1, 1, dtype=torch.float64), solver=deqkit.FixedPoint(), tol=0.25,
                                 stop_mode="rel", max_steps=len(images), escape=10.0, throw=False)
    assert sol.stats.status.tolist() == [int(R.ESCAPED)]
    assert len(calls) == len(images)  # the last test escaped
