"""deqkit is a typed package (PEP 561): type checkers see its annotations once it is installed.

Two checks with mypy:
- a user's code, with deqkit installed in a site-packages directory the way pip puts it there,
  type-checks under ``--strict`` and sees the public API's real types (not ``Any``, not
  "import-untyped");
- deqkit/ itself under the ``[tool.mypy]`` configuration of pyproject.toml (strict).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import textwrap
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("mypy", reason="mypy is part of the [dev] extra")

CONSUMER = textwrap.dedent('''
    from typing import assert_type

    import torch
    from torch import Tensor

    import deqkit


    def f(z: Tensor, x: Tensor) -> Tensor:
        return torch.tanh(0.5 * z + x)


    x = torch.randn(4, 3)
    sol = deqkit.fixed_point(f, torch.zeros(4, 3), inputs=(x,), solver=deqkit.Anderson(m=5),
                             backward=deqkit.Implicit(tol=1e-6), tol=1e-5)
    assert_type(sol, deqkit.Solution)
    assert_type(sol.value, Tensor)
    assert_type(sol.result, deqkit.Result)
    assert_type(sol.success, bool)
    assert_type(sol.trajectory, tuple[Tensor, ...])
    assert_type(sol.stats, deqkit.Stats)
    assert_type(sol.stats.nfev, int)
    assert_type(sol.stats.steps, Tensor)
    assert_type(sol.stats.residual, Tensor)
    assert_type(sol.stats.converged, Tensor)
    assert_type(sol.stats.trace, Tensor)
    assert_type(sol.stats.batch_size, int)
    assert_type(deqkit.Result.SUCCESS.message, str)

    solvers: list[deqkit.AbstractSolver] = [deqkit.FixedPoint(damping=0.9), deqkit.Anderson(m=5),
                                            deqkit.Broyden(memory=10), deqkit.NewtonKrylov()]
    modes: list[deqkit.AbstractBackward] = [deqkit.Implicit(), deqkit.Phantom(steps=5, tau=0.5),
                                            deqkit.Unrolled(checkpoint=True), deqkit.OneStep()]
    assert_type(deqkit.solvers.available(), list[str])

    class Cell(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(3, 3)

        def forward(self, z: Tensor, x: Tensor) -> Tensor:
            return torch.tanh(0.5 * self.lin(z) + x)

    deq = deqkit.DEQ(Cell(), solver=deqkit.FixedPoint(), backward=deqkit.OneStep())
    assert_type(deq.forward(x), deqkit.Solution)  # deq(x) is Any: torch types Module.__call__ so

    reg = deqkit.jacobian_reg(lambda z: f(z, x), torch.zeros(4, 3))
    assert_type(reg, deqkit.JacobianReg)
    assert_type(reg.mean, Tensor)
    assert_type(deqkit.spectral_radius(lambda z: f(z, x), torch.zeros(4, 3)), Tensor)
    assert_type(deqkit.fp_weights(3), list[float])
    assert_type(deqkit.fp_correction(lambda z: z.sum(), [x, x]), Tensor)

    try:
        deqkit.fixed_point(f, torch.zeros(4, 3), inputs=(x,))
    except deqkit.SolveError as err:
        assert_type(err.solution, deqkit.Solution)
''')


def _mypy(*args: str, cwd: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(cache), "--no-error-summary", *args],
                          cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mypy-cache")  # shared: torch is analysed once for both checks


def test_installed_deqkit_is_typed_for_its_users(tmp_path, cache):
    # An environment whose site-packages holds deqkit as pip installs it (the package folder,
    # py.typed included) and sees this environment's torch through a .pth file.
    env = tmp_path / "env"
    venv.EnvBuilder(with_pip=False).create(env)
    python = env / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    shutil.copytree(ROOT / "deqkit", site / "deqkit", ignore=shutil.ignore_patterns("__pycache__"))
    (site / "torch-env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    work = tmp_path / "user"
    work.mkdir()
    (work / "consumer.py").write_text(CONSUMER)
    proc = _mypy("--strict", "--python-executable", str(python), "consumer.py", cwd=work, cache=cache)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # and the marker is what makes it so: without it mypy refuses to read the package
    (site / "deqkit" / "py.typed").unlink()
    proc = _mypy("--strict", "--python-executable", str(python), "consumer.py", cwd=work, cache=cache)
    assert proc.returncode == 1 and "import-untyped" in proc.stdout, proc.stdout + proc.stderr


def test_deqkit_passes_mypy_strict(cache):
    proc = _mypy("--config-file", "pyproject.toml", cwd=ROOT, cache=cache)
    assert proc.returncode == 0, proc.stdout + proc.stderr
