"""What cannot run under vmap gets an error naming the cause and the way out; the input
shape hint is kept for shape errors only."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

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
