"""Smoke test of benchmarks/convergence.py --quick: fields present and sane, plots written."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

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
        assert r["trace_nfev"] == list(range(1, len(r["trace_nfev"]) + 1))
        assert all(b >= a for a, b in zip(r["trace_seconds"], r["trace_seconds"][1:]))
    active = [r for r in data["results"] if r["active_set"]]
    assert active, "the heterogeneous problem must be run with active_set too"
    for r in active:
        whole = next(w for w in data["results"] if w["solver"] == r["solver"] and w["problem"] == r["problem"] and not w["active_set"])
        assert r["sample_evals"] < whole["sample_evals"]
    for name in data["plots"]:
        png = out / name
        assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
