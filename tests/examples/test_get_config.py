"""The typed configuration layer: every field of every subcommand, from the command line and
from --config alike, is checked (type, bounds) before any work, with one line naming it."""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import pytest

from examples.get_distillation import cli, config, demo, evaluate, nfe_study, pairs, scaling, study, teacher, train
from examples.get_distillation.__main__ import main as run_cli

# subcommand -> (config class, required settings: never read, since a bad field stops the run first)
COMMANDS = {
    "train": (train.TrainConfig, {"pairs": "p", "out": "OUT"}),
    "teacher": (teacher.TeacherConfig, {"out": "OUT"}),
    "pairs": (pairs.PairsConfig, {"teacher": "t.pt", "out": "OUT"}),
    "evaluate": (evaluate.EvalConfig, {"run": "r", "teacher": "t.pt", "heldout": "h", "out": "OUT"}),
    "study": (study.StudyConfig, {"pairs": "p", "heldout": "h", "teacher": "t.pt", "out": "OUT"}),
    "nfe-study": (nfe_study.NfeStudyConfig, {"heldout": "h", "out": "OUT", "runs": ["r"]}),
    "scaling": (scaling.ScalingConfig, {"out": "OUT", "studies": ["s"]}),
    "demo": (demo.DemoConfig, {"out": "OUT"}),
}


def _bad_values(cls: type) -> list[tuple[str, object, str]]:
    """(field, bad value, what kind of bad) for every field: a wrong type, a string for a
    boolean, a value out of range."""
    hints = typing.get_type_hints(cls)
    cases = []
    for field in dataclasses.fields(cls):
        kind = cli._base_type(hints[field.name])
        meta = field.metadata
        if kind is bool:
            cases += [(field.name, "false", "a string for a boolean"), (field.name, 1, "a wrong type")]
        elif kind is int:
            cases += [(field.name, "3", "a wrong type"), (field.name, 1.5, "a wrong type"),
                      (field.name, True, "a boolean for a number")]
        elif kind is float:
            cases += [(field.name, "0.01", "a wrong type"), (field.name, True, "a boolean for a number")]
        elif kind is str:
            cases.append((field.name, 5, "a wrong type"))
        elif kind is list:
            cases.append((field.name, "abc", "a string for a list"))
        elif kind is dict:
            cases.append((field.name, "m=5", "a string for an object"))
        if "ge" in meta or "gt" in meta:
            low = meta.get("ge", meta.get("gt"))
            cases.append((field.name, (low - 1 if "ge" in meta else low) if kind is int else low - 1.0,
                          "below its range"))
        if "le" in meta or "lt" in meta:
            high = meta.get("le", meta.get("lt"))
            cases.append((field.name, (high + 1 if "le" in meta else high) if kind is int else high * 10.0 + 1,
                          "above its range"))
    return cases


CASES = [(sub, name, value, why) for sub, (cls, _) in COMMANDS.items() for name, value, why in _bad_values(cls)]


def test_the_fuzz_table_covers_every_field_and_every_bound():
    for sub, (cls, _) in COMMANDS.items():
        names = {name for s, name, _, _ in CASES if s == sub}
        assert names == {f.name for f in dataclasses.fields(cls)}, sub
    assert sum(why == "above its range" for *_, why in CASES) >= 60


@pytest.mark.parametrize("sub, name, value, why", CASES, ids=[f"{c[0]}-{c[1]}-{c[3]}" for c in CASES])
def test_a_bad_setting_in_a_config_file_is_one_line_naming_it_before_any_work(sub, name, value, why, tmp_path, capsys):
    cls, required = COMMANDS[sub]
    out = tmp_path / "out"
    settings = {k: (str(out) if v == "OUT" else v) for k, v in required.items()}
    settings[name] = value
    (tmp_path / "c.json").write_text(json.dumps(settings))
    assert run_cli([sub, "--config", str(tmp_path / "c.json")]) == 1  # a real run, not --dry-run: nothing starts
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {sub}: --config "), err
    flag = cli.flag_of(next(f for f in dataclasses.fields(cls) if f.name == name))
    assert f"{name} ({flag})" in err, err
    assert not out.exists()


def test_the_command_line_is_checked_alike(tmp_path, capsys):
    out = tmp_path / "out"
    for argv, needle in ((["train", "--pairs", "p", "--out", str(out), "--batch", "0"], "batch (--batch): input should"),
                         (["train", "--pairs", "p", "--out", str(out), "--seed", str(2**70)], "seed (--seed)"),
                         (["pairs", "--teacher", "t", "--out", str(out), "--num-pairs", str(10**12)],
                          "num (--num-pairs): input should be less than or equal to 1000000000"),
                         (["pairs", "--teacher", "t", "--out", str(out), "--sigma-max", "1e308"], "sigma_max (--sigma-max)"),
                         (["teacher", "--out", str(out), "--lr", "nan"], "lr (--lr): input should be a finite number"),
                         (["train", "--pairs", "p", "--out", str(out), "--seed", "abc"], "argument --seed: invalid int")):
        try:
            code = run_cli(argv)
        except SystemExit as exc:  # argparse's own type check: exit status 2
            code = exc.code
        assert code in (1, 2)
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, err
    assert not out.exists()


@pytest.mark.parametrize("threads", ["0", "100000"])
def test_threads_are_bounded_by_the_usable_cpus_before_any_work(threads, tmp_path, capsys):
    assert run_cli(["teacher", "--out", str(tmp_path / "t"), "--threads", threads, "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert "--threads must be an integer from 1 to" in err and err.count("\n") == 1
    assert not (tmp_path / "t").exists()


def test_trust_pickle_false_as_a_string_is_refused(tmp_path, capsys):
    (tmp_path / "c.json").write_text(json.dumps({"teacher": "t.pkl", "trust_pickle": "false"}))
    assert run_cli(["pairs", "--config", str(tmp_path / "c.json"), "--out", str(tmp_path / "p")]) == 1
    assert "trust_pickle (--trust-pickle): expected true or false, got 'false'" in capsys.readouterr().err


def test_saved_configs_still_load_with_settings_added_since(tmp_path):
    values = config.to_dict(train.TrainConfig(pairs="p", out="o", lr=3e-4))
    del values["grad_clip"]
    assert config.from_dict(train.TrainConfig, values).grad_clip is None
    values["lr"] = 1  # JSON has one kind of number: an integer is a valid float
    assert config.from_dict(train.TrainConfig, values).lr == 1.0
    with pytest.raises(config.ConfigError, match=r"'x.json': unknown settings \['colour'\] for TrainConfig"):
        config.from_dict(train.TrainConfig, {**values, "colour": "red"}, "'x.json'")


@pytest.mark.parametrize("argv, needle", [
    (["--solver", "anderson", "--solver-arg", "mm=5"], "solver_args (--solver-arg): solver anderson does not take mm=5"),
    (["--solver-arg", "m=5"], "solver_args (--solver-arg): solver fixed_point does not take m=5"),
    (["--solver", "newton_krylov"], "--solver/--backward: backward=Unrolled() cannot differentiate through NewtonKrylov"),
])
def test_dry_run_checks_the_solver_and_its_arguments(argv, needle, tmp_path, capsys):
    assert run_cli(["train", "--pairs", "p", "--out", str(tmp_path / "o"), "--model", "GET-Tiny/4", *argv,
                    "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err


def test_dry_run_checks_the_files_a_run_reads(tmp_path, capsys):
    assert run_cli(["train", "--pairs", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"), "--dry-run"]) == 1
    assert "no pair manifest" in capsys.readouterr().err
    assert run_cli(["pairs", "--teacher", str(tmp_path / "t.pt"), "--out", str(tmp_path / "o"), "--dry-run"]) == 1
    assert "--teacher: no file at" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_help_shows_the_bounds(capsys):
    with pytest.raises(SystemExit):
        run_cli(["pairs", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert ">= 1, <= 1e+09 (default: 10000)" in text and "> 0, <= 10000 (default: 80.0)" in text


def test_configs_are_checked_wherever_they_are_built():
    with pytest.raises(config.ConfigError, match=r"^TrainConfig: batch \(--batch\): expected an integer, got True$"):
        train.TrainConfig(pairs="p", out="o", batch=True)
    run = train.TrainConfig(pairs="p", out="o")
    with pytest.raises(config.ConfigError, match="steps"):
        run.steps = 0  # assignment too
    with pytest.raises(config.ConfigError, match="cond"):
        config.replace(teacher.TeacherConfig(), cond="no")
    assert Path(run.pairs) == Path("p")
