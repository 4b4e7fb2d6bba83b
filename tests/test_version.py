"""The version is written once and sorts after the 0.1.0 prototype on the package index."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import modelbatch
from modelbatch._version import __version__

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")  # Python >= 3.11


def _release(version: str) -> tuple[int, ...]:
    match = re.match(r"(\d+(?:\.\d+)*)", version)
    assert match, version
    return tuple(int(p) for p in match.group(1).split("."))


def test_one_source_of_truth() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and project["project"]["dynamic"] == ["version"]
    attr = project["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == "modelbatch._version.__version__"
    assert modelbatch.__version__ == __version__


def test_sorts_after_the_prototype() -> None:
    # PEP 440: 0.1.0 < 0.2.0.dev0 (a development release of 0.2.0) < 0.2.0
    assert _release(__version__) > (0, 1, 0)
    assert re.fullmatch(r"\d+\.\d+\.\d+(\.dev\d+)?", __version__)
