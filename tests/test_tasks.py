"""tasks.py, the quick start's two commands: the arguments it hands to pytest."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tasks():
    spec = importlib.util.spec_from_file_location("tasks", ROOT / "tasks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("cpus, expected", [(2, ["-n", "2", "-k", "x"]), (3, ["-n", "3", "-k", "x"]),
                                            (16, ["-n", "4", "-k", "x"]), (1, ["-k", "x"]), (None, ["-k", "x"])])
def test_one_worker_per_core_up_to_four(tasks, cpus, expected, monkeypatch):
    if cpus is None:  # os.cpu_count() may not know
        monkeypatch.setattr(tasks.os, "cpu_count", lambda: None)
    assert tasks.pytest_args(["-k", "x"], cpus) == expected


def test_the_core_count_is_the_machines_by_default(tasks, monkeypatch):
    monkeypatch.setattr(tasks.os, "cpu_count", lambda: 3)
    assert tasks.pytest_args([]) == ["-n", "3"]


@pytest.mark.parametrize("rest", [["-n", "0"], ["-n0"], ["-nauto"], ["--numprocesses=1"], ["--dist", "loadfile"],
                                  ["-p", "no:xdist"], ["-pno:xdist"]])
def test_a_worker_count_or_xdist_off_in_the_arguments_is_left_alone(tasks, rest):
    assert tasks.pytest_args(rest, 8) == rest
