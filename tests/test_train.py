"""train_one_epoch / evaluate against the same models trained alone."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import modelbatch
from tests.helpers import assert_close_models, train_alone


def _setup(n: int = 3) -> tuple[list[nn.Module], DataLoader]:
    torch.manual_seed(0)
    models = [
        nn.Sequential(
            nn.Linear(4, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)
        ).double()
        for _ in range(n)
    ]
    x = torch.randn(40, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (40,))
    return models, DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)


def test_train_one_epoch_equals_training_alone() -> None:
    models, loader = _setup()
    batch = modelbatch.ModelBatch([copy.deepcopy(m) for m in models])
    opt = modelbatch.optim.SGD(batch, lr=[0.1, 0.05, 0.01], momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    losses = modelbatch.train_one_epoch(batch, loader, opt, F.cross_entropy, scheduler=sched)
    assert losses.shape == (3,)
    expected = train_alone(
        models,
        lambda i, m: torch.optim.SGD(m.parameters(), lr=[0.1, 0.05, 0.01][i], momentum=0.9),
        list(loader),
        F.cross_entropy,
        make_scheduler=lambda i, o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    )
    assert_close_models(batch.extract_all(), expected, torch.float64)


def test_evaluate_matches_each_model() -> None:
    models, loader = _setup()
    batch = modelbatch.ModelBatch(models)
    result = modelbatch.evaluate(batch, loader, F.cross_entropy)
    assert batch.training  # mode restored
    for i, m in enumerate(models):
        m.eval()
        with torch.no_grad():
            x, y = loader.dataset.tensors  # type: ignore[attr-defined]
            acc = (m(x).argmax(-1) == y).double().mean()
            loss = F.cross_entropy(m(x), y)
        assert abs(result["accuracy"][i] - acc) < 1e-12
        assert abs(result["loss"][i] - loss) < 1e-12


def test_empty_loader_is_an_error() -> None:
    models, _ = _setup()
    batch = modelbatch.ModelBatch(models)
    opt = modelbatch.optim.SGD(batch, lr=0.1)
    with pytest.raises(ValueError, match="no batches"):
        modelbatch.train_one_epoch(batch, [], opt, F.cross_entropy)
