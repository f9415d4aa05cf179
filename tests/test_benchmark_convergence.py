"""Smoke test of benchmarks/convergence.py --quick: fields present and sane, plots written."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

import deqkit

ROOT = Path(__file__).resolve().parents[1]


def test_convergence_quick(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "convergence.py"), "--quick", "--out", str(out), "--threads", "1"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| problem | solver |" in proc.stdout
    data = json.loads((out / "results.json").read_text())
    assert data["results"], "no results"
    libraries = {r["library"] for r in data["results"]}
    assert libraries == {"deqkit", "torchdeq"}
    for r in data["results"]:
        for key in ("problem", "solver", "nfev_to_tol", "seconds_to_tol", "f_seconds", "trace_residual", "trace_seconds", "trace_nfev"):
            assert key in r, key
        assert r["converged"], f"{r['solver']} did not converge on {r['problem']}"
        assert r["nfev_to_tol"] >= 1
        assert r["seconds_to_tol"] > 0 and r["f_seconds"] > 0
        assert all(math.isfinite(x) for x in r["trace_residual"])
        # residuals only (no solver's placeholder such as torchdeq's initial 1e8), from z0 = 0 at most 1
        assert max(r["trace_residual"]) <= 1.0 + 1e-6, (r["solver"], r["trace_residual"][:3])
        nfe = r["trace_nfev"]
        assert len(nfe) == len(r["trace_residual"]) == len(r["trace_seconds"])
        assert nfe[0] >= 1 and all(b > a for a, b in zip(nfe, nfe[1:])), (r["solver"], nfe[:5])
        assert nfe[-1] <= r["budget_nfe"]  # every solver drawn over the same budget of f evaluations
        assert all(b >= a for a, b in zip(r["trace_seconds"], r["trace_seconds"][1:]))
    active = [r for r in data["results"] if r["active_set"]]
    assert active, "the heterogeneous problem must be run with active_set too"
    for r in active:
        whole = next(w for w in data["results"] if w["solver"] == r["solver"] and w["problem"] == r["problem"] and not w["active_set"])
        assert r["sample_evals"] < whole["sample_evals"]
    # each trace sits at the call of f that produced it: deqkit's first residual is that of z0
    # (call 1); torchdeq's anderson spends two calls seeding its memory before its first entry
    by_solver = {r["solver"]: r for r in data["results"] if r["problem"] == "tanh_rho0.9"}
    assert by_solver["deqkit FixedPoint"]["trace_nfev"][:3] == [1, 2, 3]
    assert by_solver["torchdeq fixed_point_iter"]["trace_nfev"][:3] == [1, 2, 3]
    assert by_solver["torchdeq broyden"]["trace_nfev"][0] == 2
    assert by_solver["torchdeq anderson(m=5)"]["trace_nfev"][0] == 3
    assert data["threads"] == 1
    for name in data["plots"]:
        png = out / name
        assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_convergence_figures_read_at_a_glance():
    """Every figure has a title, labelled axes and one legend entry for every line it draws."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import convergence
        from _problems import heterogeneous, tanh_layer
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    problems = [tanh_layer(0.9, dim=8, batch=2), heterogeneous(dim=8, batch=8)]
    runners = [convergence.deqkit_runner("deqkit FixedPoint", deqkit.FixedPoint()),
               convergence.deqkit_runner("deqkit NewtonKrylov", deqkit.NewtonKrylov(krylov_dim=4)),
               convergence.deqkit_runner("deqkit FixedPoint", deqkit.FixedPoint(), active_set=True)]
    results = []
    for problem in problems:
        for runner in runners[:2] + (runners[2:] if problem.name == "heterogeneous" else []):
            results.append(convergence.bench(problem, runner, 1e-4, 1, 1e-3))
    newton = next(r for r in results if r["solver"] == "deqkit NewtonKrylov")
    # Newton-Krylov spends several calls of f per step: its trace sits at those NFE, not at step numbers
    assert newton["trace_nfev"][-1] > len(newton["trace_nfev"])
    assert newton["trace_nfev"][-1] <= newton["budget_nfe"]
    for x_key, x_label, _, what in convergence.PLOTS:
        fig = convergence.figure(results, problems, x_key, x_label, what)
        try:
            assert fig._suptitle is not None and what in fig._suptitle.get_text()
            panels = [ax for ax in fig.axes if ax.lines]
            assert len(panels) == len(problems)
            for ax in panels:
                assert ax.get_title() and ax.get_xlabel() == x_label and ax.get_ylabel()
            legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
            assert len(legends) == 1
            entries = [t.get_text() for t in legends[0].get_texts()]
            assert {"deqkit FixedPoint", "deqkit NewtonKrylov", "deqkit FixedPoint (active set)"} <= set(entries)
            assert any(e.startswith("tolerance") for e in entries)
            # every solver line of every panel has its label in the legend
            labelled = {convergence._label(r) for r in results}
            assert labelled <= set(entries)
        finally:
            plt.close(fig)


def test_replot_redraws_from_results(tmp_path):
    out = tmp_path / "bench"
    run = [sys.executable, str(ROOT / "benchmarks" / "convergence.py"), "--quick", "--out", str(out), "--repeats", "1"]
    assert subprocess.run(run, capture_output=True, text=True, timeout=300).returncode == 0
    (out / "residual_vs_nfe.png").unlink()
    proc = subprocess.run(run + ["--replot"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "residual_vs_nfe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
