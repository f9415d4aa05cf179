"""The equilibrium recipe's options (--output-norm, --jac-reg, --min-steps) and the nfe-study
subcommand, at tiny sizes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import deqkit
from examples.get_distillation import checkpoints, fileio, metrics, models, nfe_study, pairs, teacher, train
from examples.get_distillation.__main__ import main as run_cli


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_pairs):
    """64 tiny pairs, 8 held-out pairs of other seeds, and two GET students trained 2 steps:
    GET's recipe and the equilibrium recipe."""
    root = tmp_path_factory.mktemp("get-eq")
    pair_dir = tiny_pairs(root, 64)
    ckpt = root / "teacher" / "checkpoint.pt"
    denoiser, info = teacher.load_teacher(ckpt)
    pairs.generate_pairs(denoiser, root / "heldout", 8, 8, 8, image_shape=(1, 8, 8), num_classes=info["num_classes"],
                         seed_offset=1000, num_steps=4, teacher_hash=fileio.sha256_file(ckpt), progress=False)
    runs = {}
    for name, kw in (("paper", {}), ("eq", dict(output_norm=True, jac_reg=1.0, min_steps=2))):
        train.train(_config(pair_dir, root / name, **kw), progress=False)
        runs[name] = root / name
    return root, pair_dir, runs


def _config(pair_dir: Path, out: Path, **kw) -> train.TrainConfig:
    base = dict(pairs=str(pair_dir), out=str(out), model="GET-Tiny/4", lr=1e-3, batch=8, steps=2, ema_decay=0.5,
                log_every=1, sample_every=100, ckpt_every=100, seed=1)
    base.update(kw)
    return train.TrainConfig(**base)


def _get(**kw) -> models.GET:
    torch.manual_seed(0)
    return models.build("GET-Tiny/4", img_size=8, channels=1, num_classes=10, **kw)


def test_output_norm_gives_a_bounded_map_that_differs_from_gets():
    plain, normed = _get(), _get(output_norm=True)
    u = torch.randn(2, 4, 3 * 64 * 3)
    z = 1000 * torch.randn(2, 4, 64)
    with torch.no_grad():
        f_plain, f_norm = plain.equilibrium_map(z, u), normed.equilibrium_map(z, u)
        via_norm = normed.output_norm(plain.equilibrium_map(z, u))
    # GET's pre-LN map keeps the scale of z (z + r(z)); the LayerNorm maps it to unit scale
    assert f_plain.std() > 100 and abs(float(f_norm.std()) - 1) < 0.05
    assert torch.allclose(via_norm, f_norm)
    with pytest.raises(TypeError, match="output_norm must be True or False"):
        _get(output_norm="yes")


def test_jacobian_penalty_is_deqkits_estimate_and_trains_the_map():
    model = _get(output_norm=True).train()
    out = model(torch.randn(3, 1, 8, 8), torch.tensor([1, 2, 3]))
    assert out.tokens.shape == (3, 4, 64) and out.injection.shape == (3, 4, 3 * 64 * 3)
    torch.manual_seed(5)
    penalty = model.jacobian_penalty(out, n_samples=2)
    torch.manual_seed(5)
    u = out.injection
    expected = deqkit.jacobian_reg(lambda z: model.equilibrium_map(z, u), out.tokens.detach(), 2).mean
    assert torch.allclose(penalty, expected) and penalty > 0
    penalty.backward()
    assert model.equilibrium_blocks[0].mlp[0].weight.grad.abs().sum() > 0
    vit = models.build("ViT-Tiny/4", img_size=8, channels=1, num_classes=10)
    with pytest.raises(ValueError, match="jacobian_penalty needs a GET output"):
        model.jacobian_penalty(vit(torch.randn(1, 1, 8, 8), torch.tensor([0])))


@pytest.mark.parametrize("kw, message", [
    (dict(min_steps=0), r"min_steps \(--min-steps\): input should be greater than or equal to 1, got 0"),
    (dict(min_steps=7), r"min_steps must be an integer in \[1, max_steps=6\].*got 7"),
    (dict(min_steps=2.5), r"min_steps \(--min-steps\): expected an integer, got 2.5"),
    (dict(jac_reg=-1.0), r"jac_reg \(--jac-reg\): input should be greater than or equal to 0, got -1.0"),
    (dict(jac_reg=float("nan")), r"jac_reg \(--jac-reg\): input should be a finite number, got nan"),
    (dict(jac_reg_samples=0), r"jac_reg_samples \(--jac-reg-samples\): input should be greater than or equal to 1"),
    (dict(output_norm="yes"), r"output_norm \(--output-norm\): expected true or false, got 'yes'"),
    (dict(model="ViT-Tiny/4", output_norm=True, jac_reg=1.0), r"output_norm, jac_reg apply to GET students only"),
    (dict(model="ViT-Tiny/4", min_steps=2), r"min_steps apply to GET students only, not to ViT-Tiny/4"),
])
def test_bad_equilibrium_settings_are_named(kw, message):
    with pytest.raises(ValueError, match=message):
        train.TrainConfig(pairs="p", out="o", **kw)


def test_bad_equilibrium_flags_stop_the_cli_with_one_line(setup, capsys):
    assert run_cli(["train", "--pairs", "p", "--out", "o", "--jac-reg", "-2", "--dry-run"]) == 1
    assert ("error: train: TrainConfig: jac_reg (--jac-reg): input should be greater than or equal to 0, got -2.0"
            in capsys.readouterr().err)
    assert run_cli(["train", "--pairs", str(setup[1]), "--out", "o", "--output-norm", "--jac-reg", "1",
                    "--min-steps", "3", "--model", "GET-Tiny/4", "--batch", "8", "--dry-run"]) == 0
    config = json.loads(capsys.readouterr().out)
    assert config["output_norm"] is True and config["jac_reg"] == 1.0 and config["min_steps"] == 3


def test_random_iterations_are_seeded_by_the_step_and_cover_the_range():
    fixed = train.TrainConfig(pairs="p", out="o", max_steps=8)
    drawn = train.TrainConfig(pairs="p", out="o", max_steps=8, min_steps=3)
    assert {train.iterations_at(fixed, s) for s in range(50)} == {8}
    values = [train.iterations_at(drawn, s) for s in range(400)]
    assert set(values) == set(range(3, 9))
    assert values == [train.iterations_at(drawn, s) for s in range(400)]  # a function of the step (resume)


def test_each_equilibrium_option_changes_training(setup):
    root, pair_dir, runs = setup
    base = checkpoints.load_checkpoint(runs["paper"] / "checkpoint.pt")["model"]
    for name, kw in (("norm", dict(output_norm=True)), ("jac", dict(jac_reg=1.0)), ("iters", dict(min_steps=2))):
        train.train(_config(pair_dir, root / f"opt-{name}", **kw), progress=False)
        state = checkpoints.load_checkpoint(root / f"opt-{name}" / "checkpoint.pt")["model"]
        shared = [k for k in base if k in state]
        assert any(not torch.equal(base[k], state[k]) for k in shared), name
        log = [json.loads(line) for line in (root / f"opt-{name}" / "log.jsonl").read_text().splitlines()]
        assert ("jac_reg" in log[-1]) == (name == "jac")
    assert "output_norm.weight" in checkpoints.load_checkpoint(root / "opt-norm" / "checkpoint.pt")["model"]
    model, config = train.load_student(runs["eq"] / "checkpoint.pt")
    assert model.output_norm is not None and config.min_steps == 2


# -- nfe-study --------------------------------------------------------------------------------
def test_target_summaries_by_hand():
    assert nfe_study.first_at_or_below([0.5, 0.1, 1e-3, 1e-4], 1e-3) == 3
    assert nfe_study.first_at_or_below([0.5, 0.1], 1e-3) is None
    assert nfe_study.largest_drop([20.0, 22.0, 21.5, 23.0, 22.0]) == 1.0
    assert nfe_study.largest_drop([1.0, 2.0, 3.0]) == 0.0
    assert nfe_study.largest_drop([3.0, 2.0, 2.5, 1.0], higher_is_better=False) == 0.5
    assert nfe_study.largest_drop([1.0, float("nan")]) == math.inf


def test_nfe_study_measures_what_the_model_returns(setup, tmp_path):
    root, _, runs = setup
    config = nfe_study.NfeStudyConfig(runs=[str(runs["paper"]), str(runs["eq"])], heldout=str(root / "heldout"),
                                      out=str(tmp_path / "study"), nfe_max=4, fd=False, batch=5)
    result = nfe_study.study(config)
    assert [s["label"] for s in result["students"]] == ["GET-Tiny/4 (paper)", "GET-Tiny/4 (eq)"]
    entry = result["students"][1]["solvers"]["Anderson"]
    assert len(entry["residual_mean"]) == 4 and len(entry["psnr"]) == 4 and "fd_digits" not in entry
    # the image at NFE k is what the student returns with max_steps=k from the same start
    model, _ = train.load_student(runs["eq"] / "checkpoint.pt")
    items = [pairs.PairDataset(root / "heldout")[i] for i in range(8)]
    noise, target = torch.stack([it[0] for it in items]), torch.stack([it[1] for it in items])
    labels = torch.stack([it[2] for it in items])
    z0 = torch.randn((8, 4, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for k in (1, 3):
            out = model(noise, labels, solver=deqkit.Anderson(), max_steps=k, z0=z0)
            assert entry["psnr"][k - 1] == pytest.approx(metrics.psnr(out.images, target), abs=1e-4)
    text = (tmp_path / "study" / "nfe_study.md").read_text()
    assert "| GET-Tiny/4 (eq) | Broyden |" in text and (tmp_path / "study" / "nfe_study.png").stat().st_size > 0
    assert json.loads((tmp_path / "study" / "nfe_study.json").read_text())["nfe"] == [1, 2, 3, 4]


@pytest.mark.parametrize("kw, message", [
    (dict(runs=[]), "--run is required"),
    (dict(nfe_max=0), r"nfe_max \(--nfe-max\): input should be greater than or equal to 1, got 0"),
    (dict(solvers=["newton"]), r"solver must be among .*got \['newton'\]"),
    (dict(residual_target=0.0), r"residual_target \(--residual-target\): input should be greater than 0"),
    (dict(num_heldout=0), r"num_heldout \(--num-heldout\): input should be greater than or equal to 2"),
    (dict(solvers=["newton_krylov"]), r"--solver newton_krylov \(nfe-study keeps every iterate through deqkit.Unrolled\)"),
])
def test_bad_nfe_study_settings_are_named(kw, message):
    base = dict(runs=["r"], heldout="h", out="o")
    base.update(kw)
    with pytest.raises(ValueError, match=message):
        nfe_study.NfeStudyConfig(**base)


def test_nfe_study_refuses_a_vit_and_training_pairs(setup, tmp_path, capsys):
    root, pair_dir, runs = setup
    vit = root / "vit"
    train.train(_config(pair_dir, vit, model="ViT-Tiny/4", steps=1), progress=False)
    assert run_cli(["nfe-study", "--run", str(vit), "--heldout", str(root / "heldout"), "--out", str(tmp_path / "s"),
                    "--nfe-max", "2", "--no-fd"]) == 1
    assert "nfe-study measures GET students, and ViT-Tiny/4 is not one" in capsys.readouterr().err
    assert run_cli(["nfe-study", "--run", str(runs["eq"]), "--heldout", str(pair_dir), "--out", str(tmp_path / "s"),
                    "--nfe-max", "2", "--no-fd"]) == 1
    assert "not held out" in capsys.readouterr().err


def test_nfe_study_options_change_what_is_measured(setup, tmp_path):
    root, _, runs = setup
    base = dict(runs=[str(runs["eq"])], heldout=str(root / "heldout"), nfe_max=2, fd=False, solvers=["fixed_point"])
    ema = nfe_study.study(nfe_study.NfeStudyConfig(out=str(tmp_path / "a"), **base))
    raw = nfe_study.study(nfe_study.NfeStudyConfig(out=str(tmp_path / "b"), ema=False, **base))
    few = nfe_study.study(nfe_study.NfeStudyConfig(out=str(tmp_path / "c"), num_heldout=3, seed=1, **base))
    psnr = [r["students"][0]["solvers"]["FixedPoint"]["psnr"] for r in (ema, raw, few)]
    assert psnr[0] != psnr[1] and psnr[0] != psnr[2] and few["n"] == 3
    assert "Raw (not EMA) weights" in (tmp_path / "b" / "nfe_study.md").read_text()
