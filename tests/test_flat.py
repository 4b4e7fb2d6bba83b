"""Flat parameter storage (``modelbatch._flat``): every parameter of a batch is a leaf that
lives in one ``[N, P]`` tensor per dtype and device, through every operation that moves,
copies, shrinks or reloads the batch; tied parameters stay tied; frozen ones stay frozen."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import modelbatch
from modelbatch import ModelBatch
from tests.helpers import assert_close_models, train_alone


class Tied(nn.Module):
    """Embedding tied to the output layer, a frozen projection, a float64 scale."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.proj = nn.Linear(4, 4)
        self.proj.weight.requires_grad_(False)
        self.head = nn.Linear(4, 7, bias=False)
        self.head.weight = self.emb.weight
        self.scale = nn.Parameter(torch.ones(1, dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.proj(self.emb(x)))).mean(1) * self.scale.float()


def make(n: int = 3) -> list[nn.Module]:
    torch.manual_seed(0)
    return [Tied() for _ in range(n)]


def assert_flat(batch: ModelBatch) -> None:
    """Every parameter lives at its place in its storage; tied ones are one parameter."""
    storage = batch._flat_storage(check=False)
    assert storage.intact(batch.stacked)
    for g in storage.groups:
        assert g.flat.is_contiguous()
        for k, p in enumerate(g.params):
            assert p.is_leaf
            assert torch.equal(p.detach(), g.column_view(g.flat, k))
            # The same memory: a write into the storage is seen by the parameter.
            assert p.data_ptr() == g.flat[:, g.starts[k]].data_ptr()
    if isinstance(batch.stacked, Tied):
        assert batch.stacked.head.weight is batch.stacked.emb.weight


def test_one_storage_per_dtype_trainable_first() -> None:
    batch = ModelBatch(make())
    assert_flat(batch)
    groups = {g.dtype: g for g in batch._flat}
    assert set(groups) == {torch.float32, torch.float64}
    names = groups[torch.float32].names
    assert names == ["emb.weight", "proj.bias", "proj.weight"]  # frozen last, tied once
    assert groups[torch.float32].flat.shape == (3, 7 * 4 + 4 + 16)
    assert not batch.stacked.proj.weight.requires_grad


def test_backward_keeps_pytorch_grad_semantics_without_warnings() -> None:
    """Gradients are autograd's own (stolen, no layout warning: pytest turns warnings into
    errors); zero_grad(set_to_none=True) leaves None, set_to_none=False zeros in place."""
    batch = ModelBatch(make())
    opt = modelbatch.optim.Adam(batch, lr=0.1)
    x, y = torch.randint(0, 7, (5, 3)), torch.randint(0, 7, (5,))
    batch.compute_loss(batch(x), y, F.cross_entropy).backward()
    grads = {n: p.grad for n, p in batch.stacked_parameters()}
    assert grads["proj.weight"] is None and grads["emb.weight"] is not None
    g = batch.stacked.emb.weight.grad
    assert g is not None and g.is_contiguous()
    opt.zero_grad(set_to_none=False)
    assert batch.stacked.emb.weight.grad is g and not g.any()
    opt.zero_grad()
    assert all(p.grad is None for p in batch.parameters())


def test_training_with_tied_frozen_and_float64_parameters_equals_training_alone() -> None:
    models = make()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randint(0, 7, (5, 3), generator=g), torch.randint(0, 7, (5,), generator=g))
            for _ in range(3)]  # fmt: skip
    batch = ModelBatch(copy.deepcopy(models))
    opt = modelbatch.optim.AdamW(batch, lr=[0.01, 0.02, 0.03])
    for x, y in data:
        opt.zero_grad()
        batch.compute_loss(batch(x), y, F.cross_entropy).backward()
        opt.step()
    assert_flat(batch)
    expected = train_alone(
        models,
        lambda i, m: torch.optim.AdamW(
            [p for p in m.parameters() if p.requires_grad], lr=[0.01, 0.02, 0.03][i]
        ),
        data,
        F.cross_entropy,
    )
    assert_close_models(batch.extract_all(), expected, torch.float32, "tied")
    assert torch.equal(batch.extract(0).proj.weight, models[0].proj.weight)


def test_to_deepcopy_pickle_and_drop_keep_one_storage() -> None:
    batch = ModelBatch(make())
    weight = batch.stacked.emb.weight
    batch.double()
    assert batch.stacked.emb.weight is weight  # same Parameter object, as torch's .to()
    assert weight.dtype == torch.float64
    assert_flat(batch)
    assert [g.dtype for g in batch._flat] == [torch.float64]
    for copied in (copy.deepcopy(batch), pickle.loads(pickle.dumps(batch))):
        assert_flat(copied)
        for (n, a), (_, b) in zip(batch.stacked_parameters(), copied.stacked_parameters(),
                                  strict=True):  # fmt: skip
            assert torch.equal(a, b), n
    buffer = io.BytesIO()
    torch.save(batch.state_dict(), buffer)
    buffer.seek(0)
    fresh = ModelBatch(make()).double()
    fresh.load_state_dict(torch.load(buffer))
    assert_flat(fresh)
    assert torch.equal(fresh.stacked.emb.weight, batch.stacked.emb.weight)
    before = batch.stacked.emb.weight.detach().clone()
    batch.drop(1)
    assert_flat(batch)
    assert torch.equal(batch.stacked.emb.weight, before[[0, 2]])
    assert not batch.stacked.proj.weight.requires_grad


def test_optimizer_follows_drop_and_dtype_change() -> None:
    batch = ModelBatch(make())
    opt = modelbatch.optim.Adam(batch, lr=0.1)
    x, y = torch.randint(0, 7, (5, 3)), torch.randint(0, 7, (5,))
    for _ in range(2):
        opt.zero_grad()
        batch.compute_loss(batch(x), y, F.cross_entropy).backward()
        opt.step()
    exp_avg = opt.state["emb.weight"]["exp_avg"].clone()
    batch.drop(0)
    assert torch.equal(opt.state["emb.weight"]["exp_avg"], exp_avg[1:])
    batch.double()
    assert opt.state["emb.weight"]["exp_avg"].dtype == torch.float64
    opt.zero_grad()
    batch.compute_loss(batch(x), y, F.cross_entropy).backward()
    opt.step()
    assert opt.state["emb.weight"]["step"].tolist() == [3.0, 3.0]


@pytest.mark.parametrize("n", [1, 4])
def test_single_model_and_plain_batches(n: int) -> None:
    batch = ModelBatch([nn.Linear(3, 2) for _ in range(n)])
    assert_flat(batch)
    assert batch._flat.groups[0].flat.shape == (n, 8)


@pytest.mark.parametrize("opt_name", ["Adam", "SGD"])
def test_data_assignment_to_a_later_parameter_is_trained(opt_name: str) -> None:
    """``p.data = ...`` on a parameter that is not the first of its storage moves it out of
    the storage. The step checked only the first parameter's address, so it kept updating
    the storage's columns, which the parameter no longer read: silently never trained."""
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
              for _ in range(3)]  # fmt: skip
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(6, 4, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (6,), generator=g)) for _ in range(4)]  # fmt: skip
    cls = getattr(modelbatch.optim, opt_name)
    ref_cls = getattr(torch.optim, opt_name)
    batch = ModelBatch(copy.deepcopy(models))
    opt = cls(batch, lr=0.05)
    for k, (x, y) in enumerate(data):
        if k == 1:
            w = batch.stacked[2].weight
            w.data = w.data * 0.5
        opt.zero_grad()
        batch.compute_loss(batch(x), y, F.cross_entropy).backward()
        opt.step()
    assert_flat(batch)
    alone = []
    for m in models:
        m = copy.deepcopy(m)
        ref = ref_cls(m.parameters(), lr=0.05)
        for k, (x, y) in enumerate(data):
            if k == 1:
                m[2].weight.data = m[2].weight.data * 0.5
            ref.zero_grad()
            F.cross_entropy(m(x), y).backward()
            ref.step()
        alone.append(m)
    assert_close_models(batch.extract_all(), alone, torch.float64)
