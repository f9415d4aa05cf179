"""Smoke tests of benchmarks/stability.py: the three training arms over the seeds, their logs,
the solver comparison, the targets, the figures, and bad options refused. The targets are the
benchmark's to report; no figure is checked against them here."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import deqkit

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "stability.py"

sys.path.insert(0, str(ROOT / "benchmarks"))
try:
    import stability
finally:
    sys.path.remove(str(ROOT / "benchmarks"))

HAS_FALLBACK = hasattr(deqkit, "Fallback")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("stability") / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc, json.loads((out / "results.json").read_text())


def test_every_arm_and_seed_is_trained_and_logged(quick_run):
    out, _, data = quick_run
    setup = stability.SETUPS[True]
    assert data["setup"]["steps"] == setup.steps and data["seeds"] == 2 and data["quick"]
    assert [(r["arm"], r["seed"]) for r in data["runs"]] == [(a, s) for s in range(2) for a in stability.ARMS]
    for run in data["runs"]:
        assert len(run["nfev"]) == len(run["jacobian_weight"]) == setup.steps
        records = deqkit.read_records(out / "logs" / f"{run['arm']}-seed{run['seed']}.jsonl")
        assert [r.nfev for r in records] == run["nfev"]
        assert [r.scalars["jacobian_weight"] for r in records] == run["jacobian_weight"]
        assert all(r.backward_passes == 1 for r in records)  # the Implicit backward ran before each record
        assert run["failed_samples"] == sum(r.failed for r in records)
        escaped = [r.escaped for r in records]
        assert run["escaped_samples"] == (None if None in escaped else sum(escaped))
        cosine = [setup.lr * 0.5 * (1 + math.cos(math.pi * k / setup.steps)) for k in range(setup.steps)]
        assert [r.scalars["lr"] for r in records] == pytest.approx(cosine)
        for message in run["monitor_warnings"]:  # the monitor's own, nothing else
            assert message.startswith(("deqkit: NFE per step rose", "deqkit: the converged fraction fell"))
        assert run["penalty_steps"] == sum(w > 0 for w in run["jacobian_weight"])
        w = setup.window
        assert run["nfe_start"] == pytest.approx(sum(run["nfev"][:w]) / w)
        end = max(1, setup.steps // 10)
        assert run["nfe_end"] == pytest.approx(sum(run["nfev"][-end:]) / end)
        assert run["nfe_growth"] == pytest.approx(run["nfe_end"] / run["nfe_start"])
        assert 0 <= run["test_accuracy"] <= 1 and run["train_seconds"] > 0 and run["test_failed"] >= 0
        assert 1 <= run["test_steps"]["median"] <= run["test_steps"]["max"] <= setup.max_steps
        assert 0 < run["spectral_radius"]["median"] <= run["spectral_radius"]["max"]
        assert "model" not in run


def test_the_arms_use_the_penalty_as_they_say(quick_run):
    _, _, data = quick_run
    setup = stability.SETUPS[True]
    for run in data["runs"]:
        weights = set(run["jacobian_weight"])
        if run["arm"] == "none":
            assert weights == {0.0}
        elif run["arm"] == "fixed":
            assert weights == {setup.fixed_weight}
        else:  # 0, or start times a power of factor, capped
            rule = deqkit.AdaptiveJacobianWeight(**setup.adaptive)
            allowed = {0.0, rule.max_weight} | {rule.start * rule.factor ** k for k in range(8)}
            assert weights <= allowed
            assert run["jacobian_weight"][: 2 * setup.window] == [0.0] * 2 * setup.window  # no trend yet
    # the adaptive rule turned the penalty on, and the monitor warned, in some run of the quick setting
    assert any(r["penalty_steps"] > 0 for r in data["runs"] if r["arm"] == "adaptive")
    assert any(r["monitor_warnings"] for r in data["runs"])
    # each seed starts its arms from the same model and batches: same first solve
    for seed in range(2):
        first = {r["arm"]: r["nfev"][0] for r in data["runs"] if r["seed"] == seed}
        assert first["none"] == first["adaptive"]


def test_summary_targets_and_table(quick_run):
    _, proc, data = quick_run
    for arm in stability.ARMS:
        runs = [r for r in data["runs"] if r["arm"] == arm]
        acc = data["summary"][arm]["test_accuracy"]
        values = [r["test_accuracy"] for r in runs]
        assert acc["mean"] == pytest.approx(sum(values) / 2) and (acc["min"], acc["max"]) == (min(values), max(values))
        assert acc["std"] == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2))
    assert set(data["summary"]["none"]) == set(stability.SUMMARY_KEYS)
    radius = [r["spectral_radius"]["max"] for r in data["runs"] if r["arm"] == "fixed"]
    assert data["summary"]["fixed"]["spectral_radius.max"]["max"] == max(radius)
    names = [t["target"] for t in data["targets"]]
    assert len(names) == (6 if HAS_FALLBACK else 4)
    for t in data["targets"]:
        assert isinstance(t["met"], bool)
        assert f"- {t['target']}: " in proc.stdout
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "arm" not in line]
    assert [row.split(" | ")[0][2:] for row in rows] == list(stability.ARMS)
    assert data["machine"]["torch_threads"] == 1 and data["device"] == "cpu"
    assert set(data["load_average_1min"]) == {"before", "after"}


def test_solver_comparison(quick_run):
    _, proc, data = quick_run
    setup = stability.SETUPS[True]
    fallback = data["fallback"]
    batches = 360 // setup.fallback_batch  # the digits' test split
    assert fallback["samples"] == 2 * batches * setup.fallback_batch
    expected = {"Anderson", "Broyden"} | ({stability.CHAIN} if HAS_FALLBACK else set())
    assert set(fallback["finished"]) == set(fallback["nfev"]) == expected
    for name in expected:
        assert 0 <= fallback["finished"][name] <= fallback["samples"]
        assert fallback["nfev"][name] >= 2 * batches
    if HAS_FALLBACK:
        assert data["fallback_note"] is None and "stability_fallback.png" in data["plots"]
    else:
        assert "Fallback is not in this deqkit" in data["fallback_note"] and "note: deqkit.Fallback" in proc.stdout
        assert data["plots"] == ["stability_nfe.png"]


def test_figures_are_pngs(quick_run):
    out, _, data = quick_run
    for name in data["plots"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_nfe_figure_reads_at_a_glance(quick_run):
    import matplotlib.pyplot as plt

    _, _, data = quick_run
    setup = stability.SETUPS[True]
    fig = stability.figure_nfe(data["runs"], setup)
    try:
        ax, aw = fig.axes
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert labels == [f"{arm} (2 seeds: mean, band min-max)" for arm in stability.ARMS] + ["1.2x adaptive's start"]
        none = [r for r in data["runs"] if r["arm"] == "none"]
        mean = [(a + b) / 2 for a, b in zip(*(stability.rolling(r["nfev"], setup.window) for r in none))]
        assert list(ax.lines[0].get_ydata()) == pytest.approx(mean)
        start = sum(r["nfe_start"] for r in data["runs"] if r["arm"] == "adaptive") / 2
        assert ax.lines[-1].get_ydata()[0] == pytest.approx(1.2 * start)
        assert [t.get_text() for t in aw.get_legend().get_texts()] == ["fixed", "adaptive"]
        assert list(aw.lines[0].get_ydata()) == [setup.fixed_weight] * setup.steps
        assert "NFE per step" in ax.get_ylabel() and aw.get_xlabel() == "training step"
    finally:
        plt.close(fig)


def test_fallback_summary_counts_misses_and_easy_batches():
    seed = {
        "Anderson": {"finished": [[True, True], [True, False]], "nfev": [10, 20]},
        "Broyden": {"finished": [[True, True], [False, True]], "nfev": [8, 20]},
        stability.CHAIN: {"finished": [[True, True], [True, False]], "nfev": [10, 30]},
    }
    summary = stability.fallback_summary([seed, seed])
    assert summary["samples"] == 8 and summary["finished"] == {"Anderson": 6, "Broyden": 6, stability.CHAIN: 6}
    assert summary["nfev"] == {"Anderson": 60, "Broyden": 56, stability.CHAIN: 80}
    assert summary["missed_by_fallback"] == 2  # the second batch's second sample, which Broyden finishes
    assert summary["easy_batches"] == 2  # the first batch of each seed
    assert summary["easy_batch_nfev_ratio_max"] == summary["easy_batch_nfev_ratio_mean"] == 10 / 8
    assert summary["easy_batch_nfev_over_anderson_max"] == 1.0
    plain = stability.fallback_summary([{k: v for k, v in seed.items() if k != stability.CHAIN}])
    assert "missed_by_fallback" not in plain and plain["samples"] == 4


def test_targets_are_judged_on_the_seed_means():
    def arm(growth, acc, seconds):
        return {"nfe_growth": {"mean": growth}, "test_accuracy": {"mean": acc}, "train_seconds": {"mean": seconds}}

    summary = {"none": arm(1.3, 0.950, 30.0), "fixed": arm(1.0, 0.94, 20.0), "adaptive": arm(1.2, 0.945, 20.0)}
    assert [t["met"] for t in stability.targets(summary, None)] == [True, True, True, True]
    summary = {"none": arm(1.2, 0.950, 30.0), "fixed": arm(1.0, 0.94, 20.0), "adaptive": arm(1.21, 0.9449, 20.1)}
    assert [t["met"] for t in stability.targets(summary, None)] == [False, False, False, False]
    fallback = {"missed_by_fallback": 0, "easy_batch_nfev_ratio_max": 1.1}
    assert [t["met"] for t in stability.targets(summary, fallback)][-2:] == [True, True]
    fallback = {"missed_by_fallback": 1, "easy_batch_nfev_ratio_max": None}
    assert [t["met"] for t in stability.targets(summary, fallback)][-2:] == [False, False]


def test_rolling_and_spread():
    assert stability.rolling([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert stability.spread([2.0]) == {"mean": 2.0, "std": 0.0, "min": 2.0, "max": 2.0}
    assert stability.spread([1.0, 3.0])["std"] == pytest.approx(math.sqrt(2))


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "0"], "--seeds must be >= 1, got 0"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--steps", "19"], "--steps must be at least 20 (two monitor windows), got 19"),
    (["--quick", "--steps", "5"], "--steps must be at least 6"),
    (["--fixed-weight", "0"], "--fixed-weight must be > 0, got 0.0"),
    (["--max-weight", "-1"], "--max-weight must be > 0, got -1.0"),
    (["--max-weight", "1"], "--max-weight must be >= the adaptive start weight 2, got 1.0"),
    (["--threads", "-1"], "--threads must be >= 0, got -1"),
    (["--device", "nonsense"], "--device 'nonsense': expected cpu, cuda or cuda:N"),
    (["--out", "a_file"], "--out 'a_file' exists and is not a folder"),
])
def test_bad_options_name_the_argument(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        stability.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_options_set_the_setup(tmp_path):
    args = stability.parse_args(["--steps", "40", "--fixed-weight", "3", "--max-weight", "16", "--seeds", "1",
                                 "--out", str(tmp_path)])
    assert (args.setup.steps, args.setup.fixed_weight, args.seeds) == (40, 3.0, 1)
    assert args.setup.adaptive == {**stability.SETUPS[False].adaptive, "max_weight": 16.0}
    assert args.setup.width == stability.SETUPS[False].width and args.device == torch.device("cpu")
    args = stability.parse_args(["--quick"])
    assert args.setup == stability.SETUPS[True] and args.seeds == 2 and args.threads == 1

