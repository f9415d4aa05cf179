"""Every example in deqkit's docstrings runs and prints what it says, so the docs cannot drift."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest
import torch

import deqkit

MODULES = ["deqkit"] + sorted(m.name for m in pkgutil.walk_packages(deqkit.__path__, prefix="deqkit."))
OPTIONS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


@pytest.fixture(autouse=True)
def warn_always():
    """torch raises some warnings only once per process (e.g. float() of a tensor that requires
    grad); make them fire every time, so that an example's outcome does not depend on which
    test happened to trigger the warning first."""
    before = torch.is_warn_always_enabled()
    torch.set_warn_always(True)
    yield
    torch.set_warn_always(before)


def _examples(name: str) -> int:
    module = importlib.import_module(name)
    return sum(len(t.examples) for t in doctest.DocTestFinder().find(module, name))


def test_the_package_has_examples():
    counts = {name: _examples(name) for name in MODULES}
    assert sum(counts.values()) >= 10, counts
    for public in ("deqkit._solve", "deqkit.solvers._anderson", "deqkit.solvers._fixed_point",
                   "deqkit.solvers._broyden", "deqkit.solvers._newton_krylov"):
        assert counts[public] > 0, f"{public} has no docstring example"


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name):
    module = importlib.import_module(name)
    torch.manual_seed(0)
    result = doctest.testmod(module, optionflags=OPTIONS, report=True, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (see the output above)"
