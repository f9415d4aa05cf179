#!/usr/bin/env python3
"""The two quick-start commands: ``python3 tasks.py demo`` and ``python3 tasks.py test``.

Each creates ``.venv`` beside this file if needed, installs deqkit with the extras it needs,
and runs. Needs only Python >= 3.10 with pip and venv. Extra arguments go to the command
(``python3 tasks.py test -k anderson``, ``python3 tasks.py demo --quick``, which writes runs/demo-quick).
The demo is the GET distillation example end to end on the bundled digits. The tests run in
parallel processes (pytest-xdist), one per core up to 4; ``-n 0`` runs them in this process
(for ``--pdb`` or ``-s``).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
TORCH = "torch==2.13.0"  # the pinned release; a CPU build where one is available locally


def _python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _run(*args: str) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run(args, check=True, cwd=ROOT)


def setup(extras: str) -> Path:
    """Create the venv and install deqkit[extras]; skipped when nothing changed since last time."""
    if not _python().exists():
        venv.EnvBuilder(with_pip=True).create(VENV)
    py = str(_python())
    stamp = VENV / f".installed-{extras}"
    key = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + TORCH.encode()).hexdigest()
    if stamp.exists() and stamp.read_text() == key:
        return _python()
    has_torch = subprocess.run([py, "-c", "import torch"], capture_output=True).returncode == 0
    pip = [py, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    if not has_torch:
        _run(*pip, TORCH)
    _run(*pip, "-e", f".[{extras}]")
    stamp.write_text(key)
    return _python()


def pytest_args(rest: list[str], cpus: int | None = None) -> list[str]:
    """pytest's arguments: ``rest``, with ``-n <workers>`` unless it names a worker count or
    turns xdist off. Most tests are small, and many start a process and wait for it, so two
    workers on 2 cores run the suite in 450 s instead of 716 s."""
    cpus = os.cpu_count() if cpus is None else cpus
    chosen = any(a.startswith(("-n", "--numprocesses", "--dist")) for a in rest)
    off = any(a in ("no:xdist", "-pno:xdist") for a in rest)
    workers = min(cpus or 1, 4)
    if chosen or off or workers < 2:
        return list(rest)
    return ["-n", str(workers), *rest]


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("demo", "test"):
        print(__doc__)
        return 2
    command, rest = argv[0], argv[1:]
    if command == "test":
        py = setup("dev")
        return subprocess.run([str(py), "-m", "pytest", *pytest_args(rest)], cwd=ROOT).returncode
    py = setup("dev")
    return subprocess.run([str(py), "-m", "examples.get_distillation", "demo", *rest], cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
