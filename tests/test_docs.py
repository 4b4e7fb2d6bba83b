"""The README and the documentation site are tested like the code.

* Every ``python`` block of ``README.md`` and of every page under ``docs/`` runs: the blocks of
  one page in order, in one namespace, in a temporary folder. A block preceded by
  ``<!-- fragment ... -->`` is an excerpt and is not run.
* Every example file a page shows (``<!-- example: examples/X.py -->``) is quoted verbatim
  (the example files themselves are run by the tests of the module they show), and every
  example file is shown somewhere.
* ``mkdocs build --strict`` passes (skipped only where mkdocs is not installed; the ``dev``
  extra, which ``make test`` installs, has it), every page is in the navigation, and every
  public name of ``modelbatch`` is explained on a guide page, not only in the API reference.
"""

from __future__ import annotations

import importlib.util
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import modelbatch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
BLOCK = re.compile(r"(<!-- (example|fragment)[^>]*-->\s*)?```python\n(.*?)```", flags=re.S)
EXAMPLE = re.compile(r"<!-- example: (\S+) -->\s*```python\n(.*?)```", flags=re.S)


def _name(page: Path) -> str:
    return str(page.relative_to(ROOT))


def _runnable(page: Path) -> list[str]:
    return [m.group(3) for m in BLOCK.finditer(page.read_text()) if m.group(2) is None]


RUNNABLE = [p for p in PAGES if _runnable(p)]
EMBEDDED = [(_name(p), path, code) for p in PAGES for path, code in EXAMPLE.findall(p.read_text())]


@pytest.mark.parametrize("page", RUNNABLE, ids=_name)
def test_page_code_runs(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"__name__": "__docs__"}
    for code in _runnable(page):
        exec(compile(code, _name(page), "exec"), namespace)


@pytest.mark.parametrize(
    ("page", "path", "code"), EMBEDDED, ids=[f"{p}:{e}" for p, e, _ in EMBEDDED]
)
def test_embedded_example_is_verbatim(page: str, path: str, code: str) -> None:
    assert (ROOT / path).read_text() == code, f"{page}'s copy of {path} is out of date"


def test_every_example_is_shown() -> None:
    shown = {path for _, path, _ in EMBEDDED}
    assert {f"examples/{p.name}" for p in (ROOT / "examples").glob("*.py")} <= shown
    assert ("README.md", "examples/quickstart.py") in {(page, path) for page, path, _ in EMBEDDED}


def test_readme_is_short_and_its_test_command_is_what_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert "make test" in readme and "make demo" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_install_instructions_install_this_repository() -> None:
    """``pip install modelbatch`` would install the older prototype on the package index."""
    prototype = re.compile(r"pip install\s+['\"]?modelbatch\b")
    files = [*PAGES, *(ROOT / "examples").glob("*.py"), ROOT / "benchmarks" / "README.md"]
    files += [*(ROOT / "src" / "modelbatch").rglob("*.py")]
    offenders = [
        f"{f.relative_to(ROOT)}: {line.strip()}"
        for f in files
        for line in f.read_text().splitlines()
        if prototype.search(line) and "prototype" not in line  # a warning, not an instruction
    ]
    assert not offenders, f"'pip install modelbatch' installs the 0.1.0 prototype: {offenders}"


def test_quickstart_picks_its_best_model_on_held_out_data(
    capsys: pytest.CaptureFixture[str],
) -> None:
    runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert out.startswith("best lr ") and "validation accuracy" in out
    accuracy = float(re.findall(r"validation accuracy ([\d.]+)%", out)[0])
    assert accuracy > 30  # 10 classes: well above chance, so the choice means something


def _nav_pages(node: Any) -> list[str]:
    if isinstance(node, str):
        return [node] if node.endswith(".md") else []
    if isinstance(node, dict):
        return [p for v in node.values() for p in _nav_pages(v)]
    if isinstance(node, list):
        return [p for v in node for p in _nav_pages(v)]
    return []


def test_every_page_is_in_the_navigation() -> None:
    text = (ROOT / "mkdocs.yml").read_text()
    listed = set(re.findall(r":\s*([\w/.-]+\.md)\s*$", text, flags=re.M))
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert pages == listed, f"not in mkdocs.yml nav: {pages - listed}; missing: {listed - pages}"


def test_every_public_name_is_explained_on_a_guide_page() -> None:
    guides = "\n".join(p.read_text() for p in PAGES if "api" not in p.relative_to(ROOT).parts)
    missing = [
        name
        for name in modelbatch.__all__
        if name not in ("__version__", "optim") and not re.search(rf"\b{re.escape(name)}\b", guides)
    ]
    assert not missing, f"public names no guide page mentions: {missing}"
    for name in ("keep_positions", "sweep", "optimizer_cls=", "ArchitectureMismatchError"):
        assert name in guides


@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None,
    reason="mkdocs / mkdocstrings not installed (pip install -e '.[dev]')",
)
def test_docs_site_builds_strictly(tmp_path: Path) -> None:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "api" / "core" / "index.html").read_text().count("compute_loss") > 0
