"""Teacher: EDM preconditioning (edm.py), loss, exact resume, CLI, adapters (VP epsilon, EDM pickles)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from examples.get_distillation import __main__ as cli
from examples.get_distillation import adapters, edm
from examples.get_distillation import teacher as T


class Recorder(nn.Module):
    num_classes = None

    def forward(self, x, c_noise, labels=None):
        self.seen = (x.clone(), c_noise.clone())
        return torch.full_like(x, 3.0)


def test_edm_preconditioning_coefficients():
    D = edm.EDMDenoiser(Recorder(), sigma_data=0.5)
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    sigma = torch.tensor([0.1, 7.0], dtype=torch.float64)
    out = D(x, sigma)
    for b, s in enumerate(sigma.tolist()):
        c_skip = 0.25 / (s**2 + 0.25)
        c_out = s * 0.5 / math.sqrt(s**2 + 0.25)
        c_in = 1 / math.sqrt(s**2 + 0.25)
        torch.testing.assert_close(out[b], c_skip * x[b] + c_out * 3.0)
        torch.testing.assert_close(D.backbone.seen[0][b].double(), c_in * x[b], rtol=1e-6, atol=1e-6)
        assert D.backbone.seen[1][b].item() == pytest.approx(math.log(s) / 4, rel=1e-6)


def _config(tmp_path, **kw):
    base = dict(out=str(tmp_path), preset="tiny", steps=6, batch=16, ckpt_every=100, sample_every=0, warmup=1)
    base.update(kw)
    return T.TeacherConfig(**base)


def test_loss_decreases_in_a_few_steps(tmp_path):
    losses = T.train(_config(tmp_path, steps=30, batch=32, lr=3e-3), progress=False)["losses"]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5


def test_resume_after_a_kill_ends_exactly_where_an_uninterrupted_run_does(tmp_path):
    T.train(_config(tmp_path / "straight", steps=6), progress=False)
    T.train(_config(tmp_path / "killed", steps=3), progress=False)  # "killed" after 3 steps
    result = T.train(_config(tmp_path / "killed", steps=6), progress=False)
    assert result["step"] == 6 and len(result["losses"]) == 3
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    assert torch.equal(a["rng"], b["rng"])
    with pytest.raises(ValueError, match="different config"):
        T.train(_config(tmp_path / "killed", steps=8, lr=1.0), progress=False)


def test_checkpoint_loads_as_a_denoiser_and_grids_are_written(tmp_path):
    T.train(_config(tmp_path, steps=2, sample_every=2, sample_steps=2), progress=False)
    assert (tmp_path / "samples" / "step_0000002.png").is_file()
    assert json.loads((tmp_path / "config.json").read_text())["preset"] == "tiny"
    D, info = T.load_teacher(tmp_path / "checkpoint.pt")
    assert info["num_classes"] == 10 and info["step"] == 2 and info["image_size"] == 8
    out = D(torch.randn(3, 1, 8, 8), torch.ones(3), torch.arange(3))
    assert out.shape == (3, 1, 8, 8)
    with pytest.raises(ValueError, match="class-conditional"):
        D(torch.randn(3, 1, 8, 8), torch.ones(3))


def test_cli_dry_run_and_help(capsys):
    assert cli.main(["teacher", "--dry-run", "--uncond", "--steps", "7"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["cond"] is False and printed["steps"] == 7
    for sub in ("teacher", "pairs"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([sub, "--help"])
        assert exit_info.value.code == 0
    assert "--shard-size" in capsys.readouterr().out


class TinyEps(nn.Module):
    """Stands in for a diffusers UNet: eps(x, t) with a .sample output."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x, t, class_labels=None):
        self.t = t
        out = self.conv(x) + t.float()[:, None, None, None] / 1000

        class Output:
            sample = out
        return Output()


def test_epsilon_vp_adapter_follows_the_vp_conversion():
    torch.manual_seed(0)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    model = TinyEps()
    D = adapters.EpsilonVPDenoiser(model, alphas_cumprod)
    sig_t = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()
    sigma = sig_t[[10, 500]].float()
    x = torch.randn(2, 1, 5, 5)
    out = D(x, sigma)
    assert model.t.tolist() == [10, 500]
    s = sigma[:, None, None, None]
    with torch.no_grad():
        eps = model(x / (1 + s**2).sqrt(), torch.tensor([10, 500])).sample
    torch.testing.assert_close(out, x - s * eps)
    # interpolation: a sigma between two table entries gets a fractional timestep
    Di = adapters.EpsilonVPDenoiser(model, alphas_cumprod, interpolate=True)
    mid = ((sig_t[100].log() + sig_t[101].log()) / 2).exp().float()
    Di(x[:1], mid.reshape(1))
    assert 100 < model.t.item() < 101
    with pytest.raises(ValueError, match="alphas_cumprod"):
        adapters.EpsilonVPDenoiser(model, torch.tensor([0.5, 0.9]))


def test_edm_pickle_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="EDM pickle not found"):
        adapters.load_edm_pickle(tmp_path / "edm.pkl", trust=True)
    (tmp_path / "edm.pkl").write_bytes(b"not really")
    with pytest.raises(ImportError, match="PYTHONPATH"):
        adapters.load_edm_pickle(tmp_path / "edm.pkl", trust=True)


# -- validation up front, locks, non-checkpoint files, moved folders, non-finite loss --


@pytest.mark.parametrize("argv, message", [
    (["--ema-decay", "-3"], "ema_decay (--ema-decay): input should be greater than or equal to 0, got -3.0"),
    (["--sample-steps", "0"], "sample_steps (--sample-steps): input should be greater than or equal to 1, got 0"),
    (["--lr", "inf"], "lr (--lr): input should be a finite number, got inf"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "tpu:0"], "--device"),
])
def test_bad_teacher_settings_fail_before_training_with_a_named_error(tmp_path, capsys, argv, message):
    assert cli.main(["teacher", "--out", str(tmp_path / "t"), "--steps", "1", *argv]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "t" / "checkpoint.pt").exists()


def test_a_file_that_is_not_a_teacher_checkpoint_is_named(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="notes.txt' is not a torch checkpoint"):
        T.load_teacher(tmp_path / "notes.txt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a teacher checkpoint"):
        T.load_teacher(tmp_path / "other.pt")
    assert cli.main(["pairs", "--teacher", str(tmp_path / "other.pt"), "--out", str(tmp_path / "p")]) == 1
    assert "not a teacher checkpoint" in capsys.readouterr().err


def test_a_moved_teacher_run_resumes(tmp_path):
    import shutil

    T.train(_config(tmp_path / "a", steps=2), progress=False)
    shutil.move(tmp_path / "a", tmp_path / "b")
    assert T.train(_config(tmp_path / "b", steps=3), progress=False)["step"] == 3


def test_a_teacher_run_folder_is_locked_and_a_nan_loss_stops_it(tmp_path, monkeypatch, hold_lock):
    from examples.get_distillation import locks

    holder = hold_lock(tmp_path / "t")
    with pytest.raises(locks.FolderLocked, match=f"process {holder.pid} on"):
        T.train(_config(tmp_path / "t", steps=1), progress=False)
    assert not (tmp_path / "t" / "checkpoint.pt").exists()
    holder.kill()
    holder.wait()
    T.train(_config(tmp_path / "t", steps=1, ckpt_every=1), progress=False)
    before = (tmp_path / "t" / "checkpoint.pt").read_bytes()
    monkeypatch.setattr(T, "edm_loss", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(T.TrainingDiverged, match="step 2: the loss is nan"):
        T.train(_config(tmp_path / "t", steps=3, ckpt_every=1), progress=False)
    assert (tmp_path / "t" / "checkpoint.pt").read_bytes() == before
