"""The generic per-model path (any torch.optim optimizer): its hyper-parameters are checked
per model as the torch constructor checks them."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import modelbatch
from modelbatch.optim import SlowOptimizerWarning


def batch() -> modelbatch.ModelBatch:
    torch.manual_seed(0)
    return modelbatch.ModelBatch([nn.Linear(3, 2) for _ in range(3)])


@pytest.mark.parametrize(
    ("cls", "hp", "message"),
    [
        (torch.optim.Adagrad, {"lr": [0.1, -0.1, 0.1]}, r"model 1 \(id 1\).*Invalid learning rate"),
        (torch.optim.Adagrad, {"lr_decay": [0.0, 0.0, -1.0]}, r"model 2 \(id 2\).*lr_decay"),
        (torch.optim.RMSprop, {"alpha": [0.9, 0.9, -0.5]}, r"model 2 .*alpha"),
        (torch.optim.RMSprop, {"lr": ["0.1", 0.1, 0.1]}, r"model 0 \(id 0\)"),
    ],
)
def test_every_models_hyperparameters_are_validated(cls: type, hp: dict, message: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SlowOptimizerWarning)
        with pytest.raises((ValueError, TypeError), match=message):
            modelbatch.OptimizerFactory(cls, **hp).build(batch())


def test_valid_per_model_values_pass() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SlowOptimizerWarning)
        opt = modelbatch.OptimizerFactory(torch.optim.Adagrad, lr=[0.1, 0.2, 0.3]).build(batch())
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.2, 0.3]
