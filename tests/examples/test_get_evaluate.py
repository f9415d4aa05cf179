"""Evaluation refuses held-out pairs that are not held out, and writes its report atomically."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from examples.get_distillation import evaluate, fileio, pairs, report, teacher, train
from examples.get_distillation.__main__ import main as cli


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_pairs):
    """A student trained one step on pairs of seeds [0, 32) from the tiny teacher."""
    root = tmp_path_factory.mktemp("get-eval")
    pair_dir = tiny_pairs(root, 32)
    run = root / "run"
    train.train(train.TrainConfig(pairs=str(pair_dir), out=str(run), model="ViT-Tiny/2", batch=8, steps=1,
                                  sample_every=100), progress=False)
    return root, pair_dir, run


def _heldout(root: Path, name: str, ckpt: Path, offset: int, heun_steps: int = 4) -> Path:
    D, info = teacher.load_teacher(ckpt)
    pairs.generate_pairs(D, root / name, 8, 8, 8, image_shape=(1, 8, 8), num_classes=info["num_classes"],
                         seed_offset=offset, num_steps=heun_steps, teacher_hash=fileio.sha256_file(ckpt), progress=False)
    return root / name


def _config(root, run, heldout, **kw):
    kw = {"out": str(root / "eval"), **kw}
    return evaluate.EvalConfig(run=str(run), teacher=str(root / "teacher" / "checkpoint.pt"), heldout=str(heldout),
                               num_samples=8, batch=8, heun_steps=4, nfe_max=1, sweep_samples=8, **kw)


def test_the_training_pairs_are_refused_as_held_out(setup):
    root, pair_dir, run = setup
    with pytest.raises(ValueError, match=r"seeds \[0, 32\), which overlap the seeds \[0, 32\) .* not held out"):
        evaluate.evaluate(_config(root, run, pair_dir))
    partly = _heldout(root, "partly", root / "teacher" / "checkpoint.pt", offset=28)
    with pytest.raises(ValueError, match=r"seeds \[28, 36\), which overlap"):
        evaluate.evaluate(_config(root, run, partly))
    assert not (root / "eval").exists()


def test_held_out_pairs_of_another_teacher_or_sampler_are_refused(setup):
    root, pair_dir, run = setup
    other = teacher.TeacherConfig(out=str(root / "teacher2"), preset="tiny", steps=1, batch=8, sample_every=0, seed=1)
    teacher.train(other, progress=False)
    foreign = _heldout(root, "foreign", root / "teacher2" / "checkpoint.pt", offset=1000)
    with pytest.raises(ValueError, match="made by another teacher than --teacher"):
        evaluate.evaluate(_config(root, run, foreign))
    config = _config(root, run, foreign)
    config.teacher = str(root / "teacher2" / "checkpoint.pt")  # the right teacher for these pairs, not the student's
    with pytest.raises(ValueError, match="another teacher or sampler than the pairs .* was trained on"):
        evaluate.evaluate(config)
    resampled = _heldout(root, "resampled", root / "teacher" / "checkpoint.pt", offset=1000, heun_steps=3)
    with pytest.raises(ValueError, match="another teacher or sampler"):
        evaluate.evaluate(_config(root, run, resampled))


def test_the_classifier_cache_defaults_inside_out_and_dry_run_validates(setup, capsys):
    root, pair_dir, run = setup
    assert _config(root, run, pair_dir).cache_dir == str(root / "eval" / "cache")
    assert _config(root, run, pair_dir, cache="elsewhere").cache_dir == "elsewhere"
    heldout = _heldout(root, "held", root / "teacher" / "checkpoint.pt", offset=1000)
    argv = ["evaluate", "--run", str(run), "--teacher", str(root / "teacher" / "checkpoint.pt"), "--heldout",
            str(heldout), "--out", str(root / "e")]
    assert cli([*argv, "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["run"] == str(run)
    assert cli([*argv, "--batch", "0", "--dry-run"]) == 1
    assert "batch (--batch): input should be greater than or equal to 1, got 0" in capsys.readouterr().err
    assert cli([*argv[:-4], "--heldout", str(pair_dir), "--out", str(root / "e"), "--dry-run"]) == 1  # not held out
    assert "not held out" in capsys.readouterr().err
    assert not (root / "e").exists()


def test_rows_are_labelled_by_the_checkpoint_the_model_is_loaded_from(setup):
    import shutil

    root, pair_dir, run = setup
    copy = root / "lying-config"
    shutil.copytree(run, copy, dirs_exist_ok=True)
    (copy / "config.json").write_text(json.dumps({**json.loads((copy / "config.json").read_text()),
                                                   "model": "GET-Tiny/4"}))  # config.json says another model
    heldout = _heldout(root, "held-labels", root / "teacher" / "checkpoint.pt", offset=2000)
    result = evaluate.evaluate(_config(root, copy, heldout, out=str(root / "eval-labels")))
    assert [(row["model"], row["label"]) for row in result["students"]] == [("ViT-Tiny/2", "ViT-Tiny/2")]


def test_the_report_is_written_atomically_and_readable_by_the_group(tmp_path, monkeypatch):
    written = []
    original = fileio.atomic_write_bytes

    def spy(path, data):
        written.append(Path(path).name)
        original(path, data)

    monkeypatch.setattr(fileio, "atomic_write_bytes", spy)
    monkeypatch.setattr(report, "plots", lambda rep, runs, out: ["loss_curves.png"])
    monkeypatch.setattr(report, "markdown", lambda rep: "# report\n")
    report.write_report({"students": []}, [], tmp_path)
    assert written == ["report.json", "report.md"]
    assert json.loads((tmp_path / "report.json").read_text())["plots"] == ["loss_curves.png"]
    mode = stat.S_IMODE((tmp_path / "report.json").stat().st_mode)
    assert mode == 0o666 & ~_umask(), oct(mode)  # not mkstemp's 0600


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask
