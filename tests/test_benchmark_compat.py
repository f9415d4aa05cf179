"""Smoke test of benchmarks/compat.py --quick: every cell and configuration, a few seconds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_quick_run_writes_json_and_table(tmp_path):
    pytest.importorskip("torchdeq")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compat.py"), "--quick", "--repeats", "2",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert {(r["cell"], r["config"]) for r in rows} == {(c, k) for c in ("mlp", "block")
                                                         for k in ("anderson-12", "get-recipe", "ift-anderson")}
    assert all(r["ratio"] > 0 for r in rows)
    assert (tmp_path / "table.md").read_text() in proc.stdout


def test_help():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compat.py"), "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--quick" in proc.stdout
