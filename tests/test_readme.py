"""The README's code is the code the tests run: every example file it embeds is quoted verbatim,
and the quickstart runs."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
# An embedded example is introduced by <!-- example: examples/NAME.py --> and a ```python block.
EMBEDDED = re.findall(r"<!-- example: (\S+) -->\s*```python\n(.*?)```", README, flags=re.S)


def test_readme_embeds_examples() -> None:
    assert any(path == "examples/quickstart.py" for path, _ in EMBEDDED)


@pytest.mark.parametrize(("path", "code"), EMBEDDED, ids=[p for p, _ in EMBEDDED])
def test_embedded_example_is_verbatim(path: str, code: str) -> None:
    assert (ROOT / path).read_text() == code, f"README's copy of {path} is out of date"


def test_readme_test_command_is_what_ci_runs() -> None:
    assert "make test" in README
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_quickstart_runs(capsys: pytest.CaptureFixture[str]) -> None:
    runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="__main__")
    assert "best lr" in capsys.readouterr().out
