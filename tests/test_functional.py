"""One model's forward with one model's slice of the stacked tensors
(:mod:`modelbatch._functional`): submodules under two names, buffers re-assigned in forward,
tensor attributes set in forward, activation checkpointing."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.utils.checkpoint as cp
from torch import Tensor, nn
from torch.func import functional_call, vmap

import modelbatch
from modelbatch._functional import checkpoint_runs_directly

N = 3


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        block = nn.Linear(4, 4)
        self.blocks = nn.ModuleList([block] * 3)

    def forward(self, x: Tensor) -> Tensor:
        for b in self.blocks:
            x = torch.tanh(b(x))
        return x


def test_torch_functional_call_breaks_on_a_module_under_two_names() -> None:
    # The PyTorch bug this module works around (pytorch#164759): if it is ever fixed, this
    # test says so and the workaround can be reconsidered.
    model = Tied()
    original = model.blocks[0].weight
    stacked = {k: torch.stack([v.detach()] * N) for k, v in model.named_parameters()}
    vmap(lambda p, x: functional_call(model, p, (x,)), in_dims=(0, None))(
        stacked, torch.randn(2, 4)
    )
    assert model.blocks[0].weight is not original  # left holding a per-model tensor
    with pytest.raises(RuntimeError, match="escaped"):
        model(torch.randn(2, 4))


def test_module_under_two_names_keeps_its_stacked_parameters() -> None:
    torch.manual_seed(0)
    models = [Tied().double() for _ in range(N)]
    batch = modelbatch.ModelBatch(models)
    before = {k: v.detach().clone() for k, v in batch.stacked_parameters()}
    x = torch.randn(5, 4, dtype=torch.float64)
    for _ in range(2):
        out = batch(x)
    for i, m in enumerate(models):
        torch.testing.assert_close(out[i], m(x), rtol=0, atol=1e-14)
    for k, v in batch.stacked_parameters():
        assert v.shape == before[k].shape
        assert torch.equal(v, before[k])
    assert not torch._C._functorch.is_batchedtensor(batch.stacked.blocks[0].weight)
    extracted = batch.extract(1)
    assert extracted.blocks[0] is extracted.blocks[2]  # still one module under three names
    assert torch.equal(extracted.blocks[2].weight, models[1].blocks[0].weight)


class EMA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.register_buffer("ema", torch.zeros(2))

    def forward(self, x: Tensor) -> Tensor:
        y = self.fc(x)
        self.ema = 0.5 * self.ema + 0.5 * y.detach().mean(0)
        return y


def test_buffer_reassigned_in_forward_is_written_back_per_model() -> None:
    torch.manual_seed(0)
    models = [EMA().double() for _ in range(N)]
    alone = copy.deepcopy(models)
    batch = modelbatch.ModelBatch(models)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(N, 4, 3, generator=g, dtype=torch.float64) for _ in range(3)]
    for x in xs:
        batch(x, per_model=True)
        for i, m in enumerate(alone):
            m(x[i])
    for i, m in enumerate(alone):
        torch.testing.assert_close(batch.stacked.ema[i], m.ema, rtol=1e-14, atol=0)
        assert torch.equal(batch.extract(i).ema, batch.stacked.ema[i])


@pytest.mark.parametrize("training", [True, False])
def test_reassigned_buffer_of_a_quarantined_model_does_not_change(training: bool) -> None:
    torch.manual_seed(0)
    batch = modelbatch.ModelBatch([EMA() for _ in range(N)]).train(training)
    batch.quarantine(1)
    batch(torch.randn(4, 3))
    assert torch.equal(batch.stacked.ema[1], torch.zeros(2))
    assert not torch.equal(batch.stacked.ema[0], torch.zeros(2))


class BadBuffer(nn.Module):
    def __init__(self, value: object) -> None:
        super().__init__()
        self.register_buffer("b", torch.zeros(2))
        self.value = value

    def forward(self, x: Tensor) -> Tensor:
        self.b = x.sum(0) if self.value == "shape" else self.value  # type: ignore[assignment]
        return x


def test_buffer_reassigned_with_another_shape_is_refused() -> None:
    batch = modelbatch.ModelBatch([BadBuffer("shape") for _ in range(N)])
    with pytest.raises(
        RuntimeError, match=r"buffer 'b' was re-assigned in forward with per-model shape \(3,\)"
    ):
        batch(torch.randn(4, 3))


class Cache(nn.Module):
    """Keeps a tensor computed from its weight as a plain attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.cached: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        self.cached = self.fc.weight * 2
        self.extra = self.fc.weight.sum()
        return x @ self.cached


def test_per_model_tensor_attributes_do_not_escape_the_forward() -> None:
    batch = modelbatch.ModelBatch([Cache() for _ in range(N)])
    batch(torch.randn(2, 3))
    assert batch.stacked.cached is None
    assert "extra" not in vars(batch.stacked)
    copy.deepcopy(batch)  # would fail on an escaped per-model tensor


class Checkpointed(nn.Module):
    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.block = nn.Linear(4, 4)
        self.reentrant = reentrant

    def forward(self, x: Tensor) -> Tensor:
        return cp.checkpoint(self.block, self.inp(x), use_reentrant=self.reentrant)


def test_checkpoint_patch_is_undone_after_forward_and_on_error() -> None:
    originals = (cp.CheckpointFunction, cp._checkpoint_without_reentrant_generator)
    with checkpoint_runs_directly(), checkpoint_runs_directly():
        assert cp.CheckpointFunction is not originals[0]
    assert (cp.CheckpointFunction, cp._checkpoint_without_reentrant_generator) == originals
    batch = modelbatch.ModelBatch([Checkpointed(False) for _ in range(N)])
    with pytest.raises(RuntimeError):
        batch(torch.randn(2, 5))  # wrong feature size
    assert (cp.CheckpointFunction, cp._checkpoint_without_reentrant_generator) == originals


def test_reentrant_checkpoint_without_grad_inputs_behaves_as_alone() -> None:
    # Alone, reentrant checkpoint gives the segment's parameters no gradient when no input
    # requires grad (and warns); the batch does the same.
    class Direct(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = nn.Linear(3, 2)
            self.other = nn.Linear(3, 2)

        def forward(self, x: Tensor) -> Tensor:
            return cp.checkpoint(self.block, x, use_reentrant=True) + self.other(x)

    model = Direct()
    with pytest.warns(UserWarning, match="None of the inputs have requires_grad=True"):
        model(torch.randn(2, 3)).sum().backward()
    assert model.block.weight.grad is None
    batch = modelbatch.ModelBatch([Direct() for _ in range(N)])
    with pytest.warns(UserWarning, match="None of the inputs have requires_grad=True"):
        batch(torch.randn(2, 3)).sum().backward()
    assert batch.stacked.block.weight.grad is None
    assert batch.stacked.other.weight.grad is not None


def test_old_weight_norm_model_can_be_batched_and_copied() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        models = [nn.utils.weight_norm(nn.Linear(3, 2)) for _ in range(N)]
    batch = modelbatch.ModelBatch(models)
    x = torch.randn(4, 3)
    out = batch(x)
    for i, m in enumerate(models):
        torch.testing.assert_close(out[i], m(x))
    copy.deepcopy(batch)


def test_a_batch_is_freed_after_its_forward() -> None:
    import gc
    import weakref

    batch = modelbatch.ModelBatch([nn.Linear(3, 3) for _ in range(N)])
    batch(torch.randn(2, 3))
    ref = weakref.ref(batch.stacked)
    del batch
    gc.collect()
    assert ref() is None
