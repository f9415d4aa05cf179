"""Smoke test of benchmarks/backward.py --quick: fields present and sane, plots written."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_backward_quick(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "backward.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| mode |" in proc.stdout
    data = json.loads((out / "results.json").read_text())
    modes = {r["mode"] for r in data["results"]}
    assert {"Unrolled", "Unrolled(checkpoint)", "OneStep"} <= modes
    assert any(m.startswith("Implicit") for m in modes) and any(m.startswith("Phantom") for m in modes)
    for r in data["results"]:
        assert r["grad_finite"]
        assert r["step_seconds"] > 0
        assert r["peak_mib"] is None or r["peak_mib"] >= 0
        assert math.isfinite(r["cosine"]) and -1.0 <= r["cosine"] <= 1.0 + 1e-6
        assert r["iters"] in data["iters"]
    # gradients computed through the fixed point agree with the reference direction
    best = max(r["cosine"] for r in data["results"] if r["mode"] == "Unrolled")
    assert best > 0.9
    for name in data["plots"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
