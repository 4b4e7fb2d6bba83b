"""ModelBatch itself: stacking, forward, loss, extract/insert and the errors bad input gets."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modelbatch
from modelbatch import ArchitectureMismatchError, ModelBatch
from tests.helpers import rel_err


def mlp(d_in: int = 5, hidden: int = 7, bn: bool = True, dropout: float = 0.0) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(d_in, hidden, bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm1d(hidden))
    layers += [nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 3)]
    return nn.Sequential(*layers)


def models(n: int = 4, **kw: object) -> list[nn.Module]:
    torch.manual_seed(0)
    return [mlp(**kw).double() for _ in range(n)]  # type: ignore[arg-type]


# ------------------------------------------------------------------ stacking & module behaviour
def test_parameters_are_stacked_and_registered() -> None:
    ms = models(4)
    batch = ModelBatch(ms)
    assert len(batch) == 4
    params = dict(batch.named_parameters())
    assert params["stacked.0.weight"].shape == (4, 7, 5)
    assert torch.equal(params["stacked.0.weight"][2], ms[2][0].weight)
    sd = batch.state_dict()
    assert sd["stacked.1.running_mean"].shape == (4, 7)
    assert sd["stacked.1.num_batches_tracked"].shape == (4,)
    assert sd["active"].tolist() == [True] * 4
    # The originals are copied, not referenced.
    with torch.no_grad():
        ms[0][0].weight.add_(1.0)
    assert not torch.equal(params["stacked.0.weight"][0], ms[0][0].weight)


def test_to_dtype_and_train_eval_propagate() -> None:
    batch = ModelBatch(models(2)).float()
    assert all(p.dtype == torch.float32 for p in batch.parameters())
    batch.eval()
    assert not batch.stacked.training and not batch.extract(0).training
    batch.train()
    assert all(m.training for m in batch.stacked.modules())


@pytest.mark.parametrize("train", [True, False])
def test_forward_shared_input_matches_each_model(train: bool) -> None:
    ms = models(4)
    batch = ModelBatch(ms)
    batch.train(train)
    x = torch.randn(8, 5, dtype=torch.float64)
    out = batch(x)
    assert out.shape == (4, 8, 3)
    for i, m in enumerate(ms):
        m.train(train)
        ref = m(x)
        assert rel_err(out[i], ref) < 1e-12
        # Per-model BatchNorm running statistics updated exactly as for the model alone.
        assert rel_err(batch.stacked[1].running_var[i], m[1].running_var) < 1e-12
        assert batch.stacked[1].num_batches_tracked[i] == m[1].num_batches_tracked


def test_forward_per_model_inputs() -> None:
    ms = models(3)
    batch = ModelBatch(ms)
    x = torch.randn(3, 6, 5, dtype=torch.float64)
    out = batch(x, per_model=True)
    for i, m in enumerate(ms):
        assert rel_err(out[i], m(x[i])) < 1e-12


def test_per_model_input_with_wrong_leading_dim_is_an_error() -> None:
    batch = ModelBatch(models(3))
    with pytest.raises(ValueError, match=r"N=3 models, got shape \(4, 6, 5\)"):
        batch(torch.randn(4, 6, 5, dtype=torch.float64), per_model=True)


def test_dropout_masks_differ_between_models() -> None:
    torch.manual_seed(0)
    base = mlp(bn=False, dropout=0.5)
    batch = ModelBatch([copy.deepcopy(base) for _ in range(4)])
    out = batch(torch.randn(16, 5))
    assert not torch.allclose(out[0], out[1])  # same weights, different masks
    batch.eval()
    out = batch(torch.randn(16, 5))
    assert torch.allclose(out[0], out[1])  # eval: dropout off, identical models agree


def test_tied_weights_stay_tied() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.out = nn.Linear(4, 10, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.out(self.emb(t))

    batch = ModelBatch([Tied() for _ in range(3)])
    assert batch.stacked.out.weight is batch.stacked.emb.weight
    assert len(list(batch.parameters())) == 1
    out = batch(torch.randint(0, 10, (2, 5)))
    assert out.shape == (3, 2, 5, 10)


# ------------------------------------------------------------------ loss
def test_compute_loss_is_sum_and_gives_training_alone_gradients() -> None:
    ms = models(3)
    batch = ModelBatch(ms)
    x = torch.randn(8, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (8,))
    loss = batch.compute_loss(batch(x), y, F.cross_entropy)
    loss.backward()
    assert batch.latest_losses is not None and batch.latest_losses.shape == (3,)
    assert rel_err(loss, batch.latest_losses.sum()) < 1e-14
    grads = dict(batch.stacked_parameters())
    for i, m in enumerate(ms):
        li = F.cross_entropy(m(x), y)
        assert abs(li.item() - batch.latest_losses[i].item()) < 1e-12
        li.backward()
        assert rel_err(grads["0.weight"].grad[i], m[0].weight.grad) < 1e-12
        assert rel_err(grads["4.weight"].grad[i], m[4].weight.grad) < 1e-12


def test_compute_loss_with_mask_equals_training_on_the_subset() -> None:
    ms = models(3, bn=False)
    batch = ModelBatch(ms)
    x = torch.randn(10, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (10,))
    mask = torch.rand(3, 10, generator=torch.Generator().manual_seed(0)) > 0.4
    batch.compute_loss(batch(x), y, F.cross_entropy, mask=mask).backward()
    w = dict(batch.stacked_parameters())["0.weight"]
    for i, m in enumerate(ms):
        sel = mask[i]
        F.cross_entropy(m(x[sel]), y[sel]).backward()
        assert rel_err(w.grad[i], m[0].weight.grad) < 1e-12


def test_compute_loss_per_model_targets() -> None:
    ms = models(2, bn=False)
    batch = ModelBatch(ms)
    x = torch.randn(2, 4, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (2, 4))
    batch.compute_loss(batch(x, per_model=True), y, F.cross_entropy, per_model_targets=True)
    for i, m in enumerate(ms):
        assert abs(batch.latest_losses[i].item() - F.cross_entropy(m(x[i]), y[i]).item()) < 1e-12


def test_compute_loss_errors() -> None:
    batch = ModelBatch(models(3))
    out = batch(torch.randn(4, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="leading dimension of N=3"):
        batch.compute_loss(out[:2], torch.zeros(4, dtype=torch.long), F.cross_entropy)
    with pytest.raises(ValueError, match="scalar per model"):
        batch.compute_loss(
            out,
            torch.zeros(4, dtype=torch.long),
            lambda o, t: F.cross_entropy(o, t, reduction="none"),
        )
    with pytest.raises(ValueError, match=r"mask must have shape \[N, B\] = \[3, 4\]"):
        batch.compute_loss(
            out, torch.zeros(4, dtype=torch.long), F.cross_entropy, mask=torch.ones(2, 4)
        )


def test_metrics_one_dict_per_model() -> None:
    batch = ModelBatch(models(3), model_ids=["a", "b", "c"])
    out = batch(torch.randn(4, 5, dtype=torch.float64))
    batch.compute_loss(out, torch.zeros(4, dtype=torch.long), F.cross_entropy)
    batch.log_metric("val_acc", [0.5, 0.75, 1.0])
    rows = batch.metrics()
    assert [r["model_id"] for r in rows] == ["a", "b", "c"]
    assert rows[1]["val_acc"] == 0.75 and rows[1]["active"] is True
    assert isinstance(rows[2]["loss"], float)
    with pytest.raises(ValueError, match=r"metric 'x' needs one value per model, shape \[3\]"):
        batch.log_metric("x", [1.0, 2.0])


# ------------------------------------------------------------------ extract / insert
def test_extract_is_a_standalone_copy_with_current_weights() -> None:
    ms = models(3)
    batch = ModelBatch(ms)
    x = torch.randn(8, 5, dtype=torch.float64)
    batch(x)  # updates running stats
    m1 = batch.extract(1)
    assert type(m1) is nn.Sequential
    assert torch.equal(m1[1].running_mean, batch.stacked[1].running_mean[1])
    batch.eval()
    m1.eval()
    assert rel_err(batch(x)[1], m1(x)) < 1e-12
    with torch.no_grad():
        m1[0].weight.zero_()  # no aliasing into the batch
    assert batch.stacked[0].weight[1].abs().sum() > 0
    assert len(batch.extract_all()) == 3
    with pytest.raises(
        KeyError, match=r"no model with id 3 in this batch; valid ids are \[0, 1, 2\]"
    ):
        batch.extract(3)
    with pytest.raises(KeyError, match="no model with id -1"):
        batch.extract(-1)  # ids, not positions: no counting from the end


def test_insert_writes_one_slot() -> None:
    batch = ModelBatch(models(3))
    new = mlp().double()
    batch.insert(2, new)
    assert torch.equal(batch.stacked[0].weight[2], new[0].weight)
    assert not torch.equal(batch.stacked[0].weight[1], new[0].weight)
    with pytest.raises(ArchitectureMismatchError, match="cannot insert into model 0: the module"):
        batch.insert(0, mlp(hidden=8).double())


def test_insert_and_extract_after_changing_dtype() -> None:
    """The template used by insert/extract follows ``batch.float()`` (insert used to refuse
    every module after a dtype or device change: "model 0 has dtype torch.float64")."""
    batch = ModelBatch(models(3)).float()
    m = batch.extract(1)
    assert m[0].weight.dtype == torch.float32
    with torch.no_grad():
        m[0].weight.add_(1.0)
    batch.insert(1, m)
    assert torch.equal(batch.stacked[0].weight[1], m[0].weight)


def test_ids_accept_numpy_and_tensor_integers() -> None:
    batch = ModelBatch(models(3))
    best = torch.tensor([0.3, 0.1, 0.2]).argmin()  # what users pass: a 0-dim tensor
    assert torch.equal(batch.extract(best)[0].weight, batch.stacked[0].weight[1])
    assert torch.equal(batch.extract(np.int64(2))[0].weight, batch.stacked[0].weight[2])
    with pytest.raises(TypeError, match=r"must be an int or a str, got float; valid ids are"):
        batch.extract(1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="got bool"):
        batch.extract(True)
    batch.quarantine(np.int64(1))
    assert batch.active.tolist() == [True, False, True]


def test_sparse_embedding_trains_like_alone() -> None:
    """``nn.Embedding(sparse=True)`` used to fail in backward ("reshape is not implemented
    for sparse tensors"); the stacked copy now computes the (equal) dense gradient."""
    torch.manual_seed(0)
    ms = [nn.Sequential(nn.Embedding(10, 3, sparse=True), nn.Flatten(), nn.Linear(12, 2))
          for _ in range(3)]  # fmt: skip
    refs = copy.deepcopy(ms)
    batch = ModelBatch(ms)
    opt = modelbatch.optim.SGD(batch, lr=0.1)
    tokens = [torch.randint(0, 10, (5, 4)) for _ in range(3)]
    for t in tokens:
        opt.zero_grad()
        batch(t).pow(2).sum().backward()
        opt.step()
    for i, ref in enumerate(refs):
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
        for t in tokens:
            ref_opt.zero_grad()
            ref(t).pow(2).sum().backward()
            assert ref[0].weight.grad is not None and ref[0].weight.grad.is_sparse
            ref_opt.step()
        assert rel_err(batch.extract(i)[0].weight, ref[0].weight) < 1e-6
    assert batch.extract(0)[0].sparse


def test_quarantine_many_ids_at_once() -> None:
    batch = ModelBatch(models(4), model_ids=["a", "b", "c", "d"])
    batch.quarantine(["d", "b"])
    assert batch.active.tolist() == [True, False, True, False]
    batch.unquarantine(["b"])
    assert batch.active.tolist() == [True, True, True, False]
    with pytest.raises(KeyError, match="no model with id 'x'"):
        batch.quarantine(["a", "x"])
    assert batch.active.tolist() == [True, True, True, False]  # nothing changed


# ------------------------------------------------------------------ bad input
def test_empty_list() -> None:
    with pytest.raises(ValueError, match="at least one model"):
        ModelBatch([])


def test_different_architectures_name_model_and_parameter() -> None:
    ms = models(3)
    ms[2] = mlp(hidden=8).double()
    with pytest.raises(
        ArchitectureMismatchError, match=r"model 2, parameter '0.weight': shape \(8, 5\)"
    ):
        ModelBatch(ms)
    ms = models(3)
    ms[1] = nn.Sequential(
        nn.Linear(5, 7), nn.LayerNorm(7), nn.ReLU(), nn.Dropout(), nn.Linear(7, 3)
    )
    with pytest.raises(
        ArchitectureMismatchError, match="model 1 differs from model 0 in its module tree"
    ):
        ModelBatch(ms)


def test_different_dtypes_and_devices() -> None:
    ms = models(2)
    ms[1] = ms[1].float()
    with pytest.raises(
        ArchitectureMismatchError, match=r"model 1, parameter '0.weight'.*dtype torch.float32"
    ):
        ModelBatch(ms)
    ms = models(2)
    ms[1] = ms[1].to("meta")
    with pytest.raises(ArchitectureMismatchError, match="device meta"):
        ModelBatch(ms)


def test_same_object_twice_is_an_error() -> None:
    m = mlp()
    with pytest.raises(ValueError, match="model 1 is the same object"):
        ModelBatch([m, m])


def test_not_a_module() -> None:
    with pytest.raises(TypeError, match="model 1 is a str"):
        ModelBatch([mlp(), "nope"])  # type: ignore[list-item]


def test_wrong_length_hyperparameter_list() -> None:
    with pytest.raises(ValueError, match="'lr' has 2 per-model values for a batch of 3 models"):
        ModelBatch(models(3), [0.1, 0.2], torch.optim.SGD)


def test_model_ids_validation() -> None:
    with pytest.raises(ValueError, match="unique"):
        ModelBatch(models(2), model_ids=[1, 1])
    with pytest.raises(ValueError, match="model_ids has 1 entries for 2 models"):
        ModelBatch(models(2), model_ids=[1])
    batch = ModelBatch(models(2), model_ids=["x", "y"])
    with pytest.raises(KeyError, match="no model with id 'z'"):
        batch.index_of("z")


def test_public_api_is_pinned() -> None:
    assert set(modelbatch.__all__) >= {
        "ModelBatch",
        "OptimizerFactory",
        "train_one_epoch",
        "evaluate",
        "optim",
        "ArchitectureMismatchError",
    }
    for name in modelbatch.__all__:
        assert hasattr(modelbatch, name), name


def test_per_model_class_index_targets_are_recognised() -> None:
    """[N, B] integer targets for [N, B, C] outputs are per-model; [B] targets are shared."""
    ms = models(3, bn=False)
    batch = ModelBatch(ms)
    x = torch.randn(3, 6, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (3, 6))
    batch.compute_loss(batch(x, per_model=True), y, F.cross_entropy)
    for i, m in enumerate(ms):
        assert abs(batch.latest_losses[i].item() - F.cross_entropy(m(x[i]), y[i]).item()) < 1e-12
    # N == B: both readings fit the shape; never guessed (see tests/test_loss.py).
    batch4 = ModelBatch(models(4, bn=False))
    out = batch4(torch.randn(4, 5, dtype=torch.float64))  # [N=4, B=4, C=3]
    shared, per_model = torch.randint(0, 3, (4,)), torch.randint(0, 3, (4, 4))
    batch4.compute_loss(out, shared, F.cross_entropy)  # [B]: only the shared reading fits
    expect_shared = torch.stack([F.cross_entropy(out[i], shared) for i in range(4)])
    assert torch.allclose(batch4.latest_losses, expect_shared.detach())
    with pytest.raises(ValueError, match="ambiguous targets"):
        batch4.compute_loss(out, per_model, F.cross_entropy)
    batch4.compute_loss(out, per_model, F.cross_entropy, per_model_targets=True)
    expect_pm = torch.stack([F.cross_entropy(out[i], per_model[i]) for i in range(4)])
    assert torch.allclose(batch4.latest_losses, expect_pm.detach())
    # Soft (float) targets: shared [B, C] vs per-model [N, B, C].
    soft = torch.softmax(torch.randn(4, 4, 3, dtype=torch.float64), -1)
    batch4.compute_loss(out, soft, F.cross_entropy)
    expect_soft = torch.stack([F.cross_entropy(out[i], soft[i]) for i in range(4)])
    assert torch.allclose(batch4.latest_losses, expect_soft.detach())


def test_train_one_epoch_with_per_model_class_targets() -> None:
    ms = models(3, bn=False)
    batch = ModelBatch(ms)
    opt = modelbatch.optim.SGD(batch, lr=0.1)
    x = torch.randn(3, 8, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (3, 8))
    losses = modelbatch.train_one_epoch(batch, [(x, y)], opt, F.cross_entropy, per_model=True)
    for i, m in enumerate(ms):
        assert abs(losses[i].item() - F.cross_entropy(m(x[i]), y[i]).item()) < 1e-12


def test_forward_shape_error_says_what_the_models_received() -> None:
    batch = ModelBatch(models(3))
    with pytest.raises(RuntimeError, match=r"ModelBatch of 3 models; input shapes \[\(8, 6\)\]"):
        batch(torch.randn(8, 6, dtype=torch.float64))  # the models take 5 features
