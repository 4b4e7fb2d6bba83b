"""Per-model seeds: initialisation that depends only on each model's own seed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modelbatch import ModelBatch, derive_seeds, seeded_models
from modelbatch.seeding import check_seeds


def factory() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def test_model_i_init_depends_only_on_its_seed() -> None:
    a = seeded_models(factory, [11, 22, 33])
    b = seeded_models(factory, [99, 33, 5, 6, 7, 8, 11, 1])
    torch.manual_seed(33)
    alone = factory()
    ref = alone.state_dict().values()
    for (name, x), y, z in zip(
        a[2].state_dict().items(), b[1].state_dict().values(), ref, strict=True
    ):
        assert torch.equal(x, y), name
        assert torch.equal(x, z), name
    assert torch.equal(a[0][0].weight, b[6][0].weight)
    assert not torch.equal(a[0][0].weight, a[1][0].weight)


def test_global_rng_is_left_alone() -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    seeded_models(factory, [1, 2])
    assert torch.equal(torch.rand(3), expected)


def test_batch_of_seeded_models_is_n_independent() -> None:
    small = ModelBatch(seeded_models(factory, [1, 2, 3]))
    big = ModelBatch(seeded_models(factory, [7, 3, 1, 2]))
    x = torch.randn(5, 4)
    assert torch.allclose(small(x)[2], big(x)[1], rtol=0, atol=1e-6)


def test_derive_seeds_is_prefix_stable_and_distinct() -> None:
    three = derive_seeds(42, 3)
    eight = derive_seeds(42, 8)
    assert three == eight[:3]
    assert derive_seeds(42, 5, start=3) == eight[3:]
    assert len(set(eight)) == 8
    assert all(0 <= s < 2**63 for s in eight)
    assert derive_seeds(43, 3) != three
    with pytest.raises(ValueError, match="non-negative"):
        derive_seeds(0, -1)


def test_check_seeds_errors() -> None:
    assert check_seeds([1, 2], 2) == [1, 2]
    with pytest.raises(ValueError, match="got 3 seeds for 2 models"):
        check_seeds([1, 2, 3], 2)
    with pytest.raises(TypeError, match="seed of model 1 must be an int, got str"):
        check_seeds([1, "2"], 2)  # type: ignore[list-item]
    with pytest.raises(TypeError, match="must be an int, got bool"):
        check_seeds([True], 1)
    with pytest.raises(ValueError, match=r"seed of model 0 must lie in \[0, 2\*\*63\)"):
        check_seeds([2**63], 1)


class RecurrentWithDropout(nn.Module):
    """An LSTM with dropout between its layers, then a dropout layer: in a batch with
    seeds= both draw seeded masks, numbered in module order (the LSTM's gaps first)."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(3, 5, num_layers=3, dropout=0.4)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.rnn(x)[0]))


def test_use_seeded_dropout_reproduces_a_batch_with_recurrent_dropout() -> None:
    """use_seeded_dropout promises the masks model i draws in a batch built with
    seeds[i]: also for a recurrent layer's dropout between layers, and for the dropout
    layers after it (their layer numbers)."""
    import copy

    import torch.nn.functional as F

    from modelbatch import use_seeded_dropout
    from modelbatch.optim import SGD
    from tests.helpers import assert_close_models

    seeds = [5, 6]
    models = [m.double() for m in seeded_models(RecurrentWithDropout, seeds)]
    batch = ModelBatch(copy.deepcopy(models), seeds=seeds)
    opt = SGD(batch, lr=0.1)
    alone = [use_seeded_dropout(copy.deepcopy(m), s) for m, s in zip(models, seeds, strict=True)]
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in alone]
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(4, 2, 3, generator=g, dtype=torch.float64)
        y = torch.randn(4, 2, 2, generator=g, dtype=torch.float64)
        opt.zero_grad()
        batch.compute_loss(batch(x), y, F.mse_loss).backward()
        opt.step()
        for m, o in zip(alone, opts, strict=True):
            o.zero_grad()
            F.mse_loss(m(x), y).backward()
            o.step()
    assert_close_models(batch.extract_all(), alone, torch.float64, "seeded recurrent")
