"""The quick demo runs end to end and its report has every field."""

from __future__ import annotations

import json
import math

from examples.get_distillation import demo


def test_quick_demo_writes_a_complete_report(tmp_path):
    out = tmp_path / "demo"
    report = demo.run(demo.DemoConfig.quick(str(out)), progress=False)
    assert (out / "report.md").exists() and (out / "report.json").exists()
    data = json.loads((out / "report.json").read_text())
    assert data["teacher_nfe"] == 7  # 4 Heun steps in the quick config
    for key in ("fd_digits", "fd_floor", "class_accuracy", "n"):
        assert key in data["teacher"]["quality"]
    assert data["teacher"]["images_per_second"] > 0
    models = [row["model"] for row in data["students"]]
    assert models == ["GET-Tiny/4", "ViT-Tiny/4"]
    for row in data["students"]:
        for key in ("params", "quality", "teacher_match", "images_per_second", "speedup_vs_teacher",
                    "fd_ratio_to_teacher"):
            assert key in row, key
        assert math.isfinite(row["teacher_match"]["psnr"]) and row["params"] > 0
        assert 0 <= row["quality"]["class_accuracy"] <= 1
        assert row["fd_ratio_to_teacher"] == row["quality"]["fd_digits"] / data["teacher"]["quality"]["fd_digits"]
    sweep = data["students"][0]["nfe_sweep"]
    assert sweep["nfe"] == [1, 2, 3]
    for solver in ("FixedPoint", "Anderson(m=5)"):
        assert len(sweep[solver]["psnr"]) == 3 and len(sweep[solver]["fd_digits"]) == 3
    assert set(data["stage_seconds"]) == {"teacher", "pairs", "GET-Tiny/4", "ViT-Tiny/4", "evaluation"}
    for name in data["plots"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / "report.md").read_text()
    assert "GET-Tiny/4" in text and "ViT-Tiny/4" in text and "teacher (Heun)" in text
    # a rerun reuses every finished stage and reproduces the report's numbers
    again = demo.run(demo.DemoConfig.quick(str(out)), progress=False)
    assert again["students"][0]["teacher_match"] == report["students"][0]["teacher_match"]

    # two runs of one preset get their own rows, sample grids and sweep plots
    import shutil

    from examples.get_distillation import evaluate

    shutil.copytree(out / "GET-Tiny_4", out / "get-copy")
    ecfg = evaluate.EvalConfig(run=str(out / "GET-Tiny_4"), baselines=[str(out / "get-copy")],
                               teacher=str(out / "teacher" / "checkpoint.pt"), heldout=str(out / "pairs-heldout"),
                               out=str(tmp_path / "eval"), num_samples=300, heun_steps=4, nfe_max=2,
                               sweep_samples=300, cache=str(out / "cache"))
    both = evaluate.evaluate(ecfg, progress=False)
    assert [row["label"] for row in both["students"]] == ["GET-Tiny/4 (GET-Tiny_4)", "GET-Tiny/4 (get-copy)"]
    assert both["students"][0]["teacher_match"] == both["students"][1]["teacher_match"]
    text = (tmp_path / "eval" / "report.md").read_text()
    for slug in ("GET-Tiny_4__GET-Tiny_4", "GET-Tiny_4__get-copy"):
        assert (tmp_path / "eval" / f"samples_{slug}.png").exists() and f"nfe_sweep_{slug}.png" in text
        assert (tmp_path / "eval" / f"nfe_sweep_{slug}.png").exists()


def test_a_failed_side_by_side_run_is_named(tmp_path, tiny_pairs):
    """The second student trains in a child process; its failure stops the demo with its name."""
    import dataclasses

    import pytest
    import torch

    from examples.get_distillation import train

    pair_dir = tiny_pairs(tmp_path, 32, heun_steps=2)
    first = train.TrainConfig(pairs=str(pair_dir), out=str(tmp_path / "a"), model="GET-Tiny/4", batch=16,
                              steps=2, sample_every=100, ckpt_every=100)
    second = dataclasses.replace(first, pairs=str(tmp_path / "missing"), out=str(tmp_path / "b"), model="ViT-Tiny/4")
    threads = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="training ViT-Tiny/4 in its own process failed"):
        demo._train_side_by_side(first, second, progress=False)
    assert (tmp_path / "a" / "checkpoint.pt").exists() and torch.get_num_threads() == threads
    with pytest.raises(FileNotFoundError):  # the first run fails: the child is stopped, the error is the first's
        demo._train_side_by_side(dataclasses.replace(first, pairs=str(tmp_path / "missing")),
                                 dataclasses.replace(second, pairs=first.pairs), progress=False)
    assert torch.get_num_threads() == threads


def test_quick_and_full_demos_default_to_separate_folders(capsys):
    import argparse

    for quick, folder in ((True, "runs/demo-quick"), (False, "runs/demo")):
        parser = argparse.ArgumentParser()
        demo.add_arguments(parser)
        args = parser.parse_args(["--dry-run"] + (["--quick"] if quick else []))
        assert demo.main(args) == 0
        assert json.loads(capsys.readouterr().out)["out"] == folder
