"""Smoke test of benchmarks/threads.py: one measured setting and one profile, at tiny cost."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import threads  # noqa: E402

sys.path.remove(str(ROOT / "benchmarks"))


def test_one_setting_in_a_fresh_process():
    row = threads.measure(1, "PASSIVE + spin 3000", 0, steps=1)
    assert row["threads"] == 1 and row["omp_wait"] == "PASSIVE + spin 3000" and row["competitors"] == 0
    assert row["environment"] == {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "3000"}  # what the worker saw
    assert 0 < row["teacher_step_s"] <= row["teacher_step_max_s"]
    assert 0 < row["anderson_ms"] <= row["anderson_max_ms"]


def test_profile_names_the_solver_ops():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "threads.py"), "--profile", "anderson",
                           "--threads", "1", "--competitors", "0"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Self CPU" in proc.stdout and "aten::" in proc.stdout


def test_quick_records_the_device(tmp_path):
    """--quick: one setting (one thread, idle machine); the device in results.json and the
    table's header."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "threads.py"), "--quick", "--device", "cpu",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["device"] == "cpu" and data["machine"]["device_name"] and data["steps"] == 1
    assert data["machine"]["torch"] == torch.__version__
    assert [(r["competitors"], r["torch_threads"], r["threads"], r["omp_wait"]) for r in data["results"]] == [
        (0, 1, 1, "default")]
    assert data["quick"] is True and data["results"][0]["anderson_ms"] > 0
    assert proc.stdout.startswith(f"threads on cpu ({data['machine']['device_name']}), torch {torch.__version__}")
    assert proc.stdout.count("\n| 0 |") == 1


def test_names_a_missing_cuda(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_:
        threads.main(["--quick", "--device", "cuda", "--out", str(tmp_path)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1
    assert "error: --device cuda: CUDA is not available on this machine" in lines[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_one_setting_on_cuda():
    row = threads.measure(1, "default", 0, steps=1, device="cuda")
    assert 0 < row["teacher_step_s"] <= row["teacher_step_max_s"] and 0 < row["anderson_ms"]
