"""Training, resume, DDP and the quick demo of the GET distillation example (tiny sizes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from examples.get_distillation import checkpoints, locks, runtime, train

from examples.get_distillation import config as cfg

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pair_dir(tmp_path_factory, tiny_pairs) -> Path:
    """64 class-conditional pairs from a tiny, untrained teacher (4 Heun steps)."""
    return tiny_pairs(tmp_path_factory.mktemp("get-train"), 64)


def _config(pair_dir: Path, out: Path, **kw) -> train.TrainConfig:
    base = dict(pairs=str(pair_dir), out=str(out), model="GET-Tiny/2", lr=1e-3, batch=16, steps=6,
                ema_decay=0.9, log_every=1, sample_every=100, ckpt_every=100, seed=3)
    base.update(kw)
    return train.TrainConfig(**base)


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("backward", [b for b in train.BACKWARDS if b != "implicit"])
def test_training_lowers_the_loss(pair_dir, tmp_path, backward):
    import warnings

    # Implicit and OneStep differentiate at a fixed point that an untrained GET has not reached;
    # a deterministic start (z0 = 0) keeps the output a function of the input, so they train too
    z0 = "zeros" if backward in ("implicit", "onestep") else "randn"
    config = _config(pair_dir, tmp_path / backward, backward=backward, steps=25, lr=3e-3, phantom_steps=3, z0=z0)
    with warnings.catch_warnings():
        # six iterations of an untrained GET do not converge, so the implicit adjoint solve
        # reports MAX_STEPS; that is expected here and says nothing about the trainer
        warnings.filterwarnings("ignore", message="implicit backward solve", category=RuntimeWarning)
        train.train(config, progress=False)
    losses = _losses(tmp_path / backward)
    assert len(losses) == 25
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5, losses


def test_implicit_training_steps_run_and_update_the_student(pair_dir, tmp_path):
    # An untrained GET has no fixed point to differentiate at (its residual grows over the six
    # iterations), so the implicit gradient is not a descent direction yet (the model tests
    # show Implicit lowering the loss on a fixed batch); here: steps run, with finite losses
    # and updated weights, and deqkit reports the adjoint solve rather than hiding it.
    import warnings

    config = _config(pair_dir, tmp_path / "implicit", backward="implicit", steps=3, z0="zeros")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train.train(config, progress=False)
    assert any("implicit backward solve" in str(w.message) for w in caught)
    assert all(torch.isfinite(torch.tensor(_losses(tmp_path / "implicit"))))
    state = checkpoints.load_checkpoint(tmp_path / "implicit" / "checkpoint.pt")
    runtime.seed_everything(config.seed)  # as the trainer does before building the student
    fresh = train.build_student(config, (1, 8, 8), 10)
    changed = [k for k, v in fresh.state_dict().items() if "blocks" in k and not torch.equal(v, state["model"][k])]
    assert changed


def test_vit_baseline_trains_conditionally(pair_dir, tmp_path):
    train.train(_config(pair_dir, tmp_path / "vit", model="ViT-Tiny/2", steps=20, lr=3e-3), progress=False)
    losses = _losses(tmp_path / "vit")
    assert sum(losses[-5:]) < 0.9 * sum(losses[:5])


def test_resume_after_a_kill_continues_the_same_run(pair_dir, tmp_path):
    straight = _config(pair_dir, tmp_path / "straight", ckpt_every=2)
    train.train(straight, progress=False)
    killed = _config(pair_dir, tmp_path / "killed", ckpt_every=2)
    train.train(killed, progress=False, stop_after=3)   # "killed" after step 3: last checkpoint at step 2
    # the kill lost step 3's checkpoint: rewind the checkpoint as a real kill between saves would
    state = checkpoints.load_checkpoint(tmp_path / "killed" / "checkpoint.pt")
    assert state["step"] == 3
    train.train(killed, progress=False)                   # resume to the end
    assert _losses(tmp_path / "killed") == pytest.approx(_losses(tmp_path / "straight"), rel=0, abs=0)
    a = checkpoints.load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    b = checkpoints.load_checkpoint(tmp_path / "killed" / "checkpoint.pt")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
        assert torch.equal(a["ema"][key], b["ema"][key]), key


def test_resume_under_a_cosine_schedule_with_clipping_equals_a_straight_run(pair_dir, tmp_path):
    kw = dict(ckpt_every=3, steps=7, lr_schedule="cosine", warmup=2, lr_min=1e-4, grad_clip=0.5, weight_decay=0.01)
    train.train(_config(pair_dir, tmp_path / "straight", **kw), progress=False)
    killed = _config(pair_dir, tmp_path / "killed", **kw)
    train.train(killed, progress=False, stop_after=4)   # last checkpoint at step 3
    state = checkpoints.load_checkpoint(tmp_path / "killed" / "checkpoint.pt")
    assert state["step"] == 4
    train.train(killed, progress=False)
    assert _losses(tmp_path / "killed") == _losses(tmp_path / "straight")
    logged = [json.loads(line)["lr"] for line in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()]
    assert logged == pytest.approx([train.lr_at(killed, s) for s in range(7)])


def test_lr_schedule_warms_up_then_decays_to_lr_min(tmp_path):
    cfg = train.TrainConfig(pairs="", out="", lr=1e-3, lr_schedule="cosine", lr_min=1e-5, warmup=10, steps=111)
    lrs = [train.lr_at(cfg, s) for s in range(111)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert lrs[10] == pytest.approx(1e-3) and lrs[60] == pytest.approx((1e-3 + 1e-5) / 2)
    assert all(a > b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] == pytest.approx(1e-5)
    constant = train.TrainConfig(pairs="", out="", lr=1e-3, steps=110)
    assert {train.lr_at(constant, s) for s in range(110)} == {1e-3}  # the paper: constant, no warm-up


def test_gradient_clipping_bounds_the_gradient(pair_dir, tmp_path, monkeypatch):
    # Adam normalises its step, so look at the clipped gradient itself
    config = _config(pair_dir, tmp_path / "clip", steps=1, grad_clip=1e-3)
    seen = []
    original = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *a, **k):
        params = list(params)
        total = original(params, max_norm, *a, **k)
        seen.append((float(total), float(torch.cat([p.grad.flatten() for p in params if p.grad is not None]).norm())))
        return total

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    train.train(config, progress=False)
    (before, after), = seen
    assert before > 1e-3 and after == pytest.approx(1e-3, rel=1e-3)


def test_num_pairs_trains_on_the_first_pairs_only(pair_dir, tmp_path, monkeypatch):
    seen = []
    original = train.load_batch

    def spy(dataset, indices, *a, **k):
        seen.extend(indices)
        return original(dataset, indices, *a, **k)

    monkeypatch.setattr(train, "load_batch", spy)
    train.train(_config(pair_dir, tmp_path / "run", num_pairs=32, steps=4), progress=False)  # 2 epochs of 32
    assert sorted(seen) == sorted(list(range(32)) * 2)


def test_a_checkpoint_from_before_a_new_setting_resumes(pair_dir, tmp_path):
    config = _config(pair_dir, tmp_path / "run", steps=2, ckpt_every=1)
    train.train(config, progress=False, stop_after=1)
    path = tmp_path / "run" / "checkpoint.pt"
    state = checkpoints.load_checkpoint(path)
    del state["config"]["grad_clip"], state["config"]["lr_schedule"]  # as written before they existed
    checkpoints.save_checkpoint(path, state)
    assert train.train(config, progress=False)["step"] == 2


def test_resume_refuses_a_run_with_other_settings(pair_dir, tmp_path):
    train.train(_config(pair_dir, tmp_path / "run", steps=1), progress=False)
    with pytest.raises(ValueError, match="other settings"):
        train.train(_config(pair_dir, tmp_path / "run", steps=2, lr=5e-3), progress=False)


def test_checkpoints_load_with_weights_only_and_hold_the_config(pair_dir, tmp_path):
    config = _config(pair_dir, tmp_path / "run", steps=2)
    train.train(config, progress=False)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["config"] == cfg.to_dict(config)
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == cfg.to_dict(config)
    model, loaded = train.load_student(tmp_path / "run" / "checkpoint.pt")
    assert loaded == config and not model.training


def test_ddp_on_two_gloo_processes_matches_one_process(pair_dir, tmp_path):
    single = _config(pair_dir, tmp_path / "single", steps=3)
    train.train(single, progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "examples.get_distillation", "train", "--pairs", str(pair_dir), "--out", str(tmp_path / "ddp"),
           "--model", "GET-Tiny/2", "--lr", "1e-3", "--batch", "16", "--steps", "3", "--ema-decay", "0.9",
           "--log-every", "1", "--sample-every", "100", "--ckpt-every", "100", "--seed", "3"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert _losses(tmp_path / "ddp") == pytest.approx(_losses(tmp_path / "single"), rel=1e-5)
    a = checkpoints.load_checkpoint(tmp_path / "single" / "checkpoint.pt")["model"]
    b = checkpoints.load_checkpoint(tmp_path / "ddp" / "checkpoint.pt")["model"]
    for key in a:
        # gradients agree to float rounding (all-reduce sums in another order); Adam's
        # normalised step can turn that into up to ~lr of difference on a near-zero gradient
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-4)


def test_bad_settings_are_named(pair_dir, tmp_path):
    with pytest.raises(ValueError, match="backward"):
        _config(pair_dir, tmp_path, backward="adjoint").validate()
    with pytest.raises(ValueError, match="solver"):
        _config(pair_dir, tmp_path, solver="secant").validate()
    with pytest.raises(ValueError, match="lr_schedule"):
        _config(pair_dir, tmp_path, lr_schedule="linear").validate()
    with pytest.raises(ValueError, match="lr_min"):
        _config(pair_dir, tmp_path, lr_min=1.0).validate()
    with pytest.raises(ValueError, match="warmup"):
        _config(pair_dir, tmp_path, warmup=-1).validate()
    with pytest.raises(ValueError, match=r"warmup \(5\) must be below steps - 1 \(5\)"):
        _config(pair_dir, tmp_path, lr_schedule="cosine", warmup=5, steps=6).validate()
    with pytest.raises(ValueError, match="grad_clip"):
        _config(pair_dir, tmp_path, grad_clip=0.0).validate()
    with pytest.raises(ValueError, match="weight_decay"):
        _config(pair_dir, tmp_path, weight_decay=-0.1).validate()
    with pytest.raises(ValueError, match="batch 512 is larger"):
        train.train(_config(pair_dir, tmp_path / "big", batch=512), progress=False)
    with pytest.raises(ValueError, match="num_pairs 65 exceeds the 64 pairs"):
        train.train(_config(pair_dir, tmp_path / "many", num_pairs=65), progress=False)
    with pytest.raises(ValueError, match=r"num_pairs \(--num-pairs\): input should be greater than or equal to 1"):
        _config(pair_dir, tmp_path, num_pairs=0).validate()
    with pytest.raises(FileNotFoundError, match="manifest"):
        train.train(_config(tmp_path / "nowhere", tmp_path / "x"), progress=False)


def test_batches_are_disjoint_across_ranks_and_cover_an_epoch():
    seen = []
    for step in range(4):  # 64 items, global batch 16: one epoch
        parts = [train.batch_indices(64, 16, step, seed=1, rank=r, world=2) for r in range(2)]
        assert not set(parts[0]) & set(parts[1])
        seen += parts[0] + parts[1]
    assert sorted(seen) == list(range(64))


# -- non-finite training, provenance, locks, reruns, moved folders ------------------


def _main(*argv: str) -> int:
    from examples.get_distillation.__main__ import main

    return main(list(argv))


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_finite_checkpoint(pair_dir, tmp_path, monkeypatch):
    original = train.distillation_loss
    calls = []

    def poisoned(*a, **k):
        calls.append(1)
        loss = original(*a, **k)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(train, "distillation_loss", poisoned)
    config = _config(pair_dir, tmp_path / "run", steps=6, ckpt_every=2)
    with pytest.raises(train.TrainingDiverged, match="step 3: the loss is nan.*finite state of step 2"):
        train.train(config, progress=False)
    state = checkpoints.load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for part in ("model", "ema") for v in state[part].values())
    lines = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]  # strict JSON: no bare NaN


def test_weights_that_blow_up_are_never_saved_and_the_cli_exits_non_zero(pair_dir, tmp_path, capsys, monkeypatch):
    from examples.get_distillation import loop

    original, calls = loop._update_ema, []

    def blow_up(ema, model, decay):  # the update of step 3 leaves a weight infinite (a finite loss)
        calls.append(1)
        original(ema, model, decay)
        if len(calls) == 3:
            with torch.no_grad():
                next(ema.parameters()).fill_(float("inf"))

    monkeypatch.setattr(loop, "_update_ema", blow_up)
    code = _main("train", "--pairs", str(pair_dir), "--out", str(tmp_path / "run"), "--model", "ViT-Tiny/2",
                 "--batch", "16", "--steps", "8", "--ckpt-every", "1", "--log-every", "1", "--sample-every", "100")
    assert code == 1
    err = capsys.readouterr().err
    assert "error: train: step 3: the weights are no longer finite" in err and "finite state of step 2" in err, err
    state = checkpoints.load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["ema"].values())
    for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))


@pytest.mark.parametrize("lr", ["inf", "nan"])
def test_a_non_finite_lr_is_refused(pair_dir, tmp_path, capsys, lr):
    assert _main("train", "--pairs", str(pair_dir), "--out", str(tmp_path), "--lr", lr, "--dry-run") == 1
    assert f"lr (--lr): input should be a finite number, got {lr}" in capsys.readouterr().err


def test_rerunning_a_finished_run_is_a_no_op(pair_dir, tmp_path, capsys):
    argv = ["train", "--pairs", str(pair_dir), "--out", str(tmp_path / "run"), "--model", "GET-Tiny/2",
            "--batch", "16", "--steps", "2", "--sample-every", "100"]
    assert _main(*argv) == 0
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    assert _main(*argv) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before


def test_a_moved_run_resumes_and_a_constant_lr_run_extends(pair_dir, tmp_path):
    import shutil

    train.train(_config(pair_dir, tmp_path / "straight", steps=4), progress=False)
    train.train(_config(pair_dir, tmp_path / "a", steps=2), progress=False)
    shutil.move(tmp_path / "a", tmp_path / "b")
    assert train.train(_config(pair_dir, tmp_path / "b", steps=4), progress=False)["step"] == 4
    assert _losses(tmp_path / "b") == _losses(tmp_path / "straight")


def test_checkpoints_record_the_data_and_load_without_the_pair_folder(tmp_path, tiny_pairs):
    import shutil

    pairs_dir = tiny_pairs(tmp_path / "p", 32)
    train.train(_config(pairs_dir, tmp_path / "run", steps=1, batch=8), progress=False)
    state = checkpoints.load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    from examples.get_distillation.pairs import PairDataset

    assert state["data"] == PairDataset(pairs_dir).provenance()
    assert state["data"]["seeds"] == [0, 32] and state["student"]["image_shape"] == [1, 8, 8]
    shutil.rmtree(pairs_dir)
    model, config = train.load_student(tmp_path / "run" / "checkpoint.pt")
    assert model(torch.zeros(2, 1, 8, 8), torch.tensor([1, 2])).images.shape == (2, 1, 8, 8)


def test_resume_refuses_pairs_regenerated_at_the_same_path(tmp_path, tiny_pairs):
    import shutil

    pairs_dir = tiny_pairs(tmp_path / "p", 32)
    config = _config(pairs_dir, tmp_path / "run", steps=2, batch=8)
    train.train(config, progress=False, stop_after=1)
    shutil.rmtree(tmp_path / "p")
    tiny_pairs(tmp_path / "p", 32, heun_steps=3)  # another sampler (the teacher's identity) at the same path
    with pytest.raises(ValueError, match="not those .* was trained on \\(\\['data_sha256', 'sampler', 'teacher_id'\\]"):
        train.train(config, progress=False)


def test_resume_names_pairs_of_another_image_size(tmp_path, tiny_pairs):
    pairs_dir = tiny_pairs(tmp_path / "p", 32)
    config = _config(pairs_dir, tmp_path / "run", steps=2, batch=8)
    train.train(config, progress=False, stop_after=1)
    manifest = json.loads((pairs_dir / "manifest.json").read_text())
    state = checkpoints.load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    state["data"]["image_shape"] = [1, 16, 16]  # as if the pairs had been made for other images
    checkpoints.save_checkpoint(tmp_path / "run" / "checkpoint.pt", state)
    with pytest.raises(ValueError, match=r"images \(1, 8, 8\) with 10 classes, but .* trained on \(1, 16, 16\)"):
        train.train(config, progress=False)
    assert manifest["arrays"]["noise"]["shape"] == [1, 8, 8]


def test_a_run_folder_being_trained_is_locked(pair_dir, tmp_path, hold_lock):
    holder = hold_lock(tmp_path / "run")
    with pytest.raises(locks.FolderLocked, match=f"process {holder.pid}"):
        train.train(_config(pair_dir, tmp_path / "run", steps=1), progress=False)
    holder.kill()
    holder.wait()
    assert train.train(_config(pair_dir, tmp_path / "run", steps=1), progress=False)["step"] == 1  # free now


def test_a_checkpoint_written_before_provenance_still_resumes_and_loads(pair_dir, tmp_path):
    config = _config(pair_dir, tmp_path / "run", steps=2, ckpt_every=1)
    train.train(config, progress=False, stop_after=1)
    path = tmp_path / "run" / "checkpoint.pt"
    state = checkpoints.load_checkpoint(path)
    for key in ("data", "student", "format"):  # as written before checkpoints described themselves
        del state[key]
    checkpoints.save_checkpoint(path, state)
    model, _ = train.load_student(path)  # learns the image shape from the pair folder
    assert model(torch.zeros(1, 1, 8, 8), torch.tensor([3])).images.shape == (1, 1, 8, 8)
    assert train.train(config, progress=False)["step"] == 2
    assert "data" in checkpoints.load_checkpoint(path)  # and now records its data


def test_a_resumed_run_cuts_its_log_back_to_its_checkpoint(pair_dir, tmp_path):
    # a kill after a log line but before the next checkpoint: the resumed run redoes those
    # steps, and its log holds each step once, as an uninterrupted run's does
    train.train(_config(pair_dir, tmp_path / "straight", steps=4), progress=False)
    config = _config(pair_dir, tmp_path / "run", steps=4, ckpt_every=2)
    train.train(config, progress=False, stop_after=2)
    with open(tmp_path / "run" / "log.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "loss": 123.0}) + "\n")  # logged, then killed before step 4's checkpoint
    train.train(config, progress=False)
    assert _losses(tmp_path / "run") == _losses(tmp_path / "straight")


def test_the_ema_follows_its_decay(pair_dir, tmp_path):
    config = _config(pair_dir, tmp_path / "run", steps=1, ema_decay=0.9)
    train.train(config, progress=False)
    state = checkpoints.load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    runtime.seed_everything(config.seed)  # the initial weights, as the trainer builds them
    initial = train.build_student(config, (1, 8, 8), 10).state_dict()
    moved = 0
    for name, ema in state["ema"].items():
        if ema.is_floating_point() and name in dict(train.build_student(config, (1, 8, 8), 10).named_parameters()):
            expected = initial[name] + 0.1 * (state["model"][name] - initial[name])  # one step of decay 0.9
            torch.testing.assert_close(ema, expected, rtol=1e-5, atol=1e-6)
            moved += not torch.equal(state["model"][name], initial[name])
    assert moved > 0
