"""The quick demo runs end to end and its report has every field."""

from __future__ import annotations

import dataclasses
import json
import math
import time

import pytest

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
    # at the quick sizes the report says, before anything else, that it is a smoke test
    assert text.splitlines()[2].startswith("> **A smoke test, not results.**")
    assert data["smoke_test"] == demo.smoke_test_note(demo.DemoConfig.quick(str(out)))
    # both students log the loss of their output image, the quantity the loss plot compares; each
    # trained with one thread throughout (no hand-over by default: figures independent of timing)
    for run in ("GET-Tiny_4", "ViT-Tiny_4"):
        records = [json.loads(line) for line in (out / run / "log.jsonl").read_text().splitlines()]
        assert {r["threads"] for r in records} == {1}
        assert all(math.isfinite(r["output_loss"]) for r in records)
        if run.startswith("ViT"):  # one iterate: the objective is the output's loss
            assert all(math.isclose(r["output_loss"], r["loss"], rel_tol=1e-6) for r in records)
    # a rerun reuses every finished stage and reproduces the report's numbers
    again = demo.run(demo.DemoConfig.quick(str(out)), progress=False)
    assert again["students"][0]["teacher_match"] == report["students"][0]["teacher_match"]
    # the GET student ends its map with a LayerNorm (the ViT has no such option)...
    assert json.loads((out / "GET-Tiny_4" / "config.json").read_text())["output_norm"] is True
    assert json.loads((out / "ViT-Tiny_4" / "config.json").read_text())["output_norm"] is False
    # ...and a demo of the other recipe over this folder says how to reuse it, before any training
    stamp = (out / "GET-Tiny_4" / "checkpoint.pt").stat().st_mtime
    with pytest.raises(ValueError, match="trained with output_norm=True .* rerun with --output-norm to reuse it"):
        demo.run(dataclasses.replace(demo.DemoConfig.quick(str(out)), output_norm=False), progress=False)
    assert (out / "GET-Tiny_4" / "checkpoint.pt").stat().st_mtime == stamp

    # two runs of one preset get their own rows, sample grids and sweep plots
    import shutil

    from examples.get_distillation import evaluate

    shutil.copytree(out / "GET-Tiny_4", out / "get-copy")
    ecfg = evaluate.EvalConfig(run=str(out / "GET-Tiny_4"), baselines=[str(out / "get-copy")],
                               teacher=str(out / "teacher" / "checkpoint.pt"), heldout=str(out / "pairs-heldout"),
                               out=str(tmp_path / "eval"), num_samples=300, heun_steps=4, nfe_max=2,
                               sweep_samples=300, cache=str(out / "cache"))
    both = evaluate.evaluate(ecfg)
    assert [row["label"] for row in both["students"]] == ["GET-Tiny/4 (GET-Tiny_4)", "GET-Tiny/4 (get-copy)"]
    assert both["students"][0]["teacher_match"] == both["students"][1]["teacher_match"]
    text = (tmp_path / "eval" / "report.md").read_text()
    for slug in ("GET-Tiny_4__GET-Tiny_4", "GET-Tiny_4__get-copy"):
        assert (tmp_path / "eval" / f"samples_{slug}.png").exists() and f"nfe_sweep_{slug}.png" in text
        assert (tmp_path / "eval" / f"nfe_sweep_{slug}.png").exists()


def _block_until_interrupted(real_train):
    """This process's run, stopped at its first step until the demo interrupts it (a guard of
    10 minutes fails the test instead of hanging it)."""
    def train(config, progress=True, stop_after=None, on_step=None):
        def hook(step: int) -> None:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:  # the interruption arrives between two sleeps
                time.sleep(0.05)
            raise AssertionError("the failed child never interrupted this run")
        return real_train(config, progress, stop_after, hook)
    return train


def test_a_failed_side_by_side_run_is_named_and_stops_the_other_at_once(tmp_path, tiny_pairs, monkeypatch):
    """The second student trains in a child process; its failure stops the demo's own run at
    once (within the step it is in, however slow the machine) with an error naming the
    child's model."""
    import torch

    from examples.get_distillation import train

    pair_dir = tiny_pairs(tmp_path, 32, heun_steps=2)
    first = train.TrainConfig(pairs=str(pair_dir), out=str(tmp_path / "a"), model="GET-Tiny/4", batch=16,
                              steps=3000, log_every=1, sample_every=10_000, ckpt_every=10_000)
    second = dataclasses.replace(first, pairs=str(tmp_path / "missing"), out=str(tmp_path / "b"), model="ViT-Tiny/4")
    threads = torch.get_num_threads()
    real_train = train.train
    monkeypatch.setattr(train, "train", _block_until_interrupted(real_train))
    with pytest.raises(RuntimeError, match="training ViT-Tiny/4 in its own process failed"):
        demo._train_side_by_side(first, second, progress=False)
    monkeypatch.setattr(train, "train", real_train)
    assert len((tmp_path / "a" / "log.jsonl").read_text().splitlines()) == 1  # stopped inside its first step
    assert torch.get_num_threads() == threads
    with pytest.raises(FileNotFoundError):  # the first run fails: the child is stopped, the error is the first's
        demo._train_side_by_side(dataclasses.replace(first, pairs=str(tmp_path / "missing")),
                                 dataclasses.replace(second, pairs=first.pairs), progress=False)
    assert torch.get_num_threads() == threads


def test_the_child_run_exits_when_the_demo_process_is_killed(tmp_path, tiny_pairs):
    """A killed demo (SIGKILL: no cleanup runs) must not leave its second student training on."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    pair_dir = tiny_pairs(tmp_path, 32, heun_steps=2)
    script = tmp_path / "side_by_side.py"
    script.write_text(
        "import dataclasses, sys\n"
        "from examples.get_distillation import demo, train\n"
        f"first = train.TrainConfig(pairs={str(pair_dir)!r}, out={str(tmp_path / 'a')!r}, model='GET-Tiny/4', "
        "batch=16, steps=100000, log_every=1, sample_every=10**6, ckpt_every=10**6)\n"
        f"second = dataclasses.replace(first, out={str(tmp_path / 'b')!r}, model='ViT-Tiny/4')\n"
        "if __name__ == '__main__':  # the spawned child imports this file again\n"
        "    demo._train_side_by_side(first, second, progress=False)\n")
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, str(script)], cwd=root, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(root)})
    try:
        line = proc.stdout.readline()
        child = int(line.split("(pid ")[1].split(";")[0])
        log = tmp_path / "b" / "log.jsonl"
        deadline = time.monotonic() + 600  # a guard: the wait ends when the child has trained a step
        while not log.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert log.exists(), "the child never started training"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()

    def alive(pid: int) -> bool:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return False
        return state not in ("Z", "X")  # a zombie has exited; only its reaper is missing

    deadline = time.monotonic() + 600  # a guard: the child polls its parent every 0.5 s
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    if alive(child):
        os.kill(child, signal.SIGKILL)
        raise AssertionError("the child kept training after the demo process was killed")


def _child_waiting_for_the_parent(config, threads, seconds, parent_done=None, widen_to=None):
    """The child's run, spawned by the demo (so a module-level function): after its first step
    it waits until this process's run is done, so it widens from its second step on."""
    from examples.get_distillation import demo as demo_module
    from examples.get_distillation import train

    real_train = train.train

    def waiting(config, progress=True, stop_after=None, on_step=None):
        def hook(step: int) -> None:
            if step == 1:
                assert parent_done.wait(timeout=600), "this process's run never finished"
            on_step(step)
        return real_train(config, progress, stop_after, hook)

    train.train = waiting
    demo_module._train_worker(config, threads, seconds, parent_done, widen_to)


def test_the_run_that_finishes_first_leaves_its_threads_to_the_other(tmp_path, tiny_pairs, monkeypatch):
    """Side by side, each run starts with half the threads; once one is done, the other trains
    with all of them from its next step on, whichever of the two (this process or the child)
    finishes first. Each step's thread count is in the run's log. No timing: each run waits at
    its first step for the event that the other is done."""
    import torch

    from examples.get_distillation import train

    def threads_logged(run) -> list[int]:
        return [json.loads(line)["threads"] for line in (run / "log.jsonl").read_text().splitlines()]

    pair_dir = tiny_pairs(tmp_path, 32, heun_steps=2)
    base = train.TrainConfig(pairs=str(pair_dir), out="", model="ViT-Tiny/4", batch=8, log_every=1,
                             sample_every=10_000, ckpt_every=10_000)
    real_train = train.train

    def wait_for_the_child(config, progress=True, stop_after=None, on_step=None):
        def hook(step: int) -> None:
            if step == 1:
                assert on_step.event.wait(timeout=600), "the child's run never finished"
            on_step(step)
        return real_train(config, progress, stop_after, hook)

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        # the child finishes first: this process widens
        long_run = dataclasses.replace(base, out=str(tmp_path / "long"), steps=4)
        short_run = dataclasses.replace(base, out=str(tmp_path / "short"), steps=3)
        monkeypatch.setattr(train, "train", wait_for_the_child)
        timings = demo._train_side_by_side(long_run, short_run, progress=False, widen_to=2)
        monkeypatch.setattr(train, "train", real_train)
        assert list(timings) == ["ViT-Tiny/4"]  # both runs are of one preset: one key
        assert threads_logged(tmp_path / "short") == [1, 1, 1]
        assert threads_logged(tmp_path / "long") == [1, 2, 2, 2]  # widened after the step that waited
        assert torch.get_num_threads() == 2
        # this process finishes first: the child widens
        monkeypatch.setattr(demo, "_train_worker", _child_waiting_for_the_parent)
        quick = dataclasses.replace(base, out=str(tmp_path / "quick"), steps=2)
        slow = dataclasses.replace(base, out=str(tmp_path / "slow"), steps=4)
        demo._train_side_by_side(quick, slow, progress=False, widen_to=2)
        assert threads_logged(tmp_path / "quick") == [1, 1]
        assert threads_logged(tmp_path / "slow") == [1, 2, 2, 2]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_quick_and_full_demos_default_to_separate_folders(capsys):
    import argparse

    for quick, folder in ((True, "runs/demo-quick"), (False, "runs/demo")):
        parser = argparse.ArgumentParser()
        demo.add_arguments(parser)
        args = parser.parse_args(["--dry-run"] + (["--quick"] if quick else []))
        assert demo.main(args) == 0
        assert json.loads(capsys.readouterr().out)["out"] == folder


def test_run_labels_are_unique_even_when_folder_names_repeat(tmp_path):
    from examples.get_distillation import report

    runs = [str(tmp_path / p / n) for p, n in (("a", "GET-Tiny_4"), ("b", "GET-Tiny_4"), ("b", "vit"), ("c", "other"),
                                                ("d", "copied"))]
    presets = ["GET-Tiny/4", "GET-Tiny/4", "ViT-Tiny/4", "GET-Tiny/4", "ViT-Tiny/4"]
    assert report.run_labels(runs[2:3], presets[2:3]) == [None]  # a unique preset: labelled by the preset
    labels = report.run_labels(runs, presets)
    assert labels == ["GET-Tiny/4 (GET-Tiny_4) #1", "GET-Tiny/4 (GET-Tiny_4) #2", "ViT-Tiny/4 (vit)",
                      "GET-Tiny/4 (other)", "ViT-Tiny/4 (copied)"]
    slugs = [report.slug({"label": label}) for label in labels]
    assert len(set(slugs)) == len(slugs)


def test_only_sizes_below_the_full_demo_are_called_a_smoke_test():
    assert demo.smoke_test_note(demo.DemoConfig()) is None
    assert demo.smoke_test_note(demo.DemoConfig(student_steps=20000, eval_samples=5000)) is None
    note = demo.smoke_test_note(demo.DemoConfig(eval_samples=300))
    assert "eval-samples 300 (full: 1000)" in note and "barely trained" not in note
    note = demo.smoke_test_note(demo.DemoConfig.quick())
    assert "teacher-steps 30 (full: 2000)" in note and "barely trained" in note
    assert "A smoke test" in report_markdown_head(note)


def report_markdown_head(note):
    from examples.get_distillation.report import markdown

    quality = {"n": 1}
    text = markdown({"smoke_test": note, "teacher": {"quality": quality, "images_per_second": 1.0},
                     "image_shape": [1, 8, 8], "num_classes": 10, "teacher_nfe": 7, "students": []})
    return "\n".join(text.splitlines()[:3])
