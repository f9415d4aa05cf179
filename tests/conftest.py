"""Shared tables of the deqkit test suite: the solvers every generic test runs over.

Warnings are errors (``filterwarnings = error`` in pyproject.toml). Problems live in
``tests/_zoo.py``.
"""

from __future__ import annotations

import pytest
import torch

import deqkit

# The tests use tiny tensors: extra threads only add scheduling noise (and, on some machines,
# long stalls in small matrix products).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _warn_always():
    """Make torch's once-per-process warnings fire every time, so no test depends on order."""
    before = torch.is_warn_always_enabled()
    torch.set_warn_always(True)
    yield
    torch.set_warn_always(before)

# The solver table: a new solver added here inherits every generic test.
SOLVERS = [
    pytest.param(deqkit.FixedPoint(), id="fixed_point"),
    pytest.param(deqkit.FixedPoint(damping=0.7), id="fixed_point_damped"),
    pytest.param(deqkit.Anderson(m=5), id="anderson"),
    pytest.param(deqkit.Broyden(memory=10), id="broyden"),
    pytest.param(deqkit.NewtonKrylov(krylov_dim=20, krylov_rtol=1e-6), id="newton_krylov"),
]

# Solvers whose per-sample arithmetic never looks at other samples, so that a sample takes the
# same number of steps in a batch as alone. (NewtonKrylov's GMRES runs until every sample of
# the batch meets krylov_rtol, so its steps may differ from a lone solve.)
PER_SAMPLE_SOLVERS = [
    pytest.param(deqkit.FixedPoint(), id="fixed_point"),
    pytest.param(deqkit.FixedPoint(damping=0.7), id="fixed_point_damped"),
    pytest.param(deqkit.Anderson(m=5), id="anderson"),
    pytest.param(deqkit.Broyden(memory=10), id="broyden"),
]


# The GET example's tests: a small pair set from a tiny teacher trained for one step.
def make_tiny_pairs(root, num: int, heun_steps: int = 4):
    """``num`` class-conditional 8x8 pairs in root/pairs (the teacher in root/teacher)."""
    from examples.get_distillation import fileio, pairs, teacher

    torch.manual_seed(0)
    cfg = teacher.TeacherConfig(out=str(root / "teacher"), preset="tiny", steps=1, batch=8, sample_every=0)
    teacher.train(cfg, progress=False)
    ckpt = root / "teacher" / "checkpoint.pt"
    denoiser, info = teacher.load_teacher(ckpt)
    pairs.generate_pairs(denoiser, root / "pairs", num, shard_size=32, batch_size=32, image_shape=(1, 8, 8),
                         num_classes=info["num_classes"], num_steps=heun_steps, teacher_hash=fileio.sha256_file(ckpt),
                         progress=False)
    return root / "pairs"


@pytest.fixture(scope="session")
def tiny_pairs():
    """make_tiny_pairs(root, num, heun_steps=4) -> the pair folder."""
    return make_tiny_pairs


@pytest.fixture
def hold_lock():
    """hold_lock(folder) -> a live process (Popen) holding the folder's lock until the test ends
    (or until the test kills it: the kernel then releases the lock, as after a crash)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    procs = []

    def start(folder):
        code = ("import sys; from examples.get_distillation import locks; locks.acquire(sys.argv[1]); "
                "print('locked', flush=True); sys.stdin.read()")  # holds until its stdin closes
        proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], cwd=root, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(root)))
        procs.append(proc)
        assert proc.stdout.readline().strip() == "locked"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()
        proc.stdin.close()
        proc.stdout.close()
