"""The training monitor (``summarize_solves``, ``solve_trend``, ``Monitor``) and the adaptive
Jacobian weight (``AdaptiveJacobianWeight``): records, trend, warnings, files, the rule."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import pickle
import sys
import types
import warnings

import numpy as np
import pytest
import torch

import deqkit
from deqkit import AdaptiveJacobianWeight, Monitor, Result, SolveRecord, Trend

F64 = torch.float64


def _solve(batch: int = 4, tol: float = 1e-8, backward: bool = False) -> deqkit.Solution:
    """A real implicit solve of z = 0.5 tanh(z) + x (with its backward pass when asked)."""
    x = torch.linspace(-1, 1, batch * 3, dtype=F64).reshape(batch, 3).requires_grad_(backward)
    sol = deqkit.fixed_point(lambda z, x: 0.5 * torch.tanh(z) + x, torch.zeros(batch, 3, dtype=F64), inputs=(x,),
                             tol=tol, backward=deqkit.Implicit(tol=1e-10))
    if backward:
        sol.value.sum().backward()
    return sol


TEMPLATE = _solve().stats


def stats(nfev: int = 10, *, converged: float = 1.0, batch: int = 4, residual=None, **fields) -> deqkit.Stats:
    """A Stats record like a real solve's with chosen numbers: the first round(converged * B)
    samples SUCCESS, the others MAX_STEPS."""
    template = TEMPLATE if batch == TEMPLATE.batch_size else _solve(batch).stats
    ok = torch.arange(batch) < round(converged * batch)
    status = torch.where(ok, int(Result.SUCCESS), int(Result.MAX_STEPS))
    res = torch.full((batch,), 1e-6, dtype=F64) if residual is None else torch.as_tensor(residual, dtype=F64)
    return dataclasses.replace(template, nfev=nfev, status=status, converged=ok, residual=res, **fields)


def legacy(nfev: int = 10, **extra) -> types.SimpleNamespace:
    """A record with Stats' original fields only (no escaped, finished_by, nfev_by_solver)."""
    s = stats(nfev)
    base = {name: getattr(s, name) for name in ("nfev", "steps", "residual", "converged", "status", "trace",
                                                "stop_mode", "tol", "sample_evals", "backward")}
    return types.SimpleNamespace(**base, **extra)


ADVICE = ("the map is losing its contraction: see the how-to 'My DEQ stopped converging' "
          "(jacobian_reg, AdaptiveJacobianWeight, Fallback)")


def trend(ratio: float = 1.0, drop: float = 0.0, window: int = 3) -> Trend:
    return Trend(window=window, baseline_steps=(0, window - 1), recent_steps=(10, 10 + window - 1),
                 baseline_nfev=10.0, recent_nfev=10.0 * ratio, baseline_converged=1.0, recent_converged=1.0 - drop)


def quiet(fn, *args, **kwargs):
    """Run fn and return (its result, the warnings it raised)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*args, **kwargs)
    return out, caught


# -- summarize_solves ------------------------------------------------------------------------
def test_record_of_a_real_solve_with_its_backward_pass():
    sol = _solve(batch=5, backward=True)
    s = sol.stats
    rec = deqkit.summarize_solves(sol, step=3, loss=torch.tensor(0.25))
    assert (rec.step, rec.solves, rec.samples, rec.nfev, rec.sample_evals) == (3, 1, 5, s.nfev, s.sample_evals)
    assert rec.steps_mean == pytest.approx(float(s.steps.double().mean()))
    assert rec.residual_median == pytest.approx(float(np.median(s.residual.numpy())))
    assert rec.residual_q90 == pytest.approx(float(np.quantile(s.residual.numpy(), 0.9)))
    assert rec.residual_max == float(s.residual.max())
    assert (rec.converged, rec.failed) == (1.0, 0)
    assert len(s.backward) == 1 and rec.backward_passes == 1
    assert rec.backward_nfev == s.backward[0].nfev > 0
    assert rec.backward_residual_max == float(s.backward[0].residual.max())
    assert rec.backward_failed == 0
    assert rec.scalars == {"loss": 0.25}
    # a Stats works as well as its Solution
    assert deqkit.summarize_solves(s, step=3, loss=0.25) == rec


def test_record_before_backward_and_of_a_failed_backward():
    sol = _solve()
    rec = deqkit.summarize_solves(sol)
    assert rec.step == 0
    assert (rec.backward_passes, rec.backward_nfev, rec.backward_residual_max, rec.backward_failed) == (0, 0, None, 0)
    bad = deqkit.BackwardStats(nfev=7, steps=torch.tensor([7]), residual=torch.tensor([0.5]), result=Result.MAX_STEPS)
    good = deqkit.BackwardStats(nfev=3, steps=torch.tensor([3]), residual=torch.tensor([0.1]), result=Result.SUCCESS)
    s = stats(backward=deqkit.BackwardLog([good, bad]))
    rec = deqkit.summarize_solves(s)
    assert (rec.backward_passes, rec.backward_nfev, rec.backward_residual_max, rec.backward_failed) == (2, 10, 0.5, 1)


def test_record_of_float32_solves_is_computed_in_float64():
    a = stats(3, residual=[1e-3, 2e-3, 3e-3, 4e-3])
    a = dataclasses.replace(a, residual=a.residual.float(), steps=a.steps.int())
    rec = deqkit.summarize_solves(a)
    assert rec.residual_median == pytest.approx(2.5e-3, rel=1e-6) and rec.residual_max == pytest.approx(4e-3, rel=1e-6)
    assert type(rec.residual_q90) is float and type(rec.steps_mean) is float


def test_record_pools_the_samples_of_several_solves():
    a = stats(7, converged=0.5, residual=[1, 2, 3, 4])
    b = stats(5, converged=1.0, batch=6, residual=[5, 6, 7, 8, 9, 10])
    rec = deqkit.summarize_solves(a, b)
    pooled = np.arange(1, 11)
    assert (rec.solves, rec.samples, rec.nfev) == (2, 10, 12)
    assert rec.sample_evals == a.sample_evals + b.sample_evals
    assert rec.residual_median == pytest.approx(np.median(pooled))
    assert rec.residual_q90 == pytest.approx(np.quantile(pooled, 0.9))
    assert rec.residual_max == 10.0
    assert rec.converged == pytest.approx(0.8) and rec.failed == 2
    steps = torch.cat([a.steps, b.steps]).double()
    assert rec.steps_mean == pytest.approx(float(steps.mean()))


def test_escapes_fallbacks_and_chains_are_read_where_the_stats_have_them():
    s = legacy(9, escaped=torch.tensor([True, False, True, False]), finished_by=torch.tensor([0, 1, 2, 0]),
               nfev_by_solver=(5, 3, 1))
    rec = deqkit.summarize_solves(s)
    assert (rec.escaped, rec.fallbacks, rec.nfev_by_solver) == (2, 2, (5, 3, 1))
    # chains of different lengths add up by position
    t = legacy(4, escaped=torch.tensor([False] * 4), finished_by=torch.zeros(4, dtype=torch.long), nfev_by_solver=(4,))
    rec = deqkit.summarize_solves(s, t)
    assert (rec.escaped, rec.fallbacks, rec.nfev_by_solver) == (2, 2, (9, 3, 1))


def test_a_stats_without_the_new_fields_still_works():
    rec = deqkit.summarize_solves(legacy(9))
    assert (rec.escaped, rec.fallbacks, rec.nfev_by_solver) == (None, None, None)
    assert rec.nfev == 9 and rec.converged == 1.0
    # one solve without them makes the step's count unknown, not a partial sum
    full = legacy(3, escaped=torch.tensor([True] * 4), finished_by=torch.ones(4, dtype=torch.long), nfev_by_solver=(2, 1))
    rec = deqkit.summarize_solves(full, legacy(9))
    assert (rec.escaped, rec.fallbacks, rec.nfev_by_solver) == (None, None, None)


def test_a_real_stats_gives_the_fields_it_has():
    rec = deqkit.summarize_solves(TEMPLATE)
    has = {name: hasattr(TEMPLATE, name) for name in ("escaped", "finished_by", "nfev_by_solver")}
    assert (rec.escaped is not None) == has["escaped"]
    assert (rec.fallbacks is not None) == has["finished_by"]
    assert (rec.nfev_by_solver is not None) == has["nfev_by_solver"]
    if has["nfev_by_solver"]:  # a plain solver: one entry, all the calls
        assert rec.nfev_by_solver == tuple(TEMPLATE.nfev_by_solver) and len(rec.nfev_by_solver) == 1
        assert rec.fallbacks == 0 and rec.escaped == 0


def test_a_fallback_chain_and_escapes_are_counted_from_real_solves():
    a = torch.tensor([[0.3], [0.99], [0.3]], dtype=F64)
    chain = deqkit.Fallback(deqkit.FixedPoint(), deqkit.Anderson())
    sol = deqkit.fixed_point(lambda z: a * z + 0.5, torch.zeros(3, 4, dtype=F64), tol=1e-6, max_steps=60, solver=chain)
    rec = deqkit.summarize_solves(sol)
    assert sol.stats.finished_by.tolist() == [0, 1, 0]
    assert rec.fallbacks == 1 and rec.nfev_by_solver == tuple(sol.stats.nfev_by_solver) and len(rec.nfev_by_solver) == 2
    assert (rec.escaped, rec.failed, rec.converged) == (0, 0, 1.0)
    c = torch.ones(2, 4)
    drift = deqkit.fixed_point(lambda z: z + c, torch.zeros(2, 4), solver=deqkit.FixedPoint(), tol=1e-2, max_steps=500,
                               throw=False)
    rec = deqkit.summarize_solves(sol, drift)
    assert (rec.escaped, rec.failed, rec.samples, rec.fallbacks) == (2, 2, 5, 1)
    assert rec.converged == pytest.approx(0.6)
    assert rec.nfev_by_solver == (sol.stats.nfev_by_solver[0] + drift.stats.nfev_by_solver[0], sol.stats.nfev_by_solver[1])


def test_an_empty_chain_record_is_unknown():
    rec = deqkit.summarize_solves(legacy(5, escaped=torch.zeros(4, dtype=torch.bool), finished_by=None, nfev_by_solver=()))
    assert (rec.escaped, rec.fallbacks, rec.nfev_by_solver) == (0, None, None)


@pytest.mark.parametrize("solves, kwargs, error, match", [
    ((), {}, ValueError, "^summarize_solves needs at least one Solution or Stats$"),
    ((1.0,), {}, TypeError, "solve 0 must be a deqkit.Solution or deqkit.Stats, got float"),
    ((TEMPLATE, "x"), {}, TypeError, "solve 1 .* got str"),
    ((TEMPLATE,), {"step": -1}, ValueError, "step must be an integer >= 0, got -1"),
    ((TEMPLATE,), {"step": True}, ValueError, "step must be an integer"),
    ((TEMPLATE,), {"step": 1.0}, ValueError, "step must be an integer"),
    ((TEMPLATE,), {"nfev": 1.0}, ValueError, "scalar 'nfev' has the name of a SolveRecord field"),
    ((TEMPLATE,), {"loss": torch.ones(2)}, ValueError, r"scalar 'loss' .* shape \(2,\)"),
    ((TEMPLATE,), {"loss": "low"}, TypeError, "scalar 'loss' must be a number, got str"),
    ((TEMPLATE,), {"flag": True}, TypeError, "scalar 'flag' must be a number, got bool"),
])
def test_summarize_refuses_bad_arguments(solves, kwargs, error, match):
    with pytest.raises(error, match=match):
        deqkit.summarize_solves(*solves, **kwargs)


def test_record_round_trips_through_a_flat_dict_and_json():
    s = legacy(9, escaped=torch.tensor([True, False, False, False]), finished_by=torch.tensor([0, 1, 0, 0]),
               nfev_by_solver=(6, 3))
    rec = deqkit.summarize_solves(s, step=4, loss=0.5, lr=1e-3)
    flat = rec.to_dict()
    assert list(flat)[:2] == ["step", "solves"] and list(flat)[-2:] == ["loss", "lr"]
    assert flat["nfev_by_solver"] == [6, 3] and "scalars" not in flat
    assert SolveRecord.from_dict(json.loads(json.dumps(flat))) == rec
    unknown = deqkit.summarize_solves(legacy(9)).to_dict()
    assert unknown["nfev_by_solver"] is None and SolveRecord.from_dict(unknown).nfev_by_solver is None
    with pytest.raises(ValueError, match=r"missing field\(s\) \['nfev'\]"):
        SolveRecord.from_dict({k: v for k, v in flat.items() if k != "nfev"})


# -- solve_trend -----------------------------------------------------------------------------
def records(nfevs, converged=None, start=0):
    converged = converged or [1.0] * len(nfevs)
    return [deqkit.summarize_solves(stats(n, converged=c), step=start + i) for i, (n, c) in enumerate(zip(nfevs, converged))]


def test_trend_compares_the_window_means():
    t = deqkit.solve_trend(records([10, 12], [1.0, 0.5]), records([20, 25], [0.5, 0.25], start=8))
    assert (t.window, t.baseline_steps, t.recent_steps) == (2, (0, 1), (8, 9))
    assert (t.baseline_nfev, t.recent_nfev, t.nfev_ratio) == (11.0, 22.5, 22.5 / 11)
    assert (t.baseline_converged, t.recent_converged) == (0.75, 0.375)
    assert t.converged_drop == 0.375
    assert trend(ratio=0.5).nfev_ratio == 0.5 and trend(drop=-0.25).converged_drop == -0.25
    zero = dataclasses.replace(trend(), baseline_nfev=0.0)
    assert zero.nfev_ratio == math.inf


@pytest.mark.parametrize("baseline, recent, match", [
    ([], [1], "two non-empty windows, got 0 and 1"),
    ([1], [], "two non-empty windows, got 1 and 0"),
    ([1, 2], [3], "same length, got 2 and 1"),
])
def test_trend_refuses_bad_windows(baseline, recent, match):
    pool = records([10, 10, 10])
    with pytest.raises(ValueError, match=match):
        deqkit.solve_trend([pool[i - 1] for i in baseline], [pool[i - 1] for i in recent])


# -- Monitor: windows, trend, warnings -------------------------------------------------------
def feed(monitor: Monitor, nfevs, converged=None):
    converged = converged or [1.0] * len(nfevs)
    out = []
    for n, c in zip(nfevs, converged):
        out.append(monitor.step(stats(n, converged=c)))
    return out


def test_monitor_counts_steps_and_keeps_a_baseline_and_a_recent_window():
    m = Monitor(window=3, nfev_factor=None, converged_drop=None)
    assert m.trend is None and m.last is None
    recs = feed(m, [10, 11, 12, 20, 21])
    assert [r.step for r in recs] == [0, 1, 2, 3, 4] and m.last is recs[-1]
    assert m.trend is None  # the recent window is not full yet
    feed(m, [22])
    assert m.trend == deqkit.solve_trend(recs[:3], [*recs[3:], m.last])
    feed(m, [30, 30, 30])  # the recent window slides; the baseline stays
    t = m.trend
    assert (t.baseline_steps, t.recent_steps, t.baseline_nfev, t.recent_nfev) == ((0, 2), (6, 8), 11.0, 30.0)


def test_warmup_steps_are_left_out_of_the_baseline():
    m = Monitor(window=2, warmup=3, nfev_factor=None)
    feed(m, [1, 1, 1, 10, 12, 20])
    assert m.trend is None
    feed(m, [22])
    t = m.trend
    assert (t.baseline_steps, t.baseline_nfev, t.recent_steps, t.recent_nfev) == ((3, 4), 11.0, (5, 6), 21.0)


def test_explicit_steps_must_increase():
    m = Monitor(window=2)
    assert m.step(TEMPLATE, step=5).step == 5
    assert m.step(TEMPLATE).step == 6
    for bad in (6, 3, -1, True, 7.0):
        with pytest.raises(ValueError, match=r"^step must be an integer >= 7 \(steps increase\), got "):
            m.step(TEMPLATE, step=bad)
    assert m.step(TEMPLATE, step=7).step == 7


def test_a_degrading_run_warns_once_naming_the_trend_and_the_numbers():
    m = Monitor(window=4, nfev_factor=1.5, converged_drop=None)
    _, caught = quiet(feed, m, [10, 10, 10, 10] + [12, 13, 14, 15])  # recent mean 13.5: 1.35x
    assert not caught
    with pytest.warns(RuntimeWarning) as caught:
        m.step(stats(16))  # recent mean 14.5: 1.45x
        m.step(stats(17))  # recent mean 15.5: 1.55x
    assert len(caught) == 1
    message = str(caught[0].message)
    assert caught[0].filename == __file__  # it points at the caller's monitor.step
    assert caught[0].lineno == sys._getframe().f_lineno - 4  # the second m.step above
    assert message == ("deqkit: NFE per step rose 1.55x, from 10.0 to 15.5 (mean of steps 0-3 against steps 6-9), "
                       "past nfev_factor=1.5; " + ADVICE)
    _, caught = quiet(feed, m, [40, 50, 60, 70])  # worse still: once is enough
    assert not caught


def test_a_falling_converged_fraction_warns_once_by_itself():
    m = Monitor(window=2, nfev_factor=None, converged_drop=0.2, name="encoder")
    _, caught = quiet(feed, m, [10] * 4, [1.0, 1.0, 0.75, 1.0])  # drop 0.125
    assert not caught
    _, caught = quiet(feed, m, [10, 10], [0.75, 0.75])  # drop 0.25 at the second
    assert len(caught) == 1 and caught[0].category is RuntimeWarning
    assert caught[0].filename == __file__
    assert str(caught[0].message) == ("encoder: the converged fraction fell from 100.0% to 75.0% (mean of steps 0-1 "
                                      "against steps 4-5), a drop of more than converged_drop=0.2; " + ADVICE)
    _, caught = quiet(feed, m, [10, 10], [0.0, 0.0])
    assert not caught


def test_both_kinds_warn_at_the_same_step():
    m = Monitor(window=1)
    _, caught = quiet(feed, m, [10, 20], [1.0, 0.5])
    assert sorted(str(w.message).split(":")[1].split()[0] for w in caught) == ["NFE", "the"]


def test_a_healthy_run_never_warns():
    m = Monitor(window=3)
    gen = np.random.default_rng(0)
    nfevs = [int(n) for n in gen.integers(9, 14, size=60)]  # noise around 11, no trend
    converged = [float(c) for c in gen.choice([0.75, 1.0], size=60, p=[0.1, 0.9])]
    _, caught = quiet(feed, m, nfevs, converged)
    assert not caught
    assert m.trend.nfev_ratio < 1.5


def test_thresholds_are_strict_and_none_turns_a_warning_off():
    _, caught = quiet(feed, Monitor(window=1, nfev_factor=2.0, converged_drop=0.5), [10, 20], [1.0, 0.5])
    assert not caught  # exactly 2x and exactly 0.5: not past
    _, caught = quiet(feed, Monitor(window=1, nfev_factor=None, converged_drop=None), [10, 100], [1.0, 0.0])
    assert not caught
    _, caught = quiet(feed, Monitor(window=1, nfev_factor=1.01, converged_drop=None), [100, 102], [1.0, 0.0])
    assert len(caught) == 1 and "NFE" in str(caught[0].message)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"window": 0}, ValueError, "window must be an integer >= 1, got 0"),
    ({"window": 2.0}, ValueError, "window must be an integer >= 1"),
    ({"window": True}, ValueError, "window must be an integer >= 1"),
    ({"warmup": -1}, ValueError, "warmup must be an integer >= 0, got -1"),
    ({"nfev_factor": 1.0}, ValueError, "nfev_factor must be a number > 1 or None, got 1.0"),
    ({"nfev_factor": math.inf}, ValueError, "nfev_factor must be a number > 1 or None, got inf"),
    ({"nfev_factor": "2"}, ValueError, "nfev_factor must be a number > 1"),
    ({"nfev_factor": True}, ValueError, "nfev_factor must be a number > 1"),
    ({"converged_drop": 0.0}, ValueError, "converged_drop must be a number > 0 or None, got 0.0"),
    ({"converged_drop": 1.5}, ValueError, "converged_drop must be at most 1"),
    ({"name": ""}, ValueError, "name must be a non-empty string"),
    ({"name": 3}, ValueError, "name must be a non-empty string"),
    ({"append": "yes"}, TypeError, "append must be True or False"),
    ({"jsonl": 3}, TypeError, r"^jsonl must be a path \(str or os.PathLike\) or None, got int$"),
    ({"csv": [1]}, TypeError, "^csv must be a path .* got list$"),
    ({"tensorboard": 3}, TypeError, r"^tensorboard must be a folder \(str or os.PathLike\), an object with add_scalar "
                                    r"\(a SummaryWriter\), or None; got int$"),
])
def test_monitor_refuses_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        Monitor(**kwargs)


def test_monitor_defaults():
    assert repr(Monitor()) == "Monitor(window=50, warmup=0, nfev_factor=1.5, converged_drop=0.1, records=0, name='deqkit')"


def test_monitor_accepts_the_edges_of_its_ranges_and_numpy_scalars():
    m = Monitor(window=1, warmup=0, nfev_factor=1.0001, converged_drop=1.0, name="x")
    assert (m.window, m.warmup, m.nfev_factor, m.converged_drop, m.name) == (1, 0, 1.0001, 1.0, "x")
    m = Monitor(window=np.int64(2), warmup=np.int32(1), nfev_factor=np.float32(2.0))
    assert (m.window, m.warmup, m.nfev_factor) == (2, 1, 2.0) and type(m.window) is int
    assert m.step(TEMPLATE, step=np.int64(3), loss=np.float32(0.5)).step == 3
    assert repr(m) == "Monitor(window=2, warmup=1, nfev_factor=2.0, converged_drop=0.1, records=1, name='deqkit')"


def test_bad_file_paths_are_named(tmp_path):
    with pytest.raises(ValueError, match=f"^jsonl='{tmp_path}' is a folder; give a file path$"):
        Monitor(jsonl=tmp_path)
    with pytest.raises(ValueError, match=f"^csv='{tmp_path}/missing/log.csv': the folder '{tmp_path}/missing' does not exist$"):
        Monitor(csv=tmp_path / "missing" / "log.csv")


def test_a_bad_later_argument_leaves_no_file_open(tmp_path, monkeypatch):
    opened = []
    real_open = open

    def spy(*args, **kwargs):
        opened.append(real_open(*args, **kwargs))
        return opened[-1]

    monkeypatch.setattr("builtins.open", spy)
    with pytest.raises(ValueError, match="does not exist"):
        Monitor(jsonl=tmp_path / "a.jsonl", csv=tmp_path / "missing" / "b.csv")
    with pytest.raises(TypeError, match="tensorboard must be"):
        Monitor(jsonl=tmp_path / "a.jsonl", csv=tmp_path / "b.csv", tensorboard=3)
    assert len(opened) == 3 and all(handle.closed for handle in opened)


# -- Monitor: files ---------------------------------------------------------------------------
def read_csv(path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_jsonl_and_csv_hold_every_record(tmp_path):
    jsonl, table = tmp_path / "log.jsonl", tmp_path / "log.csv"
    s = legacy(9, escaped=torch.tensor([True, False, False, False]), finished_by=torch.tensor([0, 1, 0, 0]),
               nfev_by_solver=(6, 3))
    with Monitor(jsonl=jsonl, csv=table, window=2) as m:
        recs = [m.step(s, loss=0.5), m.step(legacy(11), loss=0.25)]
        # written as they come (flushed), not only on close
        assert len(jsonl.read_text().splitlines()) == 2
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert lines == [r.to_dict() for r in recs]
    assert deqkit.read_records(jsonl) == recs
    rows = read_csv(table)
    assert list(rows[0]) == list(recs[0].to_dict())
    assert [int(r["nfev"]) for r in rows] == [9, 11] and [float(r["loss"]) for r in rows] == [0.5, 0.25]
    assert rows[0]["nfev_by_solver"] == "[6, 3]" and json.loads(rows[0]["nfev_by_solver"]) == [6, 3]
    # unknown numbers are empty cells
    assert rows[1]["escaped"] == rows[1]["nfev_by_solver"] == rows[1]["backward_residual_max"] == ""


def test_csv_refuses_a_change_of_columns(tmp_path):
    with Monitor(csv=tmp_path / "log.csv") as m:
        m.step(TEMPLATE, loss=1.0)
        with pytest.raises(ValueError, match="pass the same scalars at every step"):
            m.step(TEMPLATE, loss=1.0, lr=0.1)


def test_files_are_replaced_unless_append(tmp_path):
    jsonl, table = tmp_path / "log.jsonl", tmp_path / "log.csv"
    for _ in range(2):
        with Monitor(jsonl=jsonl, csv=table) as m:
            m.step(TEMPLATE, loss=1.0)
    assert len(jsonl.read_text().splitlines()) == 1 and len(table.read_text().splitlines()) == 2
    with Monitor(jsonl=jsonl, csv=table, append=True) as m:
        m.step(TEMPLATE, step=1, loss=2.0)
    assert [r.step for r in deqkit.read_records(jsonl)] == [0, 1]
    rows = read_csv(table)  # one header, two rows
    assert [float(r["loss"]) for r in rows] == [1.0, 2.0]
    with Monitor(csv=table, append=True) as m:
        with pytest.raises(ValueError, match="the file's columns .* differ"):
            m.step(TEMPLATE, step=2, other=1.0)
    # appending to a new (or empty) file writes the header
    with Monitor(csv=tmp_path / "new.csv", append=True) as m:
        m.step(TEMPLATE, loss=1.0)
    assert read_csv(tmp_path / "new.csv")[0]["loss"] == "1.0"


class FakeWriter:
    def __init__(self):
        self.scalars, self.closed = [], False

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def close(self):
        self.closed = True


def test_tensorboard_writer_gets_every_number_under_the_name():
    writer = FakeWriter()
    s = legacy(9, escaped=torch.tensor([True, False, False, False]), finished_by=torch.tensor([0, 1, 0, 0]),
               nfev_by_solver=(6, 3))
    with Monitor(tensorboard=writer, name="deq1") as m:
        rec = m.step(s, step=4, loss=0.5)
    tags = {tag: (value, step) for tag, value, step in writer.scalars}
    assert {step for _, step in tags.values()} == {4}
    assert tags["deq1/nfev"][0] == 9 and tags["deq1/loss"][0] == 0.5 and tags["deq1/escaped"][0] == 1
    assert tags["deq1/nfev_by_solver/0"][0] == 6 and tags["deq1/nfev_by_solver/1"][0] == 3
    expected = {k for k, v in rec.to_dict().items() if v is not None and k not in ("step", "nfev_by_solver")}
    assert {t.split("/")[1] for t in tags if t.count("/") == 1} == expected
    assert "deq1/backward_residual_max" not in tags  # None: nothing to plot
    assert not writer.closed  # the caller's writer stays open


def test_tensorboard_folder_without_the_package_names_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if absent
    with pytest.raises(ImportError, match=f"^tensorboard='{tmp_path}/tb' needs the tensorboard package "
                                          r"\(pip install tensorboard\): "):
        Monitor(jsonl=tmp_path / "log.jsonl", tensorboard=tmp_path / "tb")


class FakeSummaryWriter(FakeWriter):
    made: list = []

    def __init__(self, log_dir):
        super().__init__()
        self.log_dir = log_dir
        FakeSummaryWriter.made.append(self)


def test_tensorboard_folder_makes_a_summary_writer_there_and_closes_it(tmp_path, monkeypatch):
    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = FakeSummaryWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    FakeSummaryWriter.made = []
    m = Monitor(tensorboard=tmp_path / "tb")
    m.step(TEMPLATE)
    (writer,) = FakeSummaryWriter.made
    assert writer.log_dir == str(tmp_path / "tb") and ("deqkit/nfev", TEMPLATE.nfev, 0) in writer.scalars
    assert not writer.closed
    m.close()
    assert writer.closed
    m.close()  # twice: nothing left to close


def test_tensorboard_folder_with_the_package(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is optional")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with Monitor(tensorboard=tmp_path / "tb") as m:
        m.step(TEMPLATE, loss=0.5)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [e.value for e in events.Scalars("deqkit/loss")] == [0.5]


def test_close_is_final_and_idempotent(tmp_path):
    m = Monitor(jsonl=tmp_path / "log.jsonl")
    m.step(TEMPLATE)
    m.close()
    m.close()
    with pytest.raises(ValueError, match="the monitor is closed"):
        m.step(TEMPLATE)
    plain = Monitor()
    plain.close()
    with pytest.raises(ValueError, match="^Monitor.step: the monitor is closed$"):
        plain.step(TEMPLATE)


# -- Monitor: checkpoints ----------------------------------------------------------------------
def test_a_resumed_monitor_goes_on_as_if_it_had_not_stopped():
    nfevs = [10, 10, 10, 12, 14, 16, 18, 20]
    whole = Monitor(window=3, warmup=1)
    _, whole_warnings = quiet(feed, whole, nfevs)
    first = Monitor(window=3, warmup=1)
    _, early = quiet(feed, first, nfevs[:6])
    state = pickle.loads(pickle.dumps(first.state_dict()))
    assert json.loads(json.dumps(state)) == state  # plain data
    resumed = Monitor(window=3, warmup=1)
    resumed.load_state_dict(state)
    assert resumed.trend == first.trend
    _, late = quiet(feed, resumed, nfevs[6:])
    assert resumed.trend == whole.trend and resumed.last.step == whole.last.step == 7
    assert [str(w.message) for w in early + late] == [str(w.message) for w in whole_warnings]
    assert len(whole_warnings) == 1
    with pytest.raises(ValueError, match="saved with window=3, this monitor has window=4"):
        Monitor(window=4).load_state_dict(state)


def test_a_monitor_that_warned_before_the_checkpoint_stays_quiet_after():
    first = Monitor(window=1)
    _, caught = quiet(feed, first, [10, 20])
    assert len(caught) == 1
    resumed = Monitor(window=1)
    resumed.load_state_dict(first.state_dict())
    _, caught = quiet(feed, resumed, [30])
    assert not caught


# -- AdaptiveJacobianWeight ------------------------------------------------------------------
def test_the_weight_waits_for_a_trend():
    w = AdaptiveJacobianWeight()
    assert (w.value, w.last_change) == (0.0, None)
    assert w.update(None) == 0.0 and w.last_change == "wait"


def test_the_weight_rises_from_start_by_factor_to_its_cap_and_cools_down():
    w = AdaptiveJacobianWeight(start=0.5, factor=3.0, max_weight=2.0, cooldown=2)
    bad = trend(ratio=1.5)
    assert w.update(bad) == 0.5 and w.last_change == "raise"
    assert [w.update(bad) for _ in range(2)] == [0.5, 0.5] and w.last_change == "wait"  # cooldown 2
    assert w.update(bad) == 1.5
    w.update(bad), w.update(bad)
    assert w.update(bad) == 2.0  # 4.5 capped
    w.update(bad), w.update(bad)
    assert w.update(bad) == 2.0 and w.last_change == "hold"  # at the cap: no change, no cooldown
    assert w.update(bad) == 2.0 and w.last_change == "hold"


def test_the_weight_falls_by_factor_and_turns_off_below_start():
    w = AdaptiveJacobianWeight(start=0.5, factor=2.0, cooldown=0)
    for _ in range(3):
        w.update(trend(ratio=2.0))
    assert w.value == 2.0
    good = trend(ratio=1.0)
    assert [w.update(good) for _ in range(4)] == [1.0, 0.5, 0.0, 0.0]
    assert w.last_change == "hold"  # already off


def test_between_the_thresholds_the_weight_holds():
    w = AdaptiveJacobianWeight(raise_above=1.2, lower_below=1.1, cooldown=0)
    w.update(trend(ratio=1.3))
    start = w.value
    for ratio in (1.1, 1.15, 1.2):
        assert w.update(trend(ratio=ratio)) == start and w.last_change == "hold"
    assert w.update(trend(ratio=1.2001)) == 2 * start
    assert w.update(trend(ratio=1.0999)) == start


def test_a_drop_in_the_converged_fraction_raises_it_and_blocks_a_lowering():
    w = AdaptiveJacobianWeight(start=1.0, converged_drop=0.5, cooldown=0)
    assert w.update(trend(drop=0.5)) == 0.0 and w.last_change == "hold"  # exactly the threshold: not past
    assert w.update(trend(drop=0.5625)) == 1.0
    assert w.update(trend(ratio=1.0, drop=0.375)) == 1.0 and w.last_change == "hold"  # above half: no lowering
    assert w.update(trend(ratio=1.0, drop=0.25)) == 0.0 and w.last_change == "lower"  # exactly half: healthy


def test_the_default_cooldown_is_the_trend_window():
    w = AdaptiveJacobianWeight()
    w.update(trend(ratio=2.0, window=5))
    waits = 0
    while w.update(trend(ratio=2.0, window=5)) == w.start:
        waits += 1
    assert waits == 5


def test_decide_does_not_change_the_weight():
    w = AdaptiveJacobianWeight(cooldown=0)
    assert w.decide(trend(ratio=2.0)) == "raise" and w.value == 0.0 and w.last_change is None
    assert w.decide(None) == "wait"


def test_the_monitor_drives_the_weight_up_and_back_down():
    """A run whose NFE grows while the weight is 0 and falls back once it is on."""
    m = Monitor(window=2, nfev_factor=None)
    w = AdaptiveJacobianWeight(start=0.25, raise_above=1.2, lower_below=1.05)
    history = []
    for step in range(20):
        nfev = 10 + 2 * step if w.value == 0 and step < 8 else 10
        m.step(stats(nfev))
        history.append(w.update(m.trend))
    assert history[:3] == [0.0] * 3  # the trend needs two windows
    assert max(history) >= 0.25 and history[-1] == 0.0
    first_on = history.index(0.25)
    assert history[first_on: first_on + 3] == [0.25] * 3  # held through the cooldown


@pytest.mark.parametrize("kwargs, match", [
    ({"start": 0}, "start must be a number > 0, got 0"),
    ({"start": True}, "start must be a number > 0"),
    ({"factor": 1.0}, "factor must be a number > 1, got 1.0"),
    ({"max_weight": 0.05}, r"max_weight must be >= start \(0.1\), got 0.05"),
    ({"max_weight": -1.0}, "max_weight must be a number > 0"),
    ({"raise_above": 1.0}, "raise_above must be a number > 1"),
    ({"lower_below": 1.2}, r"lower_below must be <= raise_above \(1.15\), got 1.2"),
    ({"lower_below": 0}, "lower_below must be a number > 0"),
    ({"converged_drop": 0}, r"converged_drop must be a number in \(0, 1\], got 0"),
    ({"converged_drop": 1.5}, r"converged_drop must be a number in \(0, 1\], got 1.5"),
    ({"cooldown": -1}, "cooldown must be an integer >= 0 or None, got -1"),
    ({"cooldown": 1.5}, "cooldown must be an integer >= 0 or None"),
    ({"cooldown": False}, "cooldown must be an integer >= 0 or None"),
])
def test_adaptive_weight_refuses_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaptiveJacobianWeight(**kwargs)


def test_adaptive_weight_accepts_the_edges_and_refuses_a_non_trend():
    w = AdaptiveJacobianWeight(start=1.0, max_weight=1.0, lower_below=1.15, converged_drop=1.0, cooldown=0)
    assert w.update(trend(ratio=2.0)) == 1.0
    with pytest.raises(TypeError, match="trend must be a deqkit.Trend .* got float"):
        w.update(1.5)


def test_adaptive_weight_state_round_trips_and_pickles():
    w = AdaptiveJacobianWeight(start=0.5, cooldown=3)
    w.update(trend(ratio=2.0))
    w.update(trend(ratio=2.0))
    other = AdaptiveJacobianWeight(start=0.5, cooldown=3)
    other.load_state_dict(w.state_dict())
    assert (other.value, other.last_change) == (0.5, "wait")
    assert [other.update(trend(ratio=2.0)) for _ in range(3)] == [0.5, 0.5, 1.0]  # 2 waits left, then a raise
    clone = pickle.loads(pickle.dumps(w))
    assert clone == w and clone.state_dict() == w.state_dict()
    other.load_state_dict({"value": 0.0, "hold": 0, "last_change": "lower"})
    assert (other.value, other.last_change) == (0.0, "lower")
    other.load_state_dict({"value": other.max_weight, "hold": 1, "last_change": "raise"})
    assert other.value == other.max_weight
    with pytest.raises(ValueError, match=r"value 0.25 is neither 0 nor in \[start, max_weight\]"):
        other.load_state_dict({"value": 0.25, "hold": 0, "last_change": None})
    with pytest.raises(ValueError, match=r"value 20.0 is neither"):
        other.load_state_dict({"value": 20.0, "hold": 0, "last_change": None})
