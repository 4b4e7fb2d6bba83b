"""The integrations package: lazy public names; ``import modelbatch`` imports no extra."""

from __future__ import annotations

import subprocess
import sys

import pytest

import modelbatch.integrations as integrations
from modelbatch.integrations import require

OPTIONAL = (
    "lightning", "pytorch_lightning", "transformers", "accelerate", "optuna", "ray", "wandb",
    "tensorboard",
)  # fmt: skip


def test_import_modelbatch_imports_no_optional_library() -> None:
    code = (
        "import sys, modelbatch, modelbatch.integrations, modelbatch.optim\n"
        f"print(sorted(m for m in {OPTIONAL!r} if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]"


def test_require_names_the_extra() -> None:
    assert require("json", "demo").__name__ == "json"
    with pytest.raises(ImportError, match=r"the ModelBatch repository: pip install -e '\.\[foo\]'"):
        require("modelbatch_no_such_module", "foo")


def test_public_names_resolve_lazily() -> None:
    pytest.importorskip("lightning")
    from modelbatch.integrations.lightning import BatchLightningModule

    assert integrations.BatchLightningModule is BatchLightningModule
    assert "BundledTrainer" in dir(integrations)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = integrations.nope
