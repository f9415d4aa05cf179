"""Smoke test of benchmarks/overhead.py --quick: every measurement and target present and sane."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "overhead.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def test_overhead_quick(tmp_path):
    out = tmp_path / "bench"
    proc = _run("--quick", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| target | measured |" in proc.stdout
    data = json.loads((out / "results.json").read_text())
    assert (out / "overhead.png").stat().st_size > 10_000
    assert data["iterations"] == 30 and data["device"] == "cpu" and data["machine"]["device_name"]
    # every solver of both libraries on both maps, each having called f exactly 30 times (deqkit)
    rows = data["overhead"]
    assert {(r["map"], r["solver"], r["library"]) for r in rows} == {
        (m, s, lib) for m in ("tanh_d64_b8", "tanh_d128_b16")
        for s in ("FixedPoint", "Anderson(m=5)", "Broyden") for lib in ("deqkit", "deqkit check_every=5", "torchdeq")}
    for r in rows:
        assert r["f_seconds"] > 0 and r["outside_f_seconds"] > 0 and r["overhead"] > 0
        lo, hi = r["outside_f_spread"]
        assert lo <= r["outside_f_seconds"] <= hi
        if r["library"].startswith("deqkit"):
            assert r["nfev"] == 30
    # the active set saved evaluations on the mixed batch, for both solvers, both maps
    assert len(data["active_set"]) == 4
    for r in data["active_set"]:
        whole, active = r["sample_evals"]
        assert active < whole / 2
        assert r["ratio"] == pytest.approx(r["active_seconds"] / r["whole_seconds"])
    assert {r["problem"] for r in data["anderson_nfe"]} == {"tanh_rho0.9", "linear_ill"}
    for r in data["anderson_nfe"]:
        assert r["deqkit"] and r["torchdeq"]
    # targets: one per (map, solver) against torchdeq, two against f, four active-set, two NFE
    targets = data["targets"]
    assert len(targets) == 6 + 2 + 4 + 2
    assert all(t["met"] in (True, False) for t in targets)
    nfe_targets = [t for t in targets if "NFE" in t["target"]]
    assert all(t["met"] == (int(t["measured"].split(" vs ")[0]) <= int(t["measured"].split(" vs ")[1])) for t in nfe_targets)


@pytest.mark.parametrize("args, message", [
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--threads", "-1"], "--threads must be >= 0"),
    (["--device", "nonsense"], "--device 'nonsense': expected cpu, cuda or cuda:N"),
])
def test_overhead_refuses_bad_options(tmp_path, args, message):
    proc = _run("--quick", "--out", str(tmp_path), *args)
    assert proc.returncode == 2 and message in proc.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_overhead_names_a_missing_cuda(tmp_path):
    proc = _run("--quick", "--out", str(tmp_path), "--device", "cuda")
    assert proc.returncode == 2 and "CUDA is not available" in proc.stderr
