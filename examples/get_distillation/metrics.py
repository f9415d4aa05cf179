"""Metrics that run at small scale without downloads, and standard FID where weights exist.

- A small conv classifier trained on the real digits train split (cached), whose 64-d
  penultimate features give "FD-digits" (:func:`frechet_distance`), and whose
  predictions give the class accuracy of conditional samples.
- :func:`mse` / :func:`psnr`: teacher-match error (images in [-1, 1], peak-to-peak 2).
- :func:`fid_inception`: standard FID through torch-fidelity, given a local weights file.

Frechet distances must be compared at equal N: the estimate is biased upward by a term that
shrinks with the sample count. Report the real-vs-real floor at the same N
(:func:`digits_report` does) and keep the feature dimension (64) well below N.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoints, data, runtime

FEATURE_DIM = 64


class DigitsClassifier(nn.Module):
    """Two conv layers and a 64-d feature layer, for 8x8 single-channel images in [-1, 1]."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 4 * 4, FEATURE_DIM)
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x))                   # (B, 32, 8, 8)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)  # (B, 64, 4, 4)
        return F.relu(self.fc(h.flatten(1)))        # (B, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))          # (B, classes)


def train_digits_classifier(steps: int = 600, seed: int = 0, batch: int = 64, lr: float = 1e-3) -> DigitsClassifier:
    """Train the feature classifier on the digits train split (small random shifts as
    augmentation), with one thread: its weights, and so every FD-digits, do not depend on the
    machine's core count."""
    with runtime.threads(1):
        return _train_classifier(steps, seed, batch, lr)


def _train_classifier(steps: int, seed: int, batch: int, lr: float) -> DigitsClassifier:
    images, labels, _ = data.load_digits("train")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitsClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        index = torch.randint(len(images), (batch,), generator=g)
        x = images[index]  # (B, 1, 8, 8)
        shift = torch.randint(-1, 2, (2,), generator=g).tolist()
        x = torch.roll(x, shifts=shift, dims=(2, 3))
        loss = F.cross_entropy(model(x), labels[index])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def load_digits_classifier(cache_dir: str | os.PathLike = "runs/cache", steps: int = 600, seed: int = 0) -> DigitsClassifier:
    """The feature classifier, trained once and cached under ``cache_dir`` (keyed by data, steps, seed)."""
    path = Path(cache_dir) / f"digits-classifier-split{data.DIGITS_SPLIT_SEED}-steps{steps}-seed{seed}-threads1.pt"
    model = DigitsClassifier()
    if path.is_file():
        model.load_state_dict(checkpoints.load_checkpoint(path)["model"])
        return model.eval()
    model = train_digits_classifier(steps=steps, seed=seed)
    checkpoints.save_checkpoint(path, {"model": model.state_dict(), "steps": steps, "seed": seed})
    return model


@torch.no_grad()
def classifier_outputs(model: DigitsClassifier, images: torch.Tensor, batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, 64) float64, predicted labels (N,)) of images (N, 1, 8, 8); inputs are clipped to [-1, 1]."""
    if images.ndim != 4 or tuple(images.shape[1:]) != (1, 8, 8):
        raise ValueError(f"images must be (N, 1, 8, 8), got {tuple(images.shape)}")
    feats, preds = [], []
    for chunk in images.float().clamp(-1, 1).split(batch):
        f = model.features(chunk)
        feats.append(f.double())
        preds.append(model.head(f).argmax(1))
    return torch.cat(feats), torch.cat(preds)


def frechet_distance(feats_a: np.ndarray | torch.Tensor, feats_b: np.ndarray | torch.Tensor, eps: float = 1e-6) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between two feature sets (N, D).

    Compare values only at equal N (the estimate grows as N shrinks); need N well above D.
    """
    import scipy.linalg

    a = np.asarray(feats_a, dtype=np.float64)
    b = np.asarray(feats_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"features must be (N, D) with equal D, got {a.shape} and {b.shape}")
    if min(len(a), len(b)) < 2:
        raise ValueError("need at least 2 samples per set")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        covmean = np.asarray(scipy.linalg.sqrtm(cov_a @ cov_b))
    if caught or not np.isfinite(covmean).all():
        # singular product (e.g. dead ReLU features): regularise both covariances slightly
        offset = np.eye(a.shape[1]) * eps
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            covmean = np.asarray(scipy.linalg.sqrtm((cov_a + offset) @ (cov_b + offset)))
    covmean = np.real(covmean)
    diff = mu_a - mu_b
    return float(max(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean), 0.0))


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean squared error between two image batches of the same shape."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float(((a.double() - b.double()) ** 2).mean())


def psnr(a: torch.Tensor, b: torch.Tensor, peak_to_peak: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB for images in [-1, 1] (peak-to-peak 2): 10 log10(pp^2 / MSE)."""
    err = mse(a, b)
    return float("inf") if err == 0 else float(10 * np.log10(peak_to_peak**2 / err))


def digits_report(images: torch.Tensor, labels: torch.Tensor | None = None, *, cache_dir: str | os.PathLike = "runs/cache",
                  seed: int = 0, classifier_steps: int = 600) -> dict[str, float]:
    """FD-digits and class accuracy of generated digits, with the real-vs-real floor at the same N.

    The reference is the train split (1,437 images). The floor compares N real images with it:
    the held-out split when N <= 360 (disjoint, the honest floor), otherwise N images drawn
    from all digits without replacement, which overlap the reference (an optimistic floor).
    """
    model = load_digits_classifier(cache_dir, steps=classifier_steps)
    ref = data.load_digits("train")
    held = data.load_digits("test")
    f_ref, _ = classifier_outputs(model, ref.images)
    f_gen, pred = classifier_outputs(model, images)
    n = len(images)
    if n <= len(held.images):
        real = held.images[torch.randperm(len(held.images), generator=torch.Generator().manual_seed(seed))[:n]]
        floor_kind = "held-out"
    else:
        pool = torch.cat([ref.images, held.images])
        real = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:n]]
        floor_kind = "all-digits (overlaps reference)"
    f_real, _ = classifier_outputs(model, real)
    _, held_pred = classifier_outputs(model, held.images)
    report = {"n": n, "fd_digits": frechet_distance(f_gen, f_ref), "fd_floor": frechet_distance(f_real, f_ref),
              "floor_kind": floor_kind, 
              "classifier_test_accuracy": float((held_pred == held.labels).double().mean())}
    if labels is not None:
        report["class_accuracy"] = float((pred.cpu() == labels.cpu()).double().mean())
    return report


def fid_inception(images_a: torch.Tensor, images_b: torch.Tensor, weights_path: str | os.PathLike) -> float:
    """Standard FID (Inception-v3 pool features) between two image sets in [-1, 1], (N, 3, H, W).

    Needs the ``torch-fidelity`` package (and its torchvision) and a local copy of the
    Inception weights file (pt_inception-2015-12-05-6726825d.pth) at ``weights_path``; no download.
    """
    weights_path = Path(weights_path)
    try:
        import torch_fidelity  # noqa: F401
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as exc:
        raise ImportError("fid_inception needs the 'torch-fidelity' package (with torchvision): "
                          "pip install 'deqkit[fid]' (or pip install torch-fidelity)") from exc
    if not weights_path.is_file():
        raise FileNotFoundError(f"Inception weights not found at {str(weights_path)!r} "
                                "(expected pt_inception-2015-12-05-6726825d.pth)")
    extractor = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                            feature_extractor_weights_path=str(weights_path)).eval()

    @torch.no_grad()
    def feats(x: torch.Tensor) -> np.ndarray:
        out = []
        for chunk in x.split(100):
            u8 = ((chunk.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (B, 3, H, W)
            out.append(extractor(u8)[0].double().cpu())
        return torch.cat(out).numpy()

    return frechet_distance(feats(images_a), feats(images_b))
