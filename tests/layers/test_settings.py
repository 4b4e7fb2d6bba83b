"""Per-model LayerNorm/GroupNorm eps and LeakyReLU slope: one batch, each model as alone."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from modelbatch.integrations.sweep import sweep
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import modelbatch
from modelbatch import ModelBatch
from modelbatch.layers.settings import (
    PerModelGroupNorm,
    PerModelLayerNorm,
    PerModelLeakyReLU,
    per_model_floats,
    read_per_model,
)
from tests.helpers import TOL, assert_close_models, train_alone


def ln_net(eps: float) -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8, eps=eps), nn.Tanh(), nn.Linear(8, 3))


def gn_net(eps: float) -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(2, 6, 3), nn.GroupNorm(3, 6, eps=eps), nn.Flatten(), nn.Linear(6 * 4, 3)
    )


def leaky_net(slope: float) -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.LeakyReLU(slope), nn.Linear(8, 3))


CASES: list[tuple[Callable[[float], nn.Module], list[float], type[nn.Module], tuple[int, ...]]] = [
    (ln_net, [1e-5, 1e-2, 0.5, 2.0], PerModelLayerNorm, (8, 4)),
    (gn_net, [1e-5, 1e-2, 0.5, 2.0], PerModelGroupNorm, (8, 2, 6)),
    (leaky_net, [0.0, 0.01, 0.2, -0.5], PerModelLeakyReLU, (8, 4)),
]


@pytest.mark.parametrize(("make", "values", "layer", "shape"), CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sweep_in_one_batch_trains_like_each_model_alone(
    make: Callable[[float], nn.Module],
    values: list[float],
    layer: type[nn.Module],
    shape: tuple[int, ...],
    dtype: torch.dtype,
) -> None:
    torch.manual_seed(0)
    models = [make(v).to(dtype) for v in values]
    g = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(shape, generator=g).to(dtype), torch.randint(0, 3, (shape[0],), generator=g))
        for _ in range(4)
    ]
    alone = train_alone(
        models, lambda i, m: torch.optim.Adam(m.parameters(), lr=0.05), data, F.cross_entropy
    )
    batch = ModelBatch(copy.deepcopy(models))
    assert type(batch.stacked[1]) is layer
    opt = modelbatch.optim.Adam(batch, lr=0.05)
    for x, y in data:
        opt.zero_grad()
        batch.compute_loss(batch(x), y, F.cross_entropy).backward()
        opt.step()
    extracted = batch.extract_all()
    assert_close_models(extracted, alone, dtype)
    for m, ref in zip(extracted, alone, strict=True):
        assert type(m[1]) is type(ref[1]) and repr(m) == repr(ref)  # the model's own setting


def test_leaky_relu_is_exact() -> None:
    x = torch.tensor([-2.0, -0.0, 0.0, 1e-30, -1e-30, float("nan"), -float("inf"), 3.0])
    slopes = [0.01, 0.3, -0.2]
    out = ModelBatch([nn.LeakyReLU(s) for s in slopes])(x)
    for i, s in enumerate(slopes):
        torch.testing.assert_close(out[i], F.leaky_relu(x, s), rtol=0, atol=0, equal_nan=True)
    xb = x.to(torch.bfloat16)  # the product in float32, as torch's kernel forms it
    out = ModelBatch([nn.LeakyReLU(s) for s in slopes])(xb)
    for i, s in enumerate(slopes):
        torch.testing.assert_close(out[i], F.leaky_relu(xb, s), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize(
    "norm", [lambda e: nn.LayerNorm(8, eps=e), lambda e: nn.GroupNorm(2, 8, eps=e)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norms_under_autocast_return_torchs_dtype(
    norm: Callable[[float], nn.Module], dtype: torch.dtype
) -> None:
    torch.manual_seed(0)
    models = [norm(e) for e in (1e-5, 1e-1)]
    batch = ModelBatch(copy.deepcopy(models))
    x = torch.randn(6, 8).to(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = batch(x)
        refs = [m(x) for m in models]
    for i, ref in enumerate(refs):
        assert out.dtype == ref.dtype  # the input's on CPU (float32 on CUDA)
        torch.testing.assert_close(out[i], ref, rtol=1.6e-2, atol=1e-2)


def test_equal_settings_keep_torchs_layer_and_settings_are_not_state() -> None:
    batch = ModelBatch([ln_net(1e-5), ln_net(1e-5)])
    assert type(batch.stacked[1]) is nn.LayerNorm
    batch = ModelBatch([ln_net(1e-5), ln_net(1e-3)]).half()
    assert batch.stacked[1].per_model_eps == [1e-5, 1e-3]
    assert read_per_model(batch.stacked[1]._per_model_eps).tolist() == [1e-5, 1e-3]
    assert set(batch.stacked.state_dict()) == set(ln_net(0.1).state_dict())
    assert [m[1].eps for m in batch.extract_all()] == [1e-5, 1e-3]
    bits = per_model_floats([0.1, 1 / 3])
    assert bits.dtype == torch.int64 and read_per_model(bits).tolist() == [0.1, 1 / 3]


def test_bad_inputs_get_torchs_errors() -> None:
    batch = ModelBatch([nn.LayerNorm(4, eps=e) for e in (1e-5, 1e-3)])
    with pytest.raises(
        RuntimeError, match=r"Given normalized_shape=\[4\], expected input with shape \[\*, 4\]"
    ):
        batch(torch.randn(3, 5))
    batch = ModelBatch([nn.GroupNorm(2, 4, eps=e) for e in (1e-5, 1e-3)])
    with pytest.raises(
        RuntimeError, match=r"GroupNorm\(2, 4\) expects an input of shape \[B, 4, \*\]"
    ):
        batch(torch.randn(3, 6, 2))
    with pytest.raises(RuntimeError, match="Expected at least 2 dimensions"):
        batch(torch.randn(4))


def test_eps_sweep_through_sweep_is_one_batch_and_equals_alone() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 4, generator=g, dtype=torch.float64)
    y = (x @ torch.randn(4, 3, generator=g, dtype=torch.float64)).argmax(dim=1)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    configs = [{"eps": e, "lr": 0.1} for e in (1e-5, 1e-2, 0.3)]

    def make(config: dict[str, float]) -> nn.Module:
        torch.manual_seed(0)
        return ln_net(config["eps"]).double()

    results = sweep(configs, make, train_loader=loader, loss_fn=F.cross_entropy, epochs=2,
                    optimizer_cls=torch.optim.SGD, keep_models=True)  # fmt: skip
    alone = train_alone(
        [make(c) for c in configs],
        lambda i, m: torch.optim.SGD(m.parameters(), lr=0.1),
        [b for _ in range(2) for b in loader],
        F.cross_entropy,
    )
    trained = [results[i].model for i in range(3)]
    assert [m[1].eps for m in trained] == [1e-5, 1e-2, 0.3]  # type: ignore[index]
    assert_close_models(trained, alone, torch.float64)  # type: ignore[arg-type]
    assert TOL[torch.float64] == 1e-10
