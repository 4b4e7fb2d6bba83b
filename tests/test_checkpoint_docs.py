"""The code of docs/checkpoints.md and docs/data_routing.md runs as written: the ``python``
blocks of a page run in order, in one namespace, in a temporary folder."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["docs/checkpoints.md", "docs/data_routing.md"]


@pytest.mark.parametrize("page", PAGES)
def test_page_code_runs(page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / page).read_text(), flags=re.S)
    assert blocks
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"__name__": "__docs__"}
    for k, code in enumerate(blocks):
        exec(compile(code, f"{page} (block {k})", "exec"), namespace)
