"""Shared pieces of the GET example's tests."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch

from examples.get_distillation import common, pairs, teacher


def make_tiny_pairs(root: Path, num: int, heun_steps: int = 4) -> Path:
    """``num`` class-conditional 8x8 pairs from a tiny teacher trained for one step, in root/pairs."""
    torch.manual_seed(0)
    cfg = teacher.TeacherConfig(out=str(root / "teacher"), preset="tiny", steps=1, batch=8, sample_every=0)
    teacher.train(cfg, progress=False)
    ckpt = root / "teacher" / "checkpoint.pt"
    denoiser, info = teacher.load_teacher(ckpt)
    pairs.generate_pairs(denoiser, root / "pairs", num, shard_size=32, batch_size=32, image_shape=(1, 8, 8),
                         num_classes=info["num_classes"], num_steps=heun_steps, teacher_hash=common.sha256_file(ckpt),
                         progress=False)
    return root / "pairs"


@pytest.fixture(scope="session")
def tiny_pairs() -> Callable[..., Path]:
    """make_tiny_pairs(root, num, heun_steps=4) -> the pair folder."""
    return make_tiny_pairs
