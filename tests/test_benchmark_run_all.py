"""benchmarks/run_all.py: the whole set end to end (--quick, CPU), and its failure paths on
stand-in scripts (a failing one, one past its budget, one that ignores --device, ...)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "run_all.py"
HEADERS = {  # the first line of each script's table
    "convergence": "| problem | solver |", "backward": "| mode |", "compat": "| cell | configuration |",
    "threads": "| busy processes |", "overhead": "| target | measured |",
}


def _run_all_module():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import run_all
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return run_all


def test_every_benchmark_script_is_in_the_registry():
    """A new benchmark script must be added to run_all's registry (or it would silently not run)."""
    run_all = _run_all_module()
    scripts = {p.stem for p in (ROOT / "benchmarks").glob("*.py") if not p.stem.startswith("_") and p.stem != "run_all"}
    assert scripts <= {s.name for s in run_all.REGISTRY}
    assert sum(s.budget_s for s in run_all.REGISTRY) <= run_all.TOTAL_BUDGET_S <= 8 * 60


def test_the_docs_state_the_registry_budgets():
    run_all = _run_all_module()
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    section = page.split("## Running on a GPU\n", 1)[1].split("\n## ", 1)[0]
    for stage in run_all.REGISTRY:
        assert f"{stage.name} {stage.budget_s:.0f} s" in section, stage.name
    assert f"{run_all.TOTAL_BUDGET_S:.0f} s for the whole run" in section
    assert "python benchmarks/run_all.py --device cuda" in section and "pending" in section


def test_run_all_quick_end_to_end(tmp_path):
    out = tmp_path / "all"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["device"] == "cpu" and summary["quick"] is True and summary["failed"] == []
    assert summary["machine"]["device_name"] and summary["machine"]["torch"] == torch.__version__
    stages = {s["name"]: s for s in summary["stages"]}
    present = {p.stem for p in (ROOT / "benchmarks").glob("*.py")}
    for name, stage in stages.items():
        if name not in present:
            assert stage["status"] == "missing" and "not in this checkout" in stage["note"]
            continue
        assert stage["status"] == "ok", stage
        assert f"[{name}] ok in " in proc.stdout  # each stage's time, printed as it ends
        assert 0 < stage["seconds"] <= stage["budget_s"]
        assert "--quick" in stage["command"] and stage["command"][stage["command"].index("--device") + 1] == "cpu"
        results = json.loads((out / name / "results.json").read_text())
        assert results["device"] == "cpu"
    assert set(HEADERS) <= {n for n, s in stages.items() if s["status"] == "ok"}
    md = (out / "summary.md").read_text()
    device_name = summary["machine"]["device_name"]
    assert md.startswith(f"# Benchmarks on cpu: {device_name} (--quick)")
    for name, first_row in HEADERS.items():
        section = md.split(f"\n## {name} on cpu ({device_name}): ok, ", 1)[1].split("\n## ", 1)[0]
        assert first_row in section, name
        assert "wrote " not in section
    print(f"run_all --quick: {seconds:.1f} s")


def _script(folder: Path, name: str, body: str, options: str = '"--device", "--out", "--quick"') -> None:
    """A stand-in benchmark: defines ``options`` (named in its source) and runs ``body``."""
    (folder / f"{name}.py").write_text(textwrap.dedent(f"""\
        import argparse, json, os, subprocess, sys, time
        from pathlib import Path
        parser = argparse.ArgumentParser()
        for option in [{options}]:
            parser.add_argument(option, **({{"action": "store_true"}} if option.endswith("quick") else {{}}))
        args = parser.parse_args()
        out = Path(args.out)
        """) + textwrap.dedent(body))


@pytest.fixture
def stand_ins(tmp_path, monkeypatch):
    """run_all pointed at a folder of stand-in scripts, one per way a stage can end."""
    run_all = _run_all_module()
    folder = tmp_path / "scripts"
    folder.mkdir()
    ok = 'json.dump({"device": args.device}, open(out / "results.json", "w")); print("fine on " + args.device)\n' \
         'print("| a | b |"); print("wrote " + str(out / "results.json"))\n'
    _script(folder, "good", "time.sleep(0.5)\n" + ok)  # takes a visible share of a small total budget
    _script(folder, "fewer", ok, options='"--device", "--out"')  # no --quick: left out, noted
    _script(folder, "broken", 'sys.exit("broken: something went wrong")\n')
    _script(folder, "wrong_device", 'json.dump({"device": "cuda:7"}, open(out / "results.json", "w"))\n')
    _script(folder, "no_device", "", options='"--out", "--quick"')
    # past its budget, with a child process of its own: both must be ended
    _script(folder, "slow", 'child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])\n'
                            '(out / "child.pid").write_text(str(child.pid)); time.sleep(60)\n')
    monkeypatch.setattr(run_all, "HERE", folder)
    quick = (("--quick",),)
    registry = tuple(run_all.Stage(name, quick, quick, budget_s=30, quick_budget_s=30)
                     for name in ("good", "fewer", "broken", "wrong_device", "no_device", "absent"))
    monkeypatch.setattr(run_all, "REGISTRY", registry + (run_all.Stage("slow", quick, quick, 3, 3),))
    return run_all


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (ended, not yet reaped by its orphaned parent's successor) counts as ended
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def test_run_all_names_every_failure(stand_ins, tmp_path, capsys):
    out = tmp_path / "out"
    assert stand_ins.main(["--quick", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("run_all: failed: ")
    for name in ("broken", "wrong_device", "no_device", "slow"):
        assert f" {name} (" in err[0], name
    assert "good" not in err[0] and "fewer" not in err[0] and "absent" not in err[0]
    summary = json.loads((out / "summary.json").read_text())
    stages = {s["name"]: s for s in summary["stages"]}
    assert summary["failed"] == ["broken", "wrong_device", "no_device", "slow"]
    assert stages["good"]["status"] == stages["fewer"]["status"] == "ok"
    assert stages["fewer"]["dropped_options"] == ["--quick"] and "--quick" in stages["fewer"]["note"]
    assert stages["absent"]["status"] == "missing" and "not in this checkout" in stages["absent"]["note"]
    assert "broken: something went wrong" in stages["broken"]["note"]
    assert "'cuda:7'" in stages["wrong_device"]["note"]
    assert "no --device option" in stages["no_device"]["note"]
    assert "past its budget of 3 s" in stages["slow"]["note"] and stages["slow"]["seconds"] < 20
    child = int((out / "slow" / "child.pid").read_text())
    deadline = time.time() + 5
    while _alive(child) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(child), "the slow script's own child process outlived the timeout"
    md = (out / "summary.md").read_text()
    assert "fine on cpu" in md and "| a | b |" in md and "wrote " not in md


def test_run_all_total_budget_caps_the_last_stages(stand_ins, tmp_path):
    out = tmp_path / "out"
    assert stand_ins.main(["--quick", "--only", "good", "slow", "--total-budget", "2", "--out", str(out)]) == 1
    stages = {s["name"]: s for s in json.loads((out / "summary.json").read_text())["stages"]}
    assert stages["good"]["status"] == "ok"
    assert stages["slow"]["status"] == "failed" and stages["slow"]["budget_s"] < 2


def test_run_all_names_a_missing_cuda(tmp_path, monkeypatch, capsys):
    run_all = _run_all_module()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_:
        run_all.main(["--quick", "--device", "cuda", "--out", str(tmp_path)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1
    assert "error: --device cuda: CUDA is not available on this machine" in lines[0]
    assert not (tmp_path / "summary.json").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_run_all_quick_on_cuda(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--device", "cuda", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["machine"]["device_name"] == torch.cuda.get_device_name(0)
    assert all(s["status"] in ("ok", "missing") for s in summary["stages"])
