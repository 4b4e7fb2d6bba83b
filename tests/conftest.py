"""Shared test configuration.

* The vmap slow-path fallback is switched into an error for the whole suite, so an op
  without a batching rule cannot silently fall back to a Python loop over models.
* ``cuda`` marker: tests that need a GPU skip with a readable reason on CPU-only machines.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _vmap_fallback_is_an_error():
    torch._C._functorch._set_vmap_fallback_enabled(False)
    try:
        yield
    finally:
        torch._C._functorch._set_vmap_fallback_enabled(True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
