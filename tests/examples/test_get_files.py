"""Files on disk: verified checkpoints, the append-only log, and file-system errors as one line."""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from examples.get_distillation import checkpoints, fileio, pairs, teacher, train
from examples.get_distillation.__main__ import main as run_cli

UNSAFE = ("weights_only", "trust-pickle", "trust_pickle", "pickle")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_pairs):
    root = tmp_path_factory.mktemp("files")
    pair_dir = tiny_pairs(root, 32)
    run = root / "run"
    train.train(train.TrainConfig(pairs=str(pair_dir), out=str(run), model="ViT-Tiny/2", batch=8, steps=2, ckpt_every=1,
                                  log_every=1, sample_every=100), progress=False)
    return root, root / "teacher" / "checkpoint.pt", pair_dir, run


def _copy(path: Path, to: Path, record: bool = True) -> Path:
    to.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, to)
    if record:
        shutil.copy(checkpoints.record_path(path), checkpoints.record_path(to))
    return to


@pytest.mark.parametrize("damage", ["flip", "truncate", "zero64"])
@pytest.mark.parametrize("record", [True, False])
def test_a_damaged_checkpoint_is_refused_before_use_without_unsafe_advice(setup, tmp_path, capsys, damage, record):
    _, ckpt, _, _ = setup
    path = _copy(ckpt, tmp_path / "teacher.pt", record)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    elif damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 3: len(data) // 3 + 64] = bytes(64)
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError) as info:
        checkpoints.load_checkpoint(path)
    message = str(info.value)
    expected = "does not match the sha256 recorded" if record else ("truncated or corrupt" if damage == "truncate"
                                                                     else "corrupt")
    assert expected in message and not any(word in message for word in UNSAFE), message
    # the command line says the same, on one line, and suggests no unsafe load
    assert run_cli(["pairs", "--teacher", str(path), "--out", str(tmp_path / "p"), "--num-pairs", "2"]) == 1
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1 and not any(word in err for word in UNSAFE), err
    assert not (tmp_path / "p").exists()


def test_a_checkpoint_holding_code_is_refused_without_unsafe_advice(tmp_path):
    torch.save({"model": {}, "note": Path("x")}, tmp_path / "odd.pt")  # a class that only unpickling could build
    with pytest.raises(ValueError) as info:
        checkpoints.load_checkpoint(tmp_path / "odd.pt")
    assert "holds objects other than tensors and plain data" in str(info.value)
    assert not any(word in str(info.value) for word in UNSAFE)
    (tmp_path / "net.pkl").write_bytes(pickle.dumps({"ema": 1}))
    with pytest.raises(ValueError, match="is a Python pickle, not a checkpoint"):
        checkpoints.load_checkpoint(tmp_path / "net.pkl")


def test_a_kill_between_the_record_and_the_checkpoint_leaves_a_pair_that_verifies(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    checkpoints.save_checkpoint(path, {"step": 1})
    real = fileio.atomic_write_bytes

    def killed(target, data):
        if Path(target) == path:
            raise KeyboardInterrupt  # after the new record, before the new file
        real(target, data)

    monkeypatch.setattr(fileio, "atomic_write_bytes", killed)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert checkpoints.load_checkpoint(path)["step"] == 1  # the file it replaced is still accepted
    checkpoints.save_checkpoint(path, {"step": 3})
    assert checkpoints.load_checkpoint(path)["step"] == 3
    record = json.loads(checkpoints.record_path(path).read_text())
    assert record["sha256"] == fileio.sha256_file(path)


def test_a_torn_last_log_line_is_dropped_with_a_warning_and_training_goes_on(setup, tmp_path, capsys):
    root, _, pair_dir, run = setup
    out = tmp_path / "run"
    shutil.copytree(run, out)
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.5, "out')  # a disk filled up mid-append
    argv = ["train", "--config", str(out / "config.json"), "--out", str(out), "--pairs", str(pair_dir), "--steps", "4"]
    assert run_cli(argv) == 0
    err = capsys.readouterr().err
    assert f"warning: {out / 'log.jsonl'}: dropped its torn last line 3" in err
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    (out / "log.jsonl").write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"log.jsonl', line 2: not a JSON record"):
        fileio.read_jsonl(out / "log.jsonl")


@pytest.mark.parametrize("call, code, text", [
    ("fsync", errno.ENOSPC, "No space left on device"),
    ("replace", errno.EROFS, "Read-only file system"),
    ("mkdir", errno.EACCES, "Permission denied"),
])
@pytest.mark.parametrize("sub", ["teacher", "pairs", "train", "evaluate", "study"])
def test_a_file_system_error_is_one_line_naming_the_path(setup, tmp_path, capsys, monkeypatch, call, code, text, sub):
    root, ckpt, pair_dir, run = setup
    held = root / "heldout"
    if not (held / "manifest.json").exists():
        denoiser, info = teacher.load_teacher(ckpt)
        pairs.generate_pairs(denoiser, held, 8, 8, 8, image_shape=(1, 8, 8), num_classes=10, seed_offset=1000,
                             num_steps=4, progress=False)
    out = tmp_path / "out"
    student = root / "vit.json"
    if not student.exists():
        from examples.get_distillation import config

        config.save(student, train.TrainConfig(pairs="x", out="x", model="ViT-Tiny/2", batch=8, steps=1))
    argv = {"teacher": ["--out", str(out), "--steps", "1", "--preset", "tiny", "--sample-every", "0"],
            "pairs": ["--teacher", str(ckpt), "--out", str(out), "--num-pairs", "2", "--steps", "2"],
            "train": ["--pairs", str(pair_dir), "--out", str(out), "--model", "ViT-Tiny/2", "--batch", "8", "--steps", "1"],
            "evaluate": ["--run", str(run), "--teacher", str(ckpt), "--heldout", str(held), "--out", str(out),
                         "--num-samples", "8", "--batch", "8", "--heun-steps", "2", "--nfe-max", "1",
                         "--sweep-samples", "8", "--speed-repeats", "1"],
            "study": ["--pairs", str(pair_dir), "--heldout", str(held), "--teacher", str(ckpt), "--out", str(out),
                      "--seeds", "1", "--steps", "1", "--student", str(student), "--num-samples", "8", "--batch", "8", "--heun-steps", "2",
                      "--nfe-max", "1", "--sweep-samples", "8", "--speed-repeats", "1"]}[sub]
    real = getattr(os, call)

    def failing(*args, **kwargs):
        target = str(args[0]) if args and isinstance(args[0], (str, os.PathLike)) else ""
        if call == "fsync" or str(out) in target:
            raise OSError(code, os.strerror(code))
        return real(*args, **kwargs)

    monkeypatch.setattr(os, call, failing)
    assert run_cli([sub, *argv]) == 1
    monkeypatch.undo()
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {sub}: {text}: '"), err
    assert str(out) in lines[0] or str(root) in lines[0], err


def test_the_data_hash_covers_the_last_partial_shard(setup, tmp_path):
    _, ckpt, _, _ = setup
    denoiser, _ = teacher.load_teacher(ckpt)
    pairs.generate_pairs(denoiser, tmp_path / "a", 7, 3, 3, image_shape=(1, 8, 8), num_classes=10, num_steps=2,
                         progress=False)
    before = pairs.PairDataset(tmp_path / "a").provenance()
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    manifest["shards"][-1]["files"]["target"]["sha256"] = "0" * 64  # the short last shard (1 pair) differs
    (tmp_path / "a" / "manifest.json").write_text(json.dumps(manifest))
    changed = pairs.PairDataset(tmp_path / "a", verify="none")
    assert changed.provenance()["data_sha256"] != before["data_sha256"]
    assert changed.provenance(6)["data_sha256"] == pairs.PairDataset(tmp_path / "a", verify="none").provenance(6)[
        "data_sha256"]


def test_a_checkpoint_without_a_data_record_refuses_to_resume_on_other_pairs(setup, tmp_path, tiny_pairs):
    _, ckpt, pair_dir, _ = setup
    config = train.TrainConfig(pairs=str(pair_dir), out=str(tmp_path / "run"), model="ViT-Tiny/2", batch=8, steps=2,
                               ckpt_every=1, sample_every=100)
    train.train(config, progress=False, stop_after=1)
    path = tmp_path / "run" / "checkpoint.pt"
    state = checkpoints.load_checkpoint(path)
    for key in ("data", "student", "format"):  # as written before checkpoints described themselves
        del state[key]
    checkpoints.save_checkpoint(path, state)
    denoiser, _ = teacher.load_teacher(ckpt)
    pairs.generate_pairs(denoiser, tmp_path / "other", 32, 32, 32, image_shape=(1, 8, 8), num_classes=10,
                         seed_offset=500, num_steps=4, progress=False)  # same teacher and shape, other seeds
    other = train.TrainConfig(**{**config.__dict__, "pairs": str(tmp_path / "other")})
    with pytest.raises(ValueError, match=r"not those .* was trained on \(\['data_sha256', 'seeds'"):
        train.train(other, progress=False)
    assert train.train(config, progress=False)["step"] == 2  # its own pairs: resumes
