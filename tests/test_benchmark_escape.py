"""benchmarks/escape.py: the escape rule on maps with and without a fixed point (the --quick run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "escape.py"


def test_quick_run_draws_the_line_between_drifts_and_contractions(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["device"] == "cpu" and results["growth"] == 10.0 and results["fall"] == 0.5
    summary = {row["map"]: row for row in results["summary"]}
    drifts = [row for row in summary.values() if not row["fixed_point"]]
    contractions = [row for row in summary.values() if row["fixed_point"]]
    assert len(drifts) >= 3 and len(contractions) >= 5
    for row in drifts:  # never a success; each passed the relative test somewhere, and escaped there
        assert row["SUCCESS"] == 0 and row["ESCAPED"] > 0 and row["fall"][0] >= 0.5 and row["growth"][0] >= 10, row
    for row in contractions:  # never an escape
        assert row["ESCAPED"] == 0 and row["SUCCESS"] > 0, row
    assert (tmp_path / "escape.png").stat().st_size > 10_000
    assert "| z + c, from 0 | no |" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_asking_for_cuda_without_it_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--device", "cuda", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "--device cuda" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
