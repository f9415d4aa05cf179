"""Smoke tests of benchmarks/trained.py: every map x solver x tolerance measured, the trained
classifiers cached and reused, the GET student map, the figures, and bad options refused."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "trained.py"
SOLVERS = {"deqkit FixedPoint", "deqkit Anderson(m=5)", "deqkit Broyden(memory=20)", "deqkit NewtonKrylov",
           "torchdeq fixed_point_iter", "torchdeq anderson(m=5)", "torchdeq broyden"}
CLASSIFIERS = {"digits_mlp", "mdeq_conv_trained"}

sys.path.insert(0, str(ROOT / "benchmarks"))
try:
    import _trained_maps as maps
    import trained
finally:
    sys.path.remove(str(ROOT / "benchmarks"))


def run_script(out: Path, *extra: str, cwd: Path) -> subprocess.CompletedProcess:
    """The script as a user runs it, importing this checkout's deqkit, in ``cwd`` (so that the
    default GET student path, relative to it, is absent unless the test puts one there)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out), *extra],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def write_student_checkpoint(path: Path) -> None:
    """A GET-Tiny/4 student checkpoint in the train command's format (untrained weights)."""
    sys.path.insert(0, str(ROOT))
    try:
        from examples.get_distillation import common, models, train
    finally:
        sys.path.remove(str(ROOT))
    config = train.TrainConfig(pairs="unused", out="unused", model="GET-Tiny/4")
    model = models.build("GET-Tiny/4", img_size=8, channels=1, num_classes=10)
    common.save_checkpoint(path, {"config": common.config_to_dict(config), "step": 0, "model": model.state_dict(),
                                  "ema": model.state_dict(), "student": {"model": "GET-Tiny/4", "image_shape": [1, 8, 8],
                                                                         "num_classes": 10}})


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("trained")
    student = base / "student.pt"
    write_student_checkpoint(student)
    out = base / "out"
    proc = run_script(out, "--get-student", str(student), cwd=base)
    return out, proc


def test_every_map_solver_and_tolerance_is_measured(quick_run):
    out, proc = quick_run
    data = json.loads((out / "results.json").read_text())
    assert {m["name"] for m in data["maps"]} == CLASSIFIERS | {"get_student"}
    measured = {(r["problem"], r["solver"], r["tol"]) for r in data["results"]}
    expected = {(m, s, t) for m in CLASSIFIERS | {"get_student"} for s in SOLVERS for t in (1e-3, 1e-4)}
    assert measured == expected
    assert len(data["results"]) == len(expected)  # each measured once
    for r in data["results"]:
        if r["converged"]:
            assert r["nfev_to_tol"] >= 1 and r["seconds_to_tol"] > 0
        else:
            assert r["nfev_to_tol"] is None and r["seconds_to_tol"] is None
        if r["error"]:  # a solver that raised (torchdeq's anderson can): recorded, not a crash
            assert r["library"] == "torchdeq" and not r["trace_nfev"], r["error"]
            continue
        assert r["trace_nfev"] and r["trace_nfev"][-1] <= data["max_steps"]
        if r["library"] == "deqkit":  # (torchdeq's broyden can end in NaN once its residual is ~1e-8)
            assert all(math.isfinite(x) for x in r["trace_residual"])
    for m in data["maps"]:
        assert m["f_seconds"] > 0 and math.isfinite(m["spectral_radius"])
        if m["name"] in CLASSIFIERS:
            assert 0 <= m["test_accuracy"] <= 1 and not m["reused"]
    assert data["threads"] == 1 and data["device"] == "cpu"
    assert set(data["load_average_1min"]) == {"before", "after"}
    # the table has a row per map and solver, a pair of columns per tolerance
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "solver" not in line]
    assert len(rows) == 3 * len(SOLVERS)
    assert "NFE to 0.001 | ms to 0.001 | NFE to 0.0001 | ms to 0.0001" in proc.stdout
    for name in data["plots"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data["plots"]) == 3


def test_checkpoints_are_reused_on_rerun(quick_run, tmp_path):
    out, first = quick_run
    checkpoints = {p.name: p.stat().st_mtime_ns for p in (out / "checkpoints").glob("*.pt")}
    assert set(checkpoints) == {f"{name}.pt" for name in CLASSIFIERS}
    assert "digits_mlp: training" in first.stdout
    second = run_script(out, cwd=tmp_path)  # no student here: skipped with a note
    for name in CLASSIFIERS:
        assert f"{name}: reusing the checkpoint" in second.stdout
        assert f"{name}: training" not in second.stdout
    assert {p.name: p.stat().st_mtime_ns for p in (out / "checkpoints").glob("*.pt")} == checkpoints
    assert "get_student skipped" in second.stdout
    data = json.loads((out / "results.json").read_text())
    assert {m["name"] for m in data["maps"]} == CLASSIFIERS
    assert all(m["reused"] for m in data["maps"])


def test_checkpoint_cache_retrains_only_when_it_must(tmp_path):
    spec = dataclasses.replace(maps.QUICK_SPECS["digits_mlp"], steps=2)
    logs: list[str] = []

    def load(spec, retrain=False):
        return maps.trained_classifier("m", spec, tmp_path, torch.device("cpu"), retrain, lambda x, **_: x, logs.append)

    model, record = load(spec)
    path = tmp_path / "m.pt"
    state = torch.load(path, weights_only=True)  # plain data only
    assert state["spec"] == dataclasses.asdict(spec) and not record["reused"]
    stamp = path.stat().st_mtime_ns
    again, record = load(spec)
    assert record["reused"] and path.stat().st_mtime_ns == stamp
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    logs.clear()
    _, record = load(dataclasses.replace(spec, steps=3))
    assert not record["reused"] and "trained with other settings" in logs[0]
    _, record = load(dataclasses.replace(spec, steps=3), retrain=True)
    assert not record["reused"]
    path.write_bytes(b"not a checkpoint")
    logs.clear()
    _, record = load(spec)
    assert not record["reused"] and "cannot read" in logs[0]


def test_figure_reads_at_a_glance(quick_run):
    import matplotlib.pyplot as plt

    out, _ = quick_run
    data = json.loads((out / "results.json").read_text())
    problem = maps.Problem("digits_mlp", "a description", None, None, (), 20)
    fig = trained.figure(data["results"], problem)
    try:
        ax = fig.axes[0]
        assert "digits_mlp" in ax.get_title() and ax.get_xlabel() and ax.get_ylabel()
        entries = {t.get_text() for t in ax.get_legend().get_texts()}
        assert SOLVERS <= entries and {"tolerance 0.001", "tolerance 0.0001"} <= entries
        assert len(ax.lines) == len(SOLVERS) + 2
    finally:
        plt.close(fig)


def test_a_solver_that_raises_is_recorded_not_fatal():
    def run(problem, tol, max_steps, traced=False):
        raise torch.linalg.LinAlgError("torch.linalg.solve: (Batch element 2): singular\nmore")

    problem = maps.Problem("p", "a map", lambda z: z, torch.zeros(2, 3), (), 10)
    r = trained.measure_one(problem, trained.Runner("broken", "torchdeq", run), 1e-3, 1, 1e-4)
    assert r["error"] == "LinAlgError: torch.linalg.solve: (Batch element 2): singular"
    assert r["nfev_to_tol"] is None and not r["converged"] and r["trace_residual"] == []
    assert "| p | broken | error (LinAlgError) | - |" in trained.table([r, {**r, "tol": 1e-4}])


@pytest.mark.parametrize("argv, message", [
    (["--repeats", "0"], "--repeats must be >= 1, got 0"),
    (["--threads", "-1"], "--threads must be >= 0, got -1"),
    (["--device", "nonsense"], "--device nonsense is not usable here"),
    (["--get-student", "no/such/checkpoint.pt"], "--get-student: no checkpoint file at 'no/such/checkpoint.pt'"),
])
def test_bad_options_name_the_argument(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        trained.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_unavailable_cuda_is_refused(capsys):
    with pytest.raises(SystemExit):
        trained.parse_args(["--device", "cuda"])
    assert "--device cuda is not usable here" in capsys.readouterr().err


def test_out_must_be_a_folder(tmp_path, capsys):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    with pytest.raises(SystemExit):
        trained.parse_args(["--out", str(not_a_folder)])
    assert "exists and is not a folder" in capsys.readouterr().err
