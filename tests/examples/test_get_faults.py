"""Fault injection: kill -9 `pairs`, `train`, `evaluate` and `study` at chosen points, rerun, and
get what an uninterrupted run gives: byte-identical pair files, a bit-exact resumed student,
the same evaluation and study figures.

The kill points are events, not times: the driver counts the calls that write to disk
(``os.fsync``: a file's data is complete; ``os.replace``: a file takes its final name;
``os.write``: a line appended to ``log.jsonl``) and SIGKILLs the process at the K-th one (at an
append, after writing half of its line: a torn last line). An uninterrupted run counts its
events, so every K lands inside the run, on any machine and under any load.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from examples.get_distillation import checkpoints, metrics, pairs, teacher, train
from examples.get_distillation import config as cfg

ROOT = Path(__file__).resolve().parents[2]

DRIVER = """
import os, signal, sys
import examples.get_distillation.pairs, examples.get_distillation.train
from examples.get_distillation.__main__ import main
kill_at, kinds = int(sys.argv[1]), []
real = {name: getattr(os, name) for name in ("fsync", "replace", "write")}

def event(name):
    def wrapped(*args):
        kinds.append(name[0])
        if len(kinds) == kill_at:
            if name == "write":  # half a line reaches the file: a torn append
                real["write"](args[0], bytes(args[1])[: len(args[1]) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        return real[name](*args)
    return wrapped

for name in real:
    setattr(os, name, event(name))
code = main(sys.argv[2:])
print(f"EVENTS {''.join(kinds)}", flush=True)
sys.exit(code)
"""


def _run(kill_at: int, *argv: str) -> tuple[int, str, str]:
    """(exit code, its events: one letter each, f(sync) r(eplace) w(rite), stderr) of a subcommand
    killed at event ``kill_at`` (1-based; 0: never)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(kill_at), *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    events = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("EVENTS ")]
    if proc.returncode not in (0, -9):
        raise AssertionError(proc.stderr[-3000:])
    return proc.returncode, events[0] if events else "", proc.stderr


def _straight(monkeypatch, *argv: str) -> str:
    """An uninterrupted run in this process (cheaper than a new one), counting its events as
    the driver does; returns them."""
    from examples.get_distillation.__main__ import main

    kinds: list[str] = []
    for name in ("fsync", "replace", "write"):
        def wrapped(*args, _real=getattr(os, name), _kind=name[0]):
            kinds.append(_kind)
            return _real(*args)
        monkeypatch.setattr(os, name, wrapped)
    code = main(list(argv))
    monkeypatch.undo()
    assert code == 0
    return "".join(kinds)


def _kill_points(events: str, seed: int, count: int = 2) -> list[int]:
    """``count`` distinct events of a run (1-based), seeded: the same on every machine."""
    return sorted(random.Random(seed).sample(range(1, len(events) + 1), count))


def _killed_then_resumed(argv: list[str], out: Path, kill_at: int) -> str:
    code, _, _ = _run(kill_at, *argv, "--out", str(out))
    assert code == -9, f"event {kill_at} did not kill the run"
    code, _, err = _run(0, *argv, "--out", str(out))
    assert code == 0, err
    assert not [p.name for p in out.rglob(".tmp-*")]  # no temporaries left
    assert not [p for p in out.rglob(".lock.json")]  # no writer holds a folder
    return err


def _pair_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name.startswith(("shard_", "manifest"))}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_pairs):
    root = tmp_path_factory.mktemp("faults")
    tiny_pairs(root, 32)
    ckpt = root / "teacher" / "checkpoint.pt"
    denoiser, info = teacher.load_teacher(ckpt)
    pairs.generate_pairs(denoiser, root / "heldout", 8, 8, 8, image_shape=(1, 8, 8), num_classes=info["num_classes"],
                         seed_offset=1000, num_steps=4, progress=False)
    run = root / "run"
    train.train(train.TrainConfig(pairs=str(root / "pairs"), out=str(run), model="ViT-Tiny/2", batch=8, steps=2,
                                  sample_every=100), progress=False)
    return root, ckpt, root / "pairs", root / "heldout", run


def test_pairs_killed_at_any_write_resume_to_byte_identical_data(setup, tmp_path, monkeypatch):
    _, ckpt, _, _, _ = setup
    args = ["pairs", "--teacher", str(ckpt), "--num-pairs", "24", "--shard-size", "4", "--batch", "2",
            "--steps", "4", "--threads", "1"]
    events = _straight(monkeypatch, *args, "--out", str(tmp_path / "straight"))
    assert len(events) > 10
    expected = _pair_files(tmp_path / "straight")
    for kill_at in _kill_points(events, seed=0):
        out = tmp_path / f"killed-{kill_at}"
        _killed_then_resumed(args, out, kill_at)
        assert _pair_files(out) == expected, f"killed at event {kill_at} of {len(events)}"


def test_train_killed_at_any_write_resumes_bit_exactly(setup, tmp_path, monkeypatch):
    _, _, pair_dir, _, _ = setup
    args = ["train", "--pairs", str(pair_dir), "--model", "GET-Tiny/2", "--batch", "8", "--steps", "12",
            "--ckpt-every", "3", "--log-every", "1", "--sample-every", "4", "--lr", "1e-3", "--threads", "1"]
    events = _straight(monkeypatch, *args, "--out", str(tmp_path / "straight"))
    straight = checkpoints.load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    losses = [json.loads(line)["loss"] for line in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()]
    appends = [k + 1 for k, kind in enumerate(events) if kind == "w"]  # lines appended to log.jsonl
    assert len(appends) == 12
    for kill_at in _kill_points(events, seed=1, count=1) + [appends[5]]:  # and a torn 6th line of the log
        out = tmp_path / f"killed-{kill_at}"
        err = _killed_then_resumed(args, out, kill_at)
        if kill_at == appends[5]:
            assert f"warning: {out / 'log.jsonl'}: dropped its torn last line 6" in err
        state = checkpoints.load_checkpoint(out / "checkpoint.pt")
        assert state["step"] == 12
        for part in ("model", "ema"):
            for key, value in straight[part].items():
                assert torch.equal(value, state[part][key]), (kill_at, part, key)
        resumed = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]
        assert resumed == losses, f"killed at event {kill_at} of {len(events)}"


def _figures(report: dict) -> list:
    """The report's figures that do not measure time."""
    return [(row["label"], row["quality"], row["teacher_match"], row.get("nfe_sweep")) for row in report["students"]] + [
        report["teacher"]["quality"], report["key"]]


def test_evaluate_killed_at_any_write_gives_the_uninterrupted_report(setup, tmp_path, monkeypatch):
    root, ckpt, _, heldout, run = setup
    args = ["evaluate", "--run", str(run), "--teacher", str(ckpt), "--heldout", str(heldout), "--num-samples", "8",
            "--batch", "8", "--heun-steps", "4", "--nfe-max", "1", "--sweep-samples", "8", "--speed-repeats", "1",
            "--cache", str(root / "cache"), "--threads", "1"]
    metrics.load_digits_classifier(root / "cache")  # cached before: every run writes the same files
    events = _straight(monkeypatch, *args, "--out", str(tmp_path / "straight"))
    expected = _figures(json.loads((tmp_path / "straight" / "report.json").read_text()))
    for kill_at in _kill_points(events, seed=2, count=1):
        out = tmp_path / f"killed-{kill_at}"
        _killed_then_resumed(args, out, kill_at)
        assert _figures(json.loads((out / "report.json").read_text())) == expected, kill_at


def test_study_killed_at_any_write_gives_the_uninterrupted_figures(setup, tmp_path, monkeypatch):
    root, ckpt, pair_dir, heldout, _ = setup
    student = tmp_path / "vit" / "config.json"
    student.parent.mkdir()
    cfg.save(student, train.TrainConfig(pairs="x", out="x", model="ViT-Tiny/2", batch=8, lr=1e-3, steps=3,
                                        ckpt_every=1, log_every=1, sample_every=100))
    args = ["study", "--pairs", str(pair_dir), "--heldout", str(heldout), "--teacher", str(ckpt), "--seeds", "1",
            "--student", str(student), "--num-samples", "8", "--batch", "8", "--heun-steps", "4", "--nfe-max", "1",
            "--sweep-samples", "8", "--speed-repeats", "1", "--threads", "1"]
    events = _straight(monkeypatch, *args, "--out", str(tmp_path / "straight"))

    def figures(out: Path) -> dict:
        result = json.loads((out / "study.json").read_text())
        return {group: {k: v for k, v in figs.items() if "second" not in k and "speedup" not in k}
                for group, figs in result["figures"].items()}

    expected = figures(tmp_path / "straight")
    for kill_at in _kill_points(events, seed=3, count=1):
        out = tmp_path / f"killed-{kill_at}"
        _killed_then_resumed(args, out, kill_at)
        assert figures(out) == expected, f"killed at event {kill_at} of {len(events)}"
