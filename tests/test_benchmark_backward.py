"""Smoke test of benchmarks/backward.py --quick: fields present and sane, plots written."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_backward_quick(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "backward.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| mode |" in proc.stdout
    data = json.loads((out / "results.json").read_text())
    assert data["device"] == "cpu" and data["memory"] == "rise of the peak RSS"
    assert data["machine"]["torch"] == __import__("torch").__version__ and data["machine"]["device_name"]
    assert proc.stdout.startswith(f"backward on cpu ({data['machine']['device_name']})")
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


def _backward_module():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import backward
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return backward


def test_backward_in_process(tmp_path, capsys):
    """--in-process: every configuration in this process, times and cosines but no peak memory
    (nor its figure) on the CPU."""
    backward = _backward_module()
    assert backward.main(["--quick", "--in-process", "--device", "cpu", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["device"] == "cpu" and data["memory"] is None
    assert all(r["peak_mib"] is None and r["step_seconds"] > 0 and r["grad_finite"] for r in data["results"])
    assert max(r["cosine"] for r in data["results"] if r["mode"] == "Unrolled") > 0.9
    assert data["plots"] == ["backward_time.png", "backward_cosine.png"]
    assert "memory: not measured (--in-process)" in capsys.readouterr().out.splitlines()[0]


def test_backward_names_a_missing_cuda(tmp_path, monkeypatch, capsys):
    backward = _backward_module()
    monkeypatch.setattr(__import__("torch").cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_:
        backward.main(["--quick", "--device", "cuda", "--out", str(tmp_path)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1
    assert "error: --device cuda: CUDA is not available on this machine" in lines[0]
    assert not (tmp_path / "results.json").exists()


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_backward_quick_on_cuda(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "backward.py"), "--quick", "--device", "cuda",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    assert data["device"] == "cuda" and data["memory"] == "rise of the CUDA allocator's peak"
    by = {(r["mode"], r["iters"]): r for r in data["results"]}
    assert all(r["peak_mib"] > 0 and r["grad_finite"] for r in data["results"])
    # Unrolled stores every iteration; Implicit does not
    assert by[("Unrolled", 20)]["peak_mib"] > 2 * by[("Unrolled", 5)]["peak_mib"]
    assert by[("Implicit(tol=0.0001)", 20)]["peak_mib"] < 1.5 * by[("Implicit(tol=0.0001)", 5)]["peak_mib"]


def test_backward_builds_on_the_device():
    """The cell, its input and target are placed on the device asked for (meta stands in for a
    GPU), with the same numbers on every device (drawn on the CPU from the seed)."""
    backward = _backward_module()
    size = {"batch": 2, "channels": 4, "hw": 4}
    cell, x, target = backward.build(size, device="meta")
    assert {p.device.type for p in cell.parameters()} == {x.device.type, target.device.type} == {"meta"}
    cpu_cell, cpu_x, _ = backward.build(size)
    again_cell, again_x, _ = backward.build(size, device="cpu")
    assert torch.equal(cpu_x, again_x) and torch.equal(cpu_cell.conv1.weight, again_cell.conv1.weight)
