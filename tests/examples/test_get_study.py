"""The study subcommand: the student stage over seeds, its aggregation (by hand) and end to end."""

from __future__ import annotations

import json
import math
import os

import pytest

from examples.get_distillation import checkpoints, fileio, pairs, study, teacher, train

from examples.get_distillation import config as cfg
from examples.get_distillation.__main__ import main as run_cli


def _report(fd: float, psnr: float, sweep: list[float], teacher_fd: float = 1.0, extra: dict | None = None) -> dict:
    row = {"run": "r", "model": "GET-Tiny/4", "label": "GET-Tiny/4", "params": 100, "backward": "unrolled",
           "quality": {"fd_digits": fd, "n": 10, "floor_kind": "held-out"}, "teacher_match": {"psnr": psnr, "n": 8},
           "nfe_sweep": {"nfe": [1, 2], "FixedPoint": {"psnr": sweep, "fd_digits": None}, "fd_samples": 5}}
    row.update(extra or {})
    return {"config": {"seed": 0}, "image_shape": [1, 8, 8], "teacher": {"quality": {"fd_digits": teacher_fd}},
            "students": [row]}


def test_figures_of_a_report_are_its_measurements_by_path():
    figures = study.figures_of(_report(2.0, 20.0, [18.0, 19.0]))
    assert figures == {"teacher": {"quality/fd_digits": 1.0},
                       "GET-Tiny/4": {"params": 100.0, "quality/fd_digits": 2.0, "teacher_match/psnr": 20.0,
                                      "nfe_sweep/FixedPoint/psnr/nfe=1": 18.0, "nfe_sweep/FixedPoint/psnr/nfe=2": 19.0}}


def test_aggregate_by_hand():
    reports = [_report(2.0, 20.0, [18.0, 19.0]), _report(4.0, 21.0, [18.0, 19.5]),
               _report(9.0, 22.5, [18.0, 20.5], extra={"train_seconds": 3.0})]
    figures, missing = study.aggregate(reports)
    fd = figures["GET-Tiny/4"]["quality/fd_digits"]
    # mean (2 + 4 + 9) / 3 = 5; sample std sqrt((9 + 1 + 16) / 2) = sqrt(13)
    assert fd["mean"] == 5.0 and fd["std"] == pytest.approx(math.sqrt(13)) and (fd["min"], fd["max"]) == (2.0, 9.0)
    assert fd["values"] == [2.0, 4.0, 9.0]
    psnr = figures["GET-Tiny/4"]["teacher_match/psnr"]
    # mean 63.5 / 3; deviations -1.1667, -0.1667, 1.3333: squares sum 3.1667, / 2 -> std 1.2583
    assert psnr["mean"] == pytest.approx(21.166667) and psnr["std"] == pytest.approx(1.258306, abs=1e-6)
    nfe1 = figures["GET-Tiny/4"]["nfe_sweep/FixedPoint/psnr/nfe=1"]
    assert nfe1["std"] == 0.0 and nfe1["mean"] == 18.0
    assert figures["teacher"]["quality/fd_digits"]["std"] == 0.0
    assert missing == ["GET-Tiny/4: train_seconds"] and "train_seconds" not in figures["GET-Tiny/4"]


def test_figures_of_leaves_out_flags_and_names_list_items_without_nfe_by_index():
    report = _report(2.0, 20.0, [18.0, 19.0, 19.5], extra={"label": "GET-Tiny/4 (run-a)", "grad_finite": True,
                                                           "losses": [0.5, 0.25], "note": None})
    del report["teacher"]
    figures = study.figures_of(report)
    assert list(figures) == ["GET-Tiny/4 (run-a)"]  # the label, not the model; no teacher in the report
    row = figures["GET-Tiny/4 (run-a)"]
    assert "grad_finite" not in row and "note" not in row  # a flag and a null are not figures
    assert row["losses/0"] == 0.5 and row["losses/1"] == 0.25  # a list with no nfe beside it: by index
    # a sweep longer than its nfe list: the points past it are named by index
    assert row["nfe_sweep/FixedPoint/psnr/nfe=2"] == 19.0 and row["nfe_sweep/FixedPoint/psnr/2"] == 19.5
    assert study.figures_of({"teacher": {"quality": {"fd_digits": 1.5}}}) == {"teacher": {"quality/fd_digits": 1.5}}
    del report["students"][0]["label"]  # a report from before labels: the model names the row
    assert list(study.figures_of(report)) == ["GET-Tiny/4"]


def test_train_seconds_is_the_last_logged_and_none_without_a_log(tmp_path):
    assert study._train_seconds(tmp_path) is None  # no log.jsonl
    (tmp_path / "log.jsonl").write_text("")
    assert study._train_seconds(tmp_path) is None  # killed before its first record
    (tmp_path / "log.jsonl").write_text('{"step": 1, "seconds": 2.5}\n\n{"step": 2, "seconds": 4.0}\n')
    assert study._train_seconds(tmp_path) == 4.0


def test_a_student_missing_from_one_seed_is_named_not_aggregated():
    one, other = _report(2.0, 20.0, [18.0, 19.0]), _report(3.0, 21.0, [18.0, 19.0])
    other["students"] = []
    figures, missing = study.aggregate([one, other])
    assert list(figures) == ["teacher"] and "GET-Tiny/4: quality/fd_digits" in missing
    assert len(missing) == 5  # params, FD-digits, PSNR and the two sweep points


def test_spread_of_one_value_and_of_a_nan():
    assert study.spread([3.0]) == {"mean": 3.0, "std": 0.0, "min": 3.0, "max": 3.0, "values": [3.0]}
    nan = study.spread([1.0, float("nan")])
    assert set(nan) == {"mean", "std", "min", "max", "values"} and nan["values"][0] == 1.0
    assert all(math.isnan(nan[k]) for k in ("mean", "std", "min", "max"))
    with pytest.raises(ValueError, match="^spread of no values$"):
        study.spread([])
    with pytest.raises(ValueError, match="^aggregate needs at least one report$"):
        study.aggregate([])


@pytest.mark.parametrize("kw, message", [
    (dict(seeds=0), r"seeds \(--seeds\): input should be greater than or equal to 1, got 0"),
    (dict(first_seed=-1), r"first_seed \(--first-seed\): input should be greater than or equal to 0, got -1"),
    (dict(steps=0), r"steps \(--steps\): input should be greater than or equal to 1, got 0"),
    (dict(nfe_max=0), r"nfe_max \(--nfe-max\): input should be greater than or equal to 1, got 0"),
    (dict(students=["nowhere/config.json"]), "--student 'nowhere/config.json': no such train config file"),
])
def test_bad_study_settings_are_named(kw, message):
    with pytest.raises(ValueError, match=message):
        study.StudyConfig(pairs="p", heldout="h", teacher="t", out="o", **kw)


def test_the_default_students_are_the_demos():
    names = [c.model for c in study.demo_students()]
    assert names == ["GET-Tiny/4", "ViT-Tiny/4"]
    config = study.StudyConfig(pairs="p", heldout="h", teacher="t", out="o")
    assert [n for n, _ in study.student_configs(config)] == ["GET-Tiny_4", "ViT-Tiny_4"]


def test_study_end_to_end_on_tiny_pairs(tmp_path, tiny_pairs, capsys):
    pair_dir = tiny_pairs(tmp_path, 32)
    ckpt = tmp_path / "teacher" / "checkpoint.pt"
    denoiser, info = teacher.load_teacher(ckpt)
    pairs.generate_pairs(denoiser, tmp_path / "heldout", 8, 8, 8, image_shape=(1, 8, 8), num_classes=info["num_classes"],
                         seed_offset=1000, num_steps=4, teacher_hash=fileio.sha256_file(ckpt), progress=False)
    # two students from train config files: GET with the equilibrium options, and a ViT
    for name, kw in (("get-eq", dict(model="GET-Tiny/4", output_norm=True, jac_reg=0.5)), ("vit", dict(model="ViT-Tiny/4"))):
        (tmp_path / name).mkdir()
        cfg.save(tmp_path / name / "config.json",
                           train.TrainConfig(pairs="x", out="x", batch=8, lr=1e-3, steps=50, ema_decay=0.5, **kw))
    argv = ["study", "--pairs", str(pair_dir), "--heldout", str(tmp_path / "heldout"), "--teacher", str(ckpt),
            "--out", str(tmp_path / "study"), "--seeds", "2", "--first-seed", "4", "--steps", "2",
            "--student", str(tmp_path / "get-eq" / "config.json"), "--student", str(tmp_path / "vit" / "config.json"),
            "--num-samples", "8", "--batch", "8", "--heun-steps", "2", "--nfe-max", "2", "--sweep-samples", "8",
            "--speed-repeats", "1"]
    assert run_cli(argv) == 0
    out = tmp_path / "study"
    result = json.loads((out / "study.json").read_text())
    assert result["seeds"] == [4, 5] and [s["settings"]["steps"] for s in result["students"]] == [2, 2]
    for seed in (4, 5):  # each seed's runs, trained with that seed and the study's steps
        config = json.loads((out / f"seed-{seed}" / "get-eq" / "config.json").read_text())
        assert config["seed"] == seed and config["steps"] == 2 and config["output_norm"] is True
        assert (out / f"seed-{seed}" / "eval" / "report.json").exists()
    get = result["figures"]["GET-Tiny/4"]
    for key in ("teacher_match/psnr", "quality/fd_digits", "quality/class_accuracy", "images_per_second",
                "nfe_sweep/FixedPoint/psnr/nfe=2", "train_seconds"):
        v = get[key]
        assert len(v["values"]) == 2 and v["min"] <= v["mean"] <= v["max"], key
    psnr = get["teacher_match/psnr"]["values"]
    assert psnr[0] != psnr[1]  # the seeds train different students
    assert "ViT-Tiny/4" in result["figures"] and "teacher" in result["figures"]
    text = (out / "study.md").read_text()
    assert "## GET-Tiny/4" in text and "| teacher_match/psnr |" in text and (out / "study.png").exists()
    # a rerun reuses the finished runs and evaluations: the report's key is that of the run
    report = out / "seed-4" / "eval" / "report.json"
    before = report.read_bytes()
    ckpt = out / "seed-4" / "get-eq" / "checkpoint.pt"
    os.utime(ckpt, (ckpt.stat().st_atime + 100, ckpt.stat().st_mtime + 100))  # newer than the report: no matter
    assert run_cli(argv) == 0
    assert report.read_bytes() == before
    # the GET's MACs count its trained iterations; the scaling table reads the study as it is
    from examples.get_distillation import models

    assert get["macs"]["values"] == [float(models.macs(models.build("GET-Tiny/4", img_size=8, channels=1)))] * 2
    assert run_cli(["scaling", "--study", str(out), "--out", str(tmp_path / "scaling")]) == 0
    table = json.loads((tmp_path / "scaling" / "scaling.json").read_text())
    assert [(r["model"], r["family"], len(r["seeds"])) for r in table["rows"]] == [("GET-Tiny/4", "GET", 2),
                                                                                  ("ViT-Tiny/4", "ViT", 2)]
    assert table["rows"][0]["fd"]["values"] == get["quality/fd_digits"]["values"]
    # a checkpoint whose content changed is evaluated again, whatever the file times
    state = checkpoints.load_checkpoint(ckpt)
    next(iter(state["ema"].values())).add_(1e-3)
    checkpoints.save_checkpoint(ckpt, state)
    os.utime(ckpt, (0, 0))  # older than the report
    assert run_cli(argv) == 0
    assert json.loads(report.read_text())["key"] != json.loads(before)["key"]
    # other evaluation settings: every seed evaluated again, and the study states what it measured
    argv[argv.index("--num-samples") + 1] = "10"
    assert run_cli(argv) == 0
    result = json.loads((out / "study.json").read_text())
    assert result["config"]["num_samples"] == 10
    assert json.loads(report.read_text())["config"]["num_samples"] == 10
    assert json.loads(report.read_text())["students"][0]["quality"]["n"] == 10
