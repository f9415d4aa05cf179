"""The API reference documents the whole public API, members included."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import deqkit

ROOT = Path(__file__).resolve().parents[1]
API = (ROOT / "docs" / "api.md").read_text()


def test_every_public_name_is_in_the_api_reference():
    documented = set(re.findall(r"^::: deqkit\.(\w+)", API, re.M))
    public = {name for name in deqkit.__all__ if name not in ("nn", "solvers")}
    assert public <= documented, sorted(public - documented)


def test_public_members_render(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is part of the [dev] extra")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    html = (tmp_path / "site" / "api" / "index.html").read_text()
    anchors = set(re.findall(r'id="(deqkit\.[\w.]+)"', html))
    for cls in (deqkit.Solution, deqkit.Stats):
        members = {f.name for f in dataclasses.fields(cls)}
        members |= {name for name, m in vars(cls).items() if isinstance(m, property) and not name.startswith("_")}
        assert {"success", "batch_size"} & members
        for name in members:
            assert f"deqkit.{cls.__name__}.{name}" in anchors, f"{cls.__name__}.{name} missing from the API reference"
    assert "deqkit.Solution.__repr__" not in anchors  # no dunder noise
