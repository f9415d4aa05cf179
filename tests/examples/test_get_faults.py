"""Fault injection: kill -9 `pairs` and `train` at random points, rerun, and get what an
uninterrupted run gives: byte-identical pair files, a bit-exact resumed student."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from examples.get_distillation import checkpoints

ROOT = Path(__file__).resolve().parents[2]
SEEDS = (0, 1, 2)

# Runs a subcommand; with a delay >= 0, a timer thread SIGKILLs the process that many seconds
# after the imports, wherever it is (computing, writing a temporary file, renaming, locking).
DRIVER = """
import os, signal, sys, threading, time
import examples.get_distillation.pairs, examples.get_distillation.train
from examples.get_distillation.__main__ import main
delay = float(sys.argv[1])
if delay >= 0:
    threading.Timer(delay, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
t = time.perf_counter()
code = main(sys.argv[2:])
print(f"WORK_SECONDS {time.perf_counter() - t}", flush=True)
sys.exit(code)
"""


def _run(delay: float, *argv: str) -> tuple[int, float]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(delay), *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    seconds = [float(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("WORK_SECONDS")]
    if proc.returncode not in (0, -9):
        raise AssertionError(proc.stderr[-3000:])
    return proc.returncode, seconds[0] if seconds else float("nan")


def _pair_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name.startswith(("shard_", "manifest"))}


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory, tiny_pairs):
    root = tmp_path_factory.mktemp("faults")
    tiny_pairs(root, 32)
    return root / "teacher" / "checkpoint.pt", root / "pairs"


def test_pairs_killed_at_random_points_resume_to_byte_identical_data(teacher_ckpt, tmp_path):
    ckpt, _ = teacher_ckpt
    args = ["pairs", "--teacher", str(ckpt), "--num-pairs", "24", "--shard-size", "4", "--batch", "2",
            "--steps", "4", "--threads", "1"]
    code, work = _run(-1, *args, "--out", str(tmp_path / "straight"))
    assert code == 0
    expected = _pair_files(tmp_path / "straight")
    killed_mid_run = 0
    for seed in SEEDS:
        out = tmp_path / f"killed-{seed}"
        delay = random.Random(seed).uniform(0.05, 0.95) * work
        code, _ = _run(delay, *args, "--out", str(out))
        if code == -9 and not (out / "manifest.json").exists():
            killed_mid_run += 1
        assert _run(-1, *args, "--out", str(out))[0] == 0
        assert _pair_files(out) == expected, f"seed {seed}, killed after {delay:.3f} s"
        assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporaries, no lock
    assert killed_mid_run >= 1, "no kill landed inside the run: the test checked nothing"


def _state(run: Path) -> dict:
    return checkpoints.load_checkpoint(run / "checkpoint.pt")


def test_train_killed_at_random_points_resumes_bit_exactly(teacher_ckpt, tmp_path):
    _, pair_dir = teacher_ckpt
    args = ["train", "--pairs", str(pair_dir), "--model", "GET-Tiny/2", "--batch", "8", "--steps", "24",
            "--ckpt-every", "3", "--log-every", "1", "--sample-every", "4", "--lr", "1e-3", "--threads", "1"]
    code, work = _run(-1, *args, "--out", str(tmp_path / "straight"))
    assert code == 0
    straight = _state(tmp_path / "straight")
    losses = [json.loads(line)["loss"] for line in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()]
    killed_mid_run = 0
    for seed in SEEDS:
        out = tmp_path / f"killed-{seed}"
        # the first ~40% of the time goes to loading the pairs and building the student
        delay = random.Random(100 + seed).uniform(0.4, 0.97) * work
        code, _ = _run(delay, *args, "--out", str(out))
        if code == -9:
            killed_mid_run += (out / "log.jsonl").exists()
        assert _run(-1, *args, "--out", str(out))[0] == 0
        state = _state(out)
        assert state["step"] == 24
        for part in ("model", "ema"):
            for key, value in straight[part].items():
                assert torch.equal(value, state[part][key]), (seed, part, key)
        resumed = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]
        assert resumed == losses, f"seed {seed}, killed after {delay:.3f} s"
        assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert killed_mid_run >= 1, "no kill landed inside the run: the test checked nothing"
