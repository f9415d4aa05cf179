"""Smoke test of benchmarks/threads.py: one measured setting and one profile, at tiny cost."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import threads  # noqa: E402

sys.path.remove(str(ROOT / "benchmarks"))


def test_one_setting_in_a_fresh_process():
    row = threads.measure(1, True, 0, steps=1)
    assert row["threads"] == 1 and row["omp_wait_policy"] == "PASSIVE" and row["competitors"] == 0
    assert 0 < row["teacher_step_s"] <= row["teacher_step_max_s"]
    assert 0 < row["anderson_ms"] <= row["anderson_max_ms"]


def test_profile_names_the_solver_ops():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "threads.py"), "--profile", "anderson",
                           "--threads", "1", "--competitors", "0"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Self CPU" in proc.stdout and "aten::" in proc.stdout
