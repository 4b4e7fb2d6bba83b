"""What cannot run under vmap gets an error naming the cause and the way out; the input
shape hint is kept for shape errors only."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

import modelbatch

N = 3


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        y = self.fc(x)
        if y.sum() > 0:  # depends on the model's weights
            return y
        return -y


class Item(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x) * self.fc.weight.abs().max().item()


class WithCache(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> tuple[Tensor, object]:
        return self.fc(x), object()  # e.g. a KV cache object


def _batch(cls: type[nn.Module]) -> modelbatch.ModelBatch:
    return modelbatch.ModelBatch([cls() for _ in range(N)])


def test_data_dependent_control_flow_is_named() -> None:
    with pytest.raises(
        RuntimeError, match=r"uses the value of a tensor in Python control flow"
    ) as e:
        _batch(Branchy)(torch.randn(2, 3))
    assert "torch.where" in str(e.value)
    assert "test_forward_errors.py" in str(e.value)  # the model's own line
    assert "`if y.sum() > 0:" in str(e.value)
    assert "single model accepts" not in str(e.value)


def test_item_is_named() -> None:
    with pytest.raises(RuntimeError, match=r"calls \.item\(\)") as e:
        _batch(Item)(torch.randn(2, 3))
    assert "keep it a tensor" in str(e.value)
    assert "single model accepts" not in str(e.value)


def test_non_tensor_output_is_named() -> None:
    with pytest.raises(TypeError, match=r"returned a object inside its output") as e:
        _batch(WithCache)(torch.randn(2, 3))
    assert "use_cache=False" in str(e.value)


def test_constant_outputs_are_kept() -> None:
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x: Tensor) -> tuple[Tensor, None, dict[str, object]]:
            return self.fc(x), None, {"h": self.fc(x).sum(0), "name": "fc", "k": 2}

    models = [Mixed() for _ in range(N)]
    out, none, extra = modelbatch.ModelBatch(models)(torch.ones(2, 3))
    assert out.shape == (N, 2, 3)
    assert none is None
    assert extra["h"].shape == (N, 3)
    assert (extra["name"], extra["k"]) == ("fc", 2)
    torch.testing.assert_close(extra["h"][1], models[1](torch.ones(2, 3))[2]["h"])


def test_op_without_batching_rule_is_named() -> None:
    class Hist(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x: Tensor) -> Tensor:
            return torch.histc(self.fc(x), bins=4)

    with pytest.raises(RuntimeError, match=r"the operator aten::histc has no vmap batching rule"):
        _batch(Hist)(torch.randn(2, 3))


@pytest.mark.parametrize("per_model", [False, True])
def test_shape_errors_keep_the_input_hint(per_model: bool) -> None:
    batch = modelbatch.ModelBatch([nn.Linear(3, 2) for _ in range(N)])
    x = torch.randn(N, 2, 4) if per_model else torch.randn(2, 4)
    with pytest.raises(RuntimeError, match=r"check that a single model accepts it") as e:
        batch(x, per_model=per_model)
    assert ("pass per_model=True" in str(e.value)) is not per_model
    assert "input shapes [(" in str(e.value)


def test_other_errors_are_left_alone() -> None:
    class Raises(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            raise RuntimeError("my own error")

    batch = modelbatch.ModelBatch([nn.Sequential(nn.Linear(3, 3), Raises()) for _ in range(N)])
    with pytest.raises(RuntimeError, match=r"^my own error$"):
        batch(torch.randn(2, 3))


@pytest.mark.parametrize("seeds", [None, [1, 2, 3]])
def test_an_in_place_write_into_a_shared_input_is_named(seeds: list[int] | None) -> None:
    """An ``inplace=True`` layer (or ``x.mul_()``) on the shared input: alone it overwrites
    the caller's tensor; in a batch the N models cannot all write into one [B, ...] tensor."""
    batch = modelbatch.ModelBatch(
        [nn.Sequential(nn.Dropout(p, inplace=True)) for p in (0.1, 0.2, 0.3)], seeds=seeds
    )
    with pytest.raises(RuntimeError, match="writes in place into a tensor shared") as info:
        batch(torch.ones(4, 5))
    assert "per_model=True" in str(info.value) and "inplace=False" in str(info.value)
    out = batch(torch.ones(N, 4, 5), per_model=True)  # the way out
    assert out.shape == (N, 4, 5)


# ------------------------------------------------------------- non-tensor inputs and outputs
class GRUOnPacked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(3, 4, batch_first=True)

    def forward(self, x: object) -> Tensor:
        return self.rnn(x)[1]


class ReturnsPacked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(3, 4, batch_first=True)

    def forward(self, x: Tensor, lengths: Tensor) -> object:
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        return self.rnn(packed)  # (PackedSequence, h_n)


@dataclasses.dataclass
class Features:
    x: Tensor


class OnFeatures(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, f: Features) -> Tensor:
        return self.fc(f.x)


def test_packed_sequence_input_is_named() -> None:
    x, lengths = torch.randn(2, 5, 3), torch.tensor([3, 5])
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    models = [GRUOnPacked().double() for _ in range(N)]
    batch = modelbatch.ModelBatch([copy.deepcopy(m) for m in models])
    for call in (lambda: batch(packed), lambda: batch((packed,))):
        with pytest.raises(TypeError, match=r"is a PackedSequence\. .*vmap.*Way out: pack "
                           r"inside the model .* return tensors.*pass it by keyword"):
            call()
    # The way out named: by keyword it reaches every model unchanged.
    x64 = pack_padded_sequence(x.double(), lengths, batch_first=True, enforce_sorted=False)
    expected = torch.stack([m(x64) for m in models])
    out = batch(x=x64)
    assert torch.allclose(out, expected, rtol=1e-12, atol=1e-14)
    (out**2).sum().backward()
    (expected**2).sum().backward()
    for name, p in batch.stacked.named_parameters():
        ref = torch.stack([dict(m.named_parameters())[name].grad for m in models])
        assert torch.allclose(p.grad, ref, rtol=1e-10, atol=1e-14), name


def test_packed_sequence_output_is_named() -> None:
    batch = _batch(ReturnsPacked)
    x, lengths = torch.randn(2, 5, 3), torch.tensor([3, 5])
    with pytest.raises(
        TypeError, match=r"returned a PackedSequence \(its output\[0\]\).*Way out: pack inside"
    ):
        batch(x, lengths)


def test_per_model_objects_holding_tensors_are_refused() -> None:
    batch = _batch(OnFeatures)
    shared = batch(Features(torch.randn(2, 3)))  # a shared object is every model's input
    assert shared.shape == (N, 2, 3)
    with pytest.raises(TypeError, match=r"input 0 is a Features holding tensors \(input 0\.x\)"
                       r".*per_model=True splits only tensor inputs"):
        batch(Features(torch.randn(N, 2, 3)), per_model=True)
    with pytest.raises(TypeError, match=r"input 0 is a tuple holding tensors \(input 0\[0\]\)"):
        batch((torch.randn(N, 2, 3),), per_model=True)
