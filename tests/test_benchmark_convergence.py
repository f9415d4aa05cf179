"""Smoke test of benchmarks/convergence.py --quick: fields present and sane, plots written."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


# -- the device ------------------------------------------------------------------------------
def _bench_module(name: str):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def _devices_seen(fn) -> set[str]:
    """The devices of every tensor (with at least one dimension) that reaches an op in fn()."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    seen: set[str] = set()

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            for t in tree_flatten((args, kwargs or {}))[0]:
                if isinstance(t, torch.Tensor) and t.dim() > 0:
                    seen.add(t.device.type)
            return func(*args, **(kwargs or {}))

    with Record(), torch.no_grad():
        fn()
    return seen


def test_devices_seen_catches_a_tensor_left_on_the_cpu():
    """The check below can fail: a map holding a CPU weight is seen mixing devices."""
    w = torch.randn(4, 4)
    z = torch.zeros(2, 4, device="meta")
    assert _devices_seen(lambda: z @ w.T) == {"meta", "cpu"}


@pytest.mark.parametrize("build", ["tanh_layer", "heterogeneous", "linear_ill", "mdeq_conv", "get_t"])
def test_problems_live_on_the_device(build):
    """Built for another device (meta stands in for a GPU), a problem's start point, inputs and
    every tensor its map touches are there: nothing stays on the CPU."""
    problems = _bench_module("_problems")
    small = {"tanh_layer": dict(rho=0.9, dim=8, batch=2), "heterogeneous": dict(dim=8, batch=8, tokens=2),
             "linear_ill": dict(dim=8, batch=2), "mdeq_conv": dict(batch=2, channels=8, size=4), "get_t": dict(batch=1)}
    p = getattr(problems, build)(**small[build], device="meta")
    assert p.z0.device.type == "meta"
    assert all(x.device.type == "meta" for x in p.inputs if isinstance(x, torch.Tensor))
    assert _devices_seen(lambda: p.f(p.z0, *p.inputs)) == {"meta"}
    assert {q.name for q in problems.suite(True, device="meta") if q.z0.device.type != "meta"} == set()


def test_clock_synchronises_around_f_on_cuda(monkeypatch):
    """On CUDA the clock waits for the device before and after each call of f (else it times
    the launch only), and at the start and end of the solve; ``time_f=False`` leaves f alone."""
    convergence = _bench_module("convergence")
    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append(("sync", str(device))))
    cuda = torch.device("cuda")
    clock = convergence._Clock(lambda z: events.append("f") or z, (), cuda)
    clock.start()
    clock(torch.zeros(1))
    clock(torch.zeros(1))
    clock.elapsed()
    sync = ("sync", "cuda")
    assert events == [sync, sync, "f", sync, sync, "f", sync, sync]
    assert clock.in_f > 0 and len(clock.times) == 2
    events.clear()
    loose = convergence._Clock(lambda z: events.append("f") or z, (), cuda, time_f=False)
    loose.start()
    loose(torch.zeros(1))
    loose.elapsed()
    assert events == [sync, "f", sync] and math.isnan(loose.in_f) and len(loose.times) == 1
    events.clear()
    convergence._Clock(lambda z: z, (), torch.device("cpu")).start()
    assert events == []  # the CPU needs no synchronisation


@pytest.mark.parametrize("available, count, spec, message", [
    (False, 0, "cuda", "--device cuda: CUDA is not available on this machine"),
    (False, 0, "cuda:0", "--device cuda:0: CUDA is not available on this machine"),
    (True, 1, "cuda:1", "--device cuda:1: this machine has 1 CUDA device(s)"),
    (True, 1, "gpu", "--device 'gpu': expected cpu, cuda or cuda:N"),
])
def test_convergence_names_an_unusable_device(monkeypatch, capsys, tmp_path, available, count, spec, message):
    convergence = _bench_module("convergence")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    with pytest.raises(SystemExit) as exit_:
        convergence.main(["--quick", "--out", str(tmp_path), "--device", spec])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error: " + message in lines[0], err  # one line, naming the option
    assert not (tmp_path / "results.json").exists()


def test_convergence_records_the_device(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "convergence.py"), "--quick", "--repeats", "1",
                           "--only", "tanh_rho0.9", "--device", "cpu", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    assert data["device"] == "cpu" and data["machine"]["device"] == "cpu"
    assert data["machine"]["torch"] == torch.__version__ and data["machine"]["device_name"]
    first = proc.stdout.splitlines()[0]
    assert first.startswith(f"convergence on cpu ({data['machine']['device_name']}), torch {torch.__version__}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_convergence_quick_on_cuda(tmp_path):
    """Every problem, start point and solver state on the GPU: a tensor left on the CPU would
    make an op fail (CUDA does not mix with CPU tensors), so a clean run is the check."""
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "convergence.py"), "--quick", "--repeats", "1",
                           "--device", "cuda", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    assert data["device"] == "cuda" and data["machine"]["device_name"] == torch.cuda.get_device_name(0)
    assert all(r["converged"] and r["seconds_to_tol"] > 0 and r["overhead_per_iter"] > -1 for r in data["results"])
