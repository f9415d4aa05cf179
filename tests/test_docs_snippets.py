"""Every fenced python block in README.md and docs/ runs, so the docs cannot drift from the code."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _snippets():
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    for path in files:
        for i, match in enumerate(_BLOCK.finditer(path.read_text())):
            yield pytest.param(match.group(1), id=f"{path.relative_to(ROOT)}[{i}]")


SNIPPETS = list(_snippets())


def test_docs_have_snippets():
    assert len(SNIPPETS) >= 2


@pytest.mark.parametrize("code", SNIPPETS)
def test_snippet_runs(code, monkeypatch):
    module = types.ModuleType("docs_snippet")  # a real module, so dataclasses defined in it work
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(code, "<docs snippet>", "exec"), module.__dict__)
