"""docs/sweeps.md: every ``python`` block runs, in order, in one namespace, in a temporary
folder."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "sweeps.md"


def test_docs_sweeps_code_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("pandas")
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 4
    namespace: dict[str, Any] = {"__name__": "__docs__"}
    for code in blocks:
        exec(compile(code, str(DOC), "exec"), namespace)
    assert (tmp_path / "my_sweep" / "results.csv").is_file()
    assert (tmp_path / "my_sweep" / "sweep.png").is_file()
