"""Smoke test of benchmarks/compat.py --quick: every cell and configuration, a few seconds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


def _compat_module():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import compat
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return compat


def test_device_recorded_in_json_and_header(tmp_path, capsys):
    pytest.importorskip("torchdeq")
    compat = _compat_module()
    assert compat.main(["--quick", "--repeats", "1", "--device", "cpu", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["device"] == "cpu" and data["machine"]["device"] == "cpu" and data["machine"]["device_name"]
    assert data["machine"]["torch"] == torch.__version__
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"compat vs torchdeq on cpu ({data['machine']['device_name']}), torch {torch.__version__}")
    model, x, y = compat.make_problem("block", True, "meta")  # another device (meta stands in for a GPU)
    assert {p.device.type for p in model.parameters()} == {x.device.type, y.device.type} == {"meta"}


def test_names_a_missing_cuda(tmp_path, monkeypatch, capsys):
    compat = _compat_module()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_:
        compat.main(["--quick", "--device", "cuda:0", "--out", str(tmp_path)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1
    assert "error: --device cuda:0: CUDA is not available on this machine" in lines[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_quick_run_on_cuda(tmp_path):
    pytest.importorskip("torchdeq")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compat.py"), "--quick", "--repeats", "2",
                           "--device", "cuda", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["device"] == "cuda" and data["machine"]["device_name"] == torch.cuda.get_device_name(0)
    assert all(r["ratio"] > 0 for r in data["rows"])
