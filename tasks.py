#!/usr/bin/env python3
"""The two quick-start commands: ``python3 tasks.py demo`` and ``python3 tasks.py test``.

Each creates ``.venv`` beside this file if needed, installs deqkit with the extras it needs,
and runs. Needs only Python >= 3.10 with pip and venv. Extra arguments go to the command
(``python3 tasks.py test -k anderson``, ``python3 tasks.py demo --quick``, which writes runs/demo-quick).
The demo is the GET distillation example end to end on the bundled digits.
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


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("demo", "test"):
        print(__doc__)
        return 2
    command, rest = argv[0], argv[1:]
    if command == "test":
        py = setup("dev")
        return subprocess.run([str(py), "-m", "pytest", *rest], cwd=ROOT).returncode
    py = setup("dev")
    return subprocess.run([str(py), "-m", "examples.get_distillation", "demo", *rest], cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
