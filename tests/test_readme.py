"""The README's code is the code the tests run.

* Every example file the README embeds (``<!-- example: examples/X.py -->``) is quoted verbatim
  (the example files themselves are run by the tests of the module they show).
* Every other ``python`` block runs: the blocks of one ``##`` section run in order in one
  namespace (they build on each other), in a temporary folder. Blocks marked
  ``<!-- fragment ... -->`` are excerpts and are not run.
"""

from __future__ import annotations

import re
import runpy
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCK = re.compile(r"(<!-- (example|fragment)[^>]*-->\s*)?```python\n(.*?)```", flags=re.S)
EMBEDDED = re.findall(r"<!-- example: (\S+) -->\s*```python\n(.*?)```", README, flags=re.S)


def _runnable_sections() -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {}
    for chunk in re.split(r"^## ", README, flags=re.M)[1:]:
        title = chunk.splitlines()[0].strip()
        blocks = [m.group(3) for m in BLOCK.finditer(chunk) if m.group(2) is None]
        if blocks:
            sections[title] = blocks
    return sections


SECTIONS = _runnable_sections()


def test_readme_embeds_examples() -> None:
    paths = {path for path, _ in EMBEDDED}
    assert "examples/quickstart.py" in paths
    assert paths == {f"examples/{p.name}" for p in (ROOT / "examples").glob("*.py")}


@pytest.mark.parametrize(("path", "code"), EMBEDDED, ids=[p for p, _ in EMBEDDED])
def test_embedded_example_is_verbatim(path: str, code: str) -> None:
    assert (ROOT / path).read_text() == code, f"README's copy of {path} is out of date"


@pytest.mark.parametrize("title", list(SECTIONS))
def test_readme_section_code_runs(
    title: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"__name__": "__readme__"}
    for code in SECTIONS[title]:
        exec(compile(code, f"README.md ({title})", "exec"), namespace)


def test_readme_test_command_is_what_ci_runs() -> None:
    assert "make test" in README
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_quickstart_runs(capsys: pytest.CaptureFixture[str]) -> None:
    runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="__main__")
    assert "best lr" in capsys.readouterr().out
