"""The architecture zoo's case type and the list of case modules.

A :class:`Case` builds one tiny model (the zoo builds it N=3 times under different seeds),
its inputs and how to read its output. ``CASE_MODULES`` lists the modules whose ``CASES``
lists the zoo runs: add a module here to extend the zoo.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

#: Modules with a ``CASES: list[Case]`` (and optionally ``SKIPPED: dict[str, str]``,
#: name -> reason for architectures that cannot run here).
CASE_MODULES = [
    "tests.zoo.cases_torch",
    "tests.zoo.cases_recurrent",
    "tests.zoo.cases_transformers",
    "tests.zoo.cases_geometric",
    "tests.zoo.cases_vision",
]


@dataclass
class Case:
    """One architecture of the zoo.

    Attributes:
        name: test id.
        build: a fresh model (float32 or float64; the zoo converts it to float64).
        inputs: ``inputs(generator) -> tuple`` of shared ``[B, ...]`` inputs (float64
            tensors for floating inputs); with ``per_model`` the zoo stacks ``N`` draws.
        kwargs: keyword arguments for every forward call.
        select: picks the tensor to train on from the model's output (default: itself).
        optimizer: ``"sgd"`` (momentum 0.9) or ``"adam"``.
        per_model: feed per-model inputs ``[N, B, ...]`` instead of shared ones.
        steps: training steps.
        train: train-mode (True) or eval-mode (False) model.
    """

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator], tuple[Any, ...]]
    kwargs: dict[str, Any] = field(default_factory=dict)
    select: Callable[[Any], Tensor] = lambda out: out
    optimizer: str = "sgd"
    per_model: bool = False
    steps: int = 3
    train: bool = True


def all_cases() -> tuple[list[Case], dict[str, str]]:
    """Every case of every module in :data:`CASE_MODULES`, and the skipped ones."""
    cases: list[Case] = []
    skipped: dict[str, str] = {}
    for name in CASE_MODULES:
        module = importlib.import_module(name)
        cases.extend(module.CASES)
        skipped.update(getattr(module, "SKIPPED", {}))
    return cases, skipped
