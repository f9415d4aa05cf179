"""Pair generation: seed i -> pair i anywhere, resume after a kill, corruption detection, torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from examples.get_distillation import checkpoints, fileio, locks, pairs, sampling
from examples.get_distillation import teacher as T

REPO = Path(__file__).resolve().parents[2]
STEPS = 2  # Heun steps: 3 NFE keeps the tests fast


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    T.train(T.TeacherConfig(out=str(out), preset="tiny", steps=1, batch=8, sample_every=0), progress=False)
    return out / "checkpoint.pt"


def _generate(ckpt, out, num=7, shard=3, batch=2, **kw):
    D, info = T.load_teacher(ckpt)
    return pairs.generate_pairs(D, out, num, shard, batch, image_shape=(1, 8, 8), num_classes=10, num_steps=STEPS,
                                teacher_hash=fileio.sha256_file(ckpt), progress=False, **kw)


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.name.startswith(("shard_", "manifest"))}


def test_pair_i_is_the_same_alone_or_in_a_batch(teacher_ckpt, tmp_path):
    manifest = _generate(teacher_ckpt, tmp_path, num=7, shard=3, batch=3)
    assert manifest["num_pairs"] == 7 and [s["count"] for s in manifest["shards"]] == [3, 3, 1]
    ds = pairs.PairDataset(tmp_path)
    D, _ = T.load_teacher(teacher_ckpt)
    sigmas = sampling.karras_sigmas(STEPS)
    for i in (0, 4, 6):
        noise, label = pairs.pair_inputs([i], (1, 8, 8), 10)
        target = pairs.teacher_outputs(D, noise, label, sigmas)
        e, x, y = ds[i]
        assert torch.equal(e, noise[0]) and y.item() == label.item()
        # The noise is bitwise equal (one generator per seed). The teacher output is computed in
        # a batch of 3 there and alone here; CPU conv kernels may pick different blockings for
        # different batch sizes, so float rounding can differ: allclose at 1e-5, not bitwise.
        torch.testing.assert_close(x, target[0], rtol=1e-5, atol=1e-5)
    assert x.dtype == torch.float32 and e.shape == (1, 8, 8)


class Killed(Exception):
    pass


def test_a_run_killed_mid_shard_resumes_to_identical_data_and_manifest(teacher_ckpt, tmp_path):
    _generate(teacher_ckpt, tmp_path / "straight")

    def kill(shard, batch):
        if shard == 1 and batch == 1:
            raise Killed

    with pytest.raises(Killed):
        _generate(teacher_ckpt, tmp_path / "resumed", on_batch=kill)
    assert (tmp_path / "resumed" / "shard_00000.json").is_file()
    assert not (tmp_path / "resumed" / "shard_00001.json").exists()
    assert not (tmp_path / "resumed" / "manifest.json").exists()
    # a half-written array under the final name (e.g. killed between two renames) is redone too
    (tmp_path / "resumed" / "shard_00001.noise.npy").write_bytes(b"partial")
    _generate(teacher_ckpt, tmp_path / "resumed")
    assert _files(tmp_path / "straight") == _files(tmp_path / "resumed")
    assert not [p for p in (tmp_path / "resumed").iterdir() if p.name.startswith(".tmp")]


def test_corrupted_shards_are_detected_and_redone(teacher_ckpt, tmp_path):
    _generate(teacher_ckpt, tmp_path)
    good = _files(tmp_path)
    path = tmp_path / "shard_00001.target.npy"
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="shard 1.*sha256"):
        pairs.PairDataset(tmp_path)
    lazy = pairs.PairDataset(tmp_path, verify="none")
    with pytest.raises(ValueError, match="sha256"):
        lazy.verify()
    _generate(teacher_ckpt, tmp_path)
    assert _files(tmp_path) == good


def test_reader_rejects_wrong_teacher_shape_and_paths(teacher_ckpt, tmp_path):
    _generate(teacher_ckpt, tmp_path)
    digest = fileio.sha256_file(teacher_ckpt)
    ds = pairs.PairDataset(tmp_path, expect_teacher=digest, expect_shape=(1, 8, 8))
    assert len(ds) == 7 and ds[-1][0].shape == (1, 8, 8)
    with pytest.raises(IndexError):
        ds[7]
    with pytest.raises(ValueError, match="teacher"):
        pairs.PairDataset(tmp_path, expect_teacher="0" * 64)
    with pytest.raises(ValueError, match="image shape"):
        pairs.PairDataset(tmp_path, expect_shape=(3, 32, 32))
    with pytest.raises(FileNotFoundError, match="manifest"):
        pairs.PairDataset(tmp_path / "nothing")
    with pytest.raises(ValueError, match="verify"):
        pairs.PairDataset(tmp_path, verify="sometimes")
    with pytest.raises(ValueError, match="different settings"):
        _generate(teacher_ckpt, tmp_path, seed_offset=100)
    with pytest.raises(ValueError, match="shard_size"):
        _generate(teacher_ckpt, tmp_path / "x", shard=0)


def test_distributed_sampler_sees_every_pair_once(teacher_ckpt, tmp_path):
    _generate(teacher_ckpt, tmp_path, num=6)
    ds = pairs.PairDataset(tmp_path)
    seen = []
    for rank in range(2):
        sampler = torch.utils.data.DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=3)
        loader = torch.utils.data.DataLoader(ds, batch_size=2, sampler=sampler)
        for noise, target, label in loader:
            assert noise.shape[1:] == (1, 8, 8) and label.dtype == torch.int64
            seen += [float(v) for v in noise[:, 0, 0, 0]]
    assert sorted(seen) == sorted(float(ds[i][0][0, 0, 0]) for i in range(6))


def test_two_gloo_ranks_under_torchrun_match_one_process(teacher_ckpt, tmp_path):
    _generate(teacher_ckpt, tmp_path / "single", num=6, shard=2, batch=2)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "examples.get_distillation", "pairs", "--teacher", str(teacher_ckpt), "--out", str(tmp_path / "ddp"),
           "--num-pairs", "6", "--shard-size", "2", "--batch", "2", "--steps", str(STEPS), "--device", "cpu", "--threads", "1"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 1:" in proc.stderr  # rank 1 made shard 1 (pairs 2, 3)
    # same batch composition on every rank, so the data is bitwise identical
    assert _files(tmp_path / "single") == _files(tmp_path / "ddp")
    np.testing.assert_array_equal(np.load(tmp_path / "ddp" / "shard_00001.noise.npy")[1],
                                  pairs.pair_inputs([3], (1, 8, 8), 10)[0][0].numpy())


# -- growth, locks, untrusted files, what "the same pair" guarantees ----------------


def test_growing_a_folder_gives_exactly_what_a_fresh_run_makes(teacher_ckpt, tmp_path):
    # 7 pairs in shards of 3 end in a short shard [6, 7); growing to 10 must redo it as [6, 9)
    _generate(teacher_ckpt, tmp_path / "grown", num=7, shard=3, batch=3)
    grown = _generate(teacher_ckpt, tmp_path / "grown", num=10, shard=3, batch=3)
    fresh = _generate(teacher_ckpt, tmp_path / "fresh", num=10, shard=3, batch=3)
    assert [s["count"] for s in grown["shards"]] == [3, 3, 3, 1]
    assert _files(tmp_path / "grown") == _files(tmp_path / "fresh")
    assert grown == fresh
    ds = pairs.PairDataset(tmp_path / "grown")
    for i in (6, 7, 8, 9):  # pairs that the smaller run never made
        assert torch.equal(ds[i][0], pairs.pair_inputs([i], (1, 8, 8), 10)[0][0])


def test_a_manifest_with_a_gap_is_refused_by_the_reader(teacher_ckpt, tmp_path):
    _generate(teacher_ckpt, tmp_path, num=7, shard=3, batch=3)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["shards"][1]["count"], manifest["shards"][1]["seeds"] = 1, [3, 4]  # as an old grown folder
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="shard 1 holds the seeds \\[3, 4\\].*gap"):
        pairs.PairDataset(tmp_path)


def test_manifest_file_names_are_confined_to_the_folder(teacher_ckpt, tmp_path):
    _generate(teacher_ckpt, tmp_path / "p")
    np.save(tmp_path / "x.npy", np.zeros((3, 1, 8, 8), np.float32))
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    manifest["shards"][0]["files"]["noise"]["name"] = "../x.npy"
    (tmp_path / "p" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="'../x.npy'.*outside its folder"):
        pairs.PairDataset(tmp_path / "p", verify="none")


def test_a_corrupt_manifest_is_named(teacher_ckpt, tmp_path):
    _generate(teacher_ckpt, tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "deqkit-get-pairs/1", "shards": [')
    with pytest.raises(ValueError, match="pair manifest .*manifest.json.* is corrupt"):
        pairs.PairDataset(tmp_path)


def test_a_folder_being_written_is_locked_until_its_writer_is_gone(teacher_ckpt, tmp_path, hold_lock):
    holder = hold_lock(tmp_path)
    with pytest.raises(locks.FolderLocked, match=f"being written by process {holder.pid} on"):
        _generate(teacher_ckpt, tmp_path)
    assert not (tmp_path / "shard_00000.json").exists()
    holder.kill()  # as after kill -9: the kernel releases the lock; there is nothing stale to detect
    holder.wait()
    assert json.loads((tmp_path / ".lock.json").read_text())["pid"] == holder.pid  # what it left says who it was
    _generate(teacher_ckpt, tmp_path)
    assert (tmp_path / "manifest.json").is_file() and not (tmp_path / ".lock.json").exists()


def test_two_concurrent_cli_runs_into_one_folder_cannot_both_write(teacher_ckpt, tmp_path, hold_lock):
    holder = hold_lock(tmp_path / "p")
    proc = subprocess.run([sys.executable, "-m", "examples.get_distillation", "pairs", "--teacher", str(teacher_ckpt),
                           "--out", str(tmp_path / "p"), "--num-pairs", "4", "--steps", "2", "--threads", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"being written by process {holder.pid}" in proc.stderr
    assert not (tmp_path / "p" / "pairs_config.json").exists()


class _Boom:
    def __reduce__(self):
        return (Path.touch, (Path(os.environ["BOOM_FILE"]),))


@pytest.mark.parametrize("name", ["teacher.pkl", "teacher.pt"])
def test_a_pickled_teacher_is_refused_without_trust_pickle(tmp_path, monkeypatch, name):
    import pickle

    boom = tmp_path / "boom"
    monkeypatch.setenv("BOOM_FILE", str(boom))
    path = tmp_path / name
    path.write_bytes(pickle.dumps({"ema": _Boom()}))
    with pytest.raises(ValueError, match="pickle.*runs code.*--trust-pickle"):
        pairs.load_any_teacher(str(path), torch.device("cpu"))
    assert not boom.exists()
    # with the flag it proceeds to EDM's loader (which needs EDM's code on the path)
    with pytest.raises(ImportError, match="PYTHONPATH"):
        pairs.load_any_teacher(str(path), torch.device("cpu"), trust_pickle=True)
    assert not boom.exists()


def test_pairs_settings_are_validated(tmp_path):
    with pytest.raises(ValueError, match=r"rho \(--rho\): input should be greater than 0, got 0.0"):
        pairs.PairsConfig(teacher="t.pt", rho=0.0)
    with pytest.raises(ValueError, match="sigma_min"):
        pairs.PairsConfig(teacher="t.pt", sigma_min=-1.0)
    with pytest.raises(ValueError, match=r"sigma_min <= sigma_max <= 10000, got sigma_min=100.0, sigma_max=80.0"):
        pairs.PairsConfig(teacher="t.pt", sigma_min=100.0)
    with pytest.raises(ValueError, match=r"batch \(--batch\): input should be greater than or equal to 1, got 0"):
        pairs.PairsConfig(teacher="t.pt", batch=0)


def test_the_target_is_bitwise_equal_for_one_batch_size_and_close_otherwise(teacher_ckpt, tmp_path):
    # bitwise: the same batch size, any shard size that is a multiple of it, any rank layout
    a = _generate(teacher_ckpt, tmp_path / "a", num=8, shard=4, batch=2)
    b = _generate(teacher_ckpt, tmp_path / "b", num=8, shard=2, batch=2)
    da, db = pairs.PairDataset(tmp_path / "a"), pairs.PairDataset(tmp_path / "b")
    assert a["teacher"] == b["teacher"]
    for i in range(8):
        assert all(torch.equal(u, v) for u, v in zip(da[i], db[i]))
    # another batch size: the noise and labels are bitwise equal, the target to rounding only
    _generate(teacher_ckpt, tmp_path / "c", num=8, shard=8, batch=8)
    dc = pairs.PairDataset(tmp_path / "c")
    for i in range(8):
        assert torch.equal(da[i][0], dc[i][0]) and torch.equal(da[i][2], dc[i][2])
        torch.testing.assert_close(da[i][1], dc[i][1], rtol=1e-5, atol=1e-5)


def test_the_manifest_records_the_teacher_identity_and_seed_range(teacher_ckpt, tmp_path):
    manifest = _generate(teacher_ckpt, tmp_path / "a", num=4, shard=2, batch=2, seed_offset=10)
    D, _ = T.load_teacher(teacher_ckpt)
    teacher = manifest["teacher"]
    assert teacher["sha256"] == fileio.sha256_file(teacher_ckpt)
    assert teacher["weights_sha256"] == checkpoints.state_sha256(D)
    assert teacher["id"] == pairs.teacher_identity(teacher["weights_sha256"], manifest["sampler"])
    assert manifest["seeds"] == [10, 14]
    other = pairs.generate_pairs(D, tmp_path / "b", 4, 2, 2, image_shape=(1, 8, 8), num_classes=10, num_steps=STEPS + 1,
                                 teacher_hash=teacher["sha256"], progress=False)
    assert other["teacher"]["weights_sha256"] == teacher["weights_sha256"] and other["teacher"]["id"] != teacher["id"]
