"""The command-line layer: one dataclass -> options and back, defaults in --help, --config replay."""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Optional

import pytest
import torch

from examples.get_distillation import cli, evaluate, nfe_study, pairs, study, teacher, train
from examples.get_distillation.__main__ import SUBCOMMANDS, build_parser
from examples.get_distillation.__main__ import main as run_cli


def _help(sub: str, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([sub, "--help"])
    assert info.value.code == 0
    return capsys.readouterr().out


def _options(text: str) -> dict[str, str]:
    """option -> its help text, from argparse's help output."""
    blocks: dict[str, str] = {}
    current = None
    for line in text.split("options:", 1)[1].splitlines():
        match = re.match(r"^  (-[-\w]+)", line)
        if match:
            current = match.group(1)
            blocks[current] = line
        elif current:
            blocks[current] += " " + line.strip()
    return {k: " ".join(v.split()) for k, v in blocks.items()}


@pytest.mark.parametrize("sub", list(SUBCOMMANDS))
def test_every_option_of_every_subcommand_shows_its_default_once(sub, capsys):
    options = _options(_help(sub, capsys))
    assert len(options) > 3
    for name, text in options.items():
        if name == "-h":
            continue
        assert re.search(r"\((default: [^)]*|required, unless --config gives it)\)", text), (name, text)
        assert text.count("(default:") <= 1 and "(default: None)" not in text, (name, text)
    assert {"--config", "--dry-run", "--threads"} <= set(options)


def test_help_shows_the_values_users_look_for(capsys):
    text = " ".join(_help("train", capsys).split())
    for expected in ("(default: GET-T/2)", "(default: fixed_point)", "(default: unrolled)", "(default: 800000)",
                     "(default: 128)", "(default: 0.0001)", "(default: all pairs)", "onestep", "GET-Tiny/4"):
        assert expected in text, expected


@dataclasses.dataclass
class Toy:
    name: str = cli.option(help="a required string")
    count: int = cli.option(3, help="an int")
    rate: Optional[float] = cli.option(None, help="an optional float", default_text="off")
    flag: bool = cli.option(True, help="a switch")
    kind: str = cli.option("a", help="a choice", choices=("a", "b"))
    extra: dict = cli.option(help="key=value pairs", flag="--extra-arg", default_factory=dict)
    items: list = cli.option(help="repeatable", flag="--item", default_factory=list)

    def __post_init__(self) -> None:
        if self.count < 0:
            raise ValueError(f"count must be >= 0, got {self.count}")


def _parse(*argv: str) -> Toy:
    import argparse

    parser = argparse.ArgumentParser()
    cli.add_config_arguments(parser, Toy)
    return cli.config_from_args(Toy, parser.parse_args(list(argv)))


def test_a_dataclass_round_trips_through_the_command_line(tmp_path):
    assert _parse("--name", "x") == Toy(name="x")
    got = _parse("--name", "x", "--count", "5", "--rate", "0.5", "--no-flag", "--kind", "b",
                 "--extra-arg", "m=5", "--extra-arg", "tag=hi", "--item", "p", "--item", "q")
    assert got == Toy(name="x", count=5, rate=0.5, flag=False, kind="b", extra={"m": 5, "tag": "hi"}, items=["p", "q"])
    with pytest.raises(ValueError, match="--name required"):
        _parse()
    with pytest.raises(ValueError, match="count must be >= 0, got -1"):
        _parse("--name", "x", "--count", "-1")
    with pytest.raises(SystemExit):
        _parse("--name", "x", "--kind", "c")
    saved = tmp_path / "toy.json"
    saved.write_text(json.dumps({"name": "y", "count": 7, "kind": "b"}))
    assert _parse("--config", str(saved), "--count", "8") == Toy(name="y", count=8, kind="b")  # options win
    saved.write_text(json.dumps({"name": "y", "colour": "red"}))
    with pytest.raises(ValueError, match="unknown settings \\['colour'\\]"):
        _parse("--config", str(saved))


def test_a_run_replays_from_its_config_json(tmp_path, tiny_pairs, capsys):
    pair_dir = tiny_pairs(tmp_path, 32)
    argv = ["train", "--pairs", str(pair_dir), "--out", str(tmp_path / "run"), "--model", "ViT-Tiny/2",
            "--batch", "8", "--steps", "1", "--lr", "3e-4", "--solver-arg", "m=3"]
    assert run_cli(argv) == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    capsys.readouterr()
    assert run_cli(["train", "--config", str(tmp_path / "run" / "config.json"), "--steps", "2", "--dry-run"]) == 0
    replayed = json.loads(capsys.readouterr().out)
    assert replayed == {**saved, "steps": 2} and replayed["solver_args"] == {"m": 3}


@pytest.mark.parametrize("module, cls", [(train, train.TrainConfig), (teacher, teacher.TeacherConfig),
                                         (pairs, pairs.PairsConfig), (evaluate, evaluate.EvalConfig),
                                         (nfe_study, nfe_study.NfeStudyConfig), (study, study.StudyConfig)])
def test_every_config_field_is_an_option(module, cls):
    import argparse

    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    dests = {a.dest for a in parser._actions}
    assert {f.name for f in dataclasses.fields(cls)} <= dests


def test_the_demo_takes_every_size_as_an_option_on_top_of_quick(capsys):
    assert run_cli(["demo", "--quick", "--student-steps", "20", "--sequential", "--dry-run"]) == 0
    config = json.loads(capsys.readouterr().out)
    assert config["student_steps"] == 20 and config["teacher_steps"] == 30 and config["parallel_students"] is False
    assert config["out"] == "runs/demo-quick"
    assert run_cli(["demo", "--teacher-steps", "0", "--dry-run"]) == 1
    assert "teacher_steps (--teacher-steps): input should be greater than or equal to 1, got 0" in capsys.readouterr().err


def test_backward_modes_and_solvers_come_from_tables():
    import deqkit

    config = train.TrainConfig(pairs="p", out="o", backward="phantom", phantom_steps=3, phantom_tau=0.5)
    assert train.make_backward(config) == deqkit.Phantom(steps=3, tau=0.5)
    assert set(train.BACKWARDS) == {"unrolled", "unrolled-checkpoint", "phantom", "implicit", "onestep"}
    with pytest.raises(ValueError, match="backward must be one of"):
        train.TrainConfig(pairs="p", out="o", backward="adjoint")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a build without CUDA")
@pytest.mark.parametrize("sub", ["teacher", "pairs", "train", "evaluate"])
def test_device_cuda_without_cuda_is_one_named_error(sub, tmp_path, capsys):
    (tmp_path / "t.pt").write_bytes(b"")
    argv = {"teacher": ["--out", str(tmp_path / "o")],
            "pairs": ["--teacher", str(tmp_path / "t.pt"), "--out", str(tmp_path / "o")],
            "train": ["--pairs", str(tmp_path / "p"), "--out", str(tmp_path / "o")],
            "evaluate": ["--run", "r", "--teacher", "t", "--heldout", "h", "--out", str(tmp_path / "o")]}[sub]
    assert run_cli([sub, *argv, "--device", "cuda"]) == 1
    err = capsys.readouterr().err
    assert f"error: {sub}: --device 'cuda': this torch build or machine has no CUDA device" in err
    assert "Traceback" not in err and not (tmp_path / "o").exists()


_WAIT_POLICY_PROBE = """
import os, runpy, subprocess, sys
import examples.get_distillation
assert "torch" not in sys.modules, "the package imports torch before __main__ can set the OpenMP variables"
sys.argv = ["get_distillation", "--help"]
try:
    runpy.run_module("examples.get_distillation", run_name="__main__", alter_sys=True)
except SystemExit as exc:
    assert exc.code == 0, exc.code
probe = "import os; print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))"
child = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
print(os.environ.get("OMP_WAIT_POLICY"), os.environ.get("GOMP_SPINCOUNT"), child)
"""


@pytest.mark.parametrize("user, expected", [
    ({}, ["PASSIVE", "3000"]),                              # neither set: both, before torch loads
    ({"OMP_WAIT_POLICY": "ACTIVE"}, ["ACTIVE", "None"]),     # the user's policy alone, no spin count added
    ({"GOMP_SPINCOUNT": "50"}, ["None", "50"]),              # the user's spin count alone
    ({"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0"}, ["PASSIVE", "0"]),
])
def test_the_entry_point_sets_openmp_wait_settings_unless_the_user_set_one(user, expected):
    # before torch loads, so that they take effect; inherited by the processes the demo starts
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(user)
    proc = subprocess.run([sys.executable, "-c", _WAIT_POLICY_PROBE], cwd=Path(__file__).resolve().parents[2], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-4:] == expected + expected
