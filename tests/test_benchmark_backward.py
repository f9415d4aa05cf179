"""Smoke test of benchmarks/backward.py --quick: fields present and sane, plots written."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_backward_replot_titles_and_legend(tmp_path):
    """--replot redraws from results.json; every figure has a title, axis labels, and a legend
    entry for every mode it draws."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    size = {"batch": 2, "channels": 4, "hw": 4}
    rows = [{"mode": mode, "iters": n, "step_seconds": 0.01 * n, "peak_mib": 1.0 + n, "cosine": 0.9, "size": size}
            for mode in ("Implicit(tol=0.01)", "Phantom(k=2)", "Unrolled") for n in (5, 20)]
    (tmp_path / "results.json").write_text(json.dumps({"size": size, "iters": [5, 20], "results": rows}))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "backward.py"), "--replot", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import backward
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    created = []
    real_subplots = plt.subplots

    def subplots(*args, **kwargs):
        fig, ax = real_subplots(*args, **kwargs)
        created.append(ax)
        return fig, ax

    plt.subplots = subplots
    try:
        files = backward.plot(rows, [5, 20], tmp_path)
    finally:
        plt.subplots = real_subplots
    assert len(files) == len(created) == 3
    for ax in created:
        assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel()
        entries = {t.get_text() for t in ax.get_legend().get_texts()}
        assert entries == {"Implicit(tol=0.01)", "Phantom(k=2)", "Unrolled"}
    assert any("(s)" in ax.get_ylabel() for ax in created) and any("MiB" in ax.get_ylabel() for ax in created)
