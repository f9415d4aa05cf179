"""Release packaging: the sdist and the wheel that ``python -m build`` makes from a checkout.

The build runs without isolation (the setuptools of this environment, nothing downloaded, torch
not reinstalled) in a copy of the checkout, so the repository is left as it was.
"""

from __future__ import annotations

import ast
import email.parser
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _version() -> str:
    """deqkit.__version__, read the way setuptools' ``attr:`` reads it: statically."""
    tree = ast.parse((ROOT / "deqkit" / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__version__" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("deqkit/__init__.py sets no __version__")


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> dict[str, Path]:
    pytest.importorskip("build", reason="build is part of the [dev] extra")
    src = tmp_path_factory.mktemp("checkout")
    ignore = shutil.ignore_patterns(".git", ".venv", "runs", "site", "build", "dist", "*.egg-info", "__pycache__",
                                    ".pytest_cache", ".hypothesis", ".mypy_cache")
    shutil.copytree(ROOT, src, ignore=ignore, dirs_exist_ok=True)
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = out.glob("*.whl")
    (sdist,) = out.glob("*.tar.gz")
    return {"wheel": wheel, "sdist": sdist}


def _wheel_metadata(wheel: Path):
    with zipfile.ZipFile(wheel) as zf:
        (name,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        return email.parser.Parser().parsestr(zf.read(name).decode())


def test_version_is_written_once():
    assert "version" not in PYPROJECT["project"], "the version lives in deqkit/__init__.py only"
    assert "version" in PYPROJECT["project"]["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "deqkit.__version__"}


def test_torchdeq_extra_is_a_range_tested_at_its_lower_bound():
    extras = PYPROJECT["project"]["optional-dependencies"]
    (spec,) = extras["torchdeq"]
    lower = re.search(r">=\s*([\w.]+)", spec)
    assert lower and re.search(r"<\s*[\w.]+", spec), f"want a range with an upper bound, got {spec!r}"
    assert f"torchdeq=={lower.group(1)}" in extras["dev"], "the [dev] extra must pin the lower bound of [torchdeq]"


def test_wheel_contents_and_metadata(dist):
    with zipfile.ZipFile(dist["wheel"]) as zf:
        names = set(zf.namelist())
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "deqkit").rglob("*.py")}
    assert sources <= names, sorted(sources - names)
    assert "deqkit/py.typed" in names, "PEP 561 marker missing: type checkers would treat deqkit as untyped"
    packaged = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert packaged == {"deqkit"}, packaged  # no tests, examples or benchmarks in the wheel
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)

    meta = _wheel_metadata(dist["wheel"])
    assert meta["Name"] == "deqkit" and meta["Version"] == _version()
    assert meta["License-Expression"] == "MIT"
    assert meta.get_all("License-File") == ["LICENSE"]
    classifiers = meta.get_all("Classifier")
    assert "Typing :: Typed" in classifiers
    assert not [c for c in classifiers if c.startswith("License ::")], "license classifiers conflict with License-Expression"
    minimum = re.fullmatch(r">=\s*3\.(\d+)", meta["Requires-Python"])
    assert minimum, meta["Requires-Python"]
    versions = sorted(int(c.rsplit(".", 1)[1]) for c in classifiers if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c))
    assert versions and versions[0] == int(minimum.group(1)), (versions, meta["Requires-Python"])
    requires = meta.get_all("Requires-Dist")
    runtime = [r for r in requires if "extra ==" not in r]
    assert sorted(re.match(r"[\w-]+", r).group(0) for r in runtime) == ["numpy", "torch"]
    assert any(r.startswith("torchvision") and 'extra == "fid"' in r for r in requires), "the fid extra needs torchvision"


def test_sdist_is_the_library_without_a_partial_test_suite(dist):
    with tarfile.open(dist["sdist"]) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    top = {n.split("/")[0] for n in names}
    assert {"deqkit", "pyproject.toml", "README.md", "LICENSE"} <= top
    assert "deqkit/py.typed" in names
    # Either the whole suite with everything it imports, or none of it: here, none.
    assert not top & {"tests", "examples", "benchmarks", "docs"}, sorted(top)


def test_twine_check(dist):
    pytest.importorskip("twine", reason="twine is part of the [dev] extra")
    proc = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", str(dist["wheel"]), str(dist["sdist"])],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
