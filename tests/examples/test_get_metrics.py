"""Metrics: cached feature classifier, Frechet distance, KID, PSNR, digits report, FID error paths."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch

from examples.get_distillation import data, metrics


def test_classifier_is_cached_and_loads_with_weights_only(tmp_path):
    a = metrics.load_digits_classifier(tmp_path, steps=20)
    files = sorted(p.name for p in tmp_path.iterdir())
    name = "digits-classifier-split0-steps20-seed0-threads1.pt"  # keyed by what makes its weights
    assert files == [name, name + ".sha256"]
    b = metrics.load_digits_classifier(tmp_path, steps=20)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    feats, preds = metrics.classifier_outputs(b, data.load_digits("test").images[:10])
    assert feats.shape == (10, metrics.FEATURE_DIM) and preds.shape == (10,)
    with pytest.raises(ValueError, match=r"\(N, 1, 8, 8\)"):
        metrics.classifier_outputs(b, torch.zeros(2, 3, 8, 8))


def test_frechet_distance_matches_closed_forms():
    rng = np.random.RandomState(0)
    a = rng.randn(500, 8) @ rng.randn(8, 8)
    assert metrics.frechet_distance(a, a) == pytest.approx(0, abs=1e-6)
    shift = np.arange(8.0)
    assert metrics.frechet_distance(a, a + shift) == pytest.approx(shift @ shift, rel=1e-6)
    # b = 2a: Tr(S + 4S - 2 * 2S) = Tr(S), plus the mean difference
    cov = np.cov(a, rowvar=False)
    mean = a.mean(0)
    assert metrics.frechet_distance(a, 2 * a) == pytest.approx(np.trace(cov) + mean @ mean, rel=1e-5)
    with pytest.raises(ValueError, match="equal D"):
        metrics.frechet_distance(a, a[:, :3])


def test_mse_and_psnr():
    a = torch.zeros(2, 1, 4, 4)
    b = torch.full((2, 1, 4, 4), 0.2)
    assert metrics.mse(a, b) == pytest.approx(0.04)
    assert metrics.psnr(a, b) == pytest.approx(10 * np.log10(4 / 0.04))
    assert metrics.psnr(a, a) == float("inf")
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.mse(a, b[:1])


def test_digits_report_of_real_held_out_digits_sits_at_the_floor(tmp_path):
    held = data.load_digits("test")
    report = metrics.digits_report(held.images[:200], held.labels[:200], cache_dir=tmp_path, classifier_steps=150)
    assert report["n"] == 200 and report["floor_kind"] == "held-out"
    assert report["class_accuracy"] > 0.8
    noise = torch.rand(200, 1, 8, 8) * 2 - 1
    bad = metrics.digits_report(noise, None, cache_dir=tmp_path, classifier_steps=150)
    assert bad["fd_digits"] > 3 * report["fd_digits"] and "class_accuracy" not in bad


def test_fid_inception_errors_name_the_package_and_the_file(tmp_path, monkeypatch):
    images = torch.zeros(2, 3, 32, 32)
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    with pytest.raises(ImportError, match="torch-fidelity"):
        metrics.fid_inception(images, images, tmp_path / "inception.pth")
    fake = types.ModuleType("torch_fidelity")
    sub = types.ModuleType("torch_fidelity.feature_extractor_inceptionv3")
    sub.FeatureExtractorInceptionV3 = object
    monkeypatch.setitem(sys.modules, "torch_fidelity", fake)
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", sub)
    with pytest.raises(FileNotFoundError, match="Inception weights not found"):
        metrics.fid_inception(images, images, tmp_path / "inception.pth")


def test_the_classifier_is_the_same_whatever_the_threads_of_the_process():
    # FD-digits compares features of this classifier: trained with one thread whatever the
    # process runs with, so figures do not move with the machine's core count
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        a = metrics.train_digits_classifier(steps=30)
        assert torch.get_num_threads() == 2  # restored
        torch.set_num_threads(1)
        b = metrics.train_digits_classifier(steps=30)
    finally:
        torch.set_num_threads(before)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
