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


class InplaceLeaky(nn.Module):
    """``h + act(h)`` with an in-place LeakyReLU: alone ``h`` is overwritten, so the output
    is ``2 * leaky_relu(h)``."""

    def __init__(self, slope: float) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.act = nn.LeakyReLU(slope, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return h + self.act(h)


def test_inplace_leaky_relu_slope_sweep_overwrites_its_input_as_alone() -> None:
    torch.manual_seed(0)
    models = [InplaceLeaky(s).double() for s in (0.01, 0.2, 0.5)]
    batch = ModelBatch(models)
    assert isinstance(batch.stacked.act, PerModelLeakyReLU)
    x = torch.randn(6, 4, dtype=torch.float64)
    out = batch(x)
    out.sum().backward()
    for i, m in enumerate(models):
        expected = m(x)
        torch.testing.assert_close(out[i], expected, rtol=1e-12, atol=1e-14)
        expected.sum().backward()
        torch.testing.assert_close(batch.stacked.fc.weight.grad[i], m.fc.weight.grad)


# ------------------------------------------------------------------ settings read by other code
class ReadsRate(nn.Module):
    """Reads its dropout layer's rate instead of calling the layer (timm's attention:
    ``dropout_p=self.attn_drop.p if self.training else 0.0``)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.attn_drop = nn.Dropout(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.fc(x), self.attn_drop.p if self.training else 0.0, self.training)


class ReadsEps(nn.Module):
    def __init__(self, eps: float) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(4, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.ln.normalized_shape, self.ln.weight, self.ln.bias, self.ln.eps)


class ReadsSlope(nn.Module):
    def __init__(self, slope: float) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.act = nn.LeakyReLU(slope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.fc(x), self.act.negative_slope)


class ReadsMomentum(nn.Module):
    def __init__(self, momentum: float) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(4, momentum=momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        return F.batch_norm(
            x, bn.running_mean, bn.running_var, bn.weight, bn.bias, True, bn.momentum, bn.eps
        )


@pytest.mark.parametrize(
    ("make", "values", "attr", "seeds"),
    [
        (ReadsRate, (0.0, 0.9), "p", None),
        (ReadsRate, (0.0, 0.9), "p", [1, 2]),
        (ReadsEps, (1e-5, 10.0), "eps", None),
        (ReadsSlope, (0.01, 0.5), "negative_slope", None),
        (ReadsMomentum, (0.1, 0.5), "momentum", None),
    ],
)
def test_a_per_model_setting_read_by_other_code_is_refused(
    make: Callable[[float], nn.Module],
    values: tuple[float, float],
    attr: str,
    seeds: list[int] | None,
) -> None:
    """A setting that differs between the models has no single value: code that reads it
    from the layer (instead of calling the layer) would run model 0's value for every
    model. The read raises, naming the layer, the attribute, the values and the way out."""
    models = [make(v).double() for v in values]
    batch = ModelBatch(models, seeds=seeds)
    with pytest.raises(modelbatch.ArchitectureMismatchError) as info:
        batch(torch.randn(5, 4, dtype=torch.float64))
    message = str(info.value)
    assert f"'{attr}'" in message and "call the layer" in message, message
    assert str(values[1]) in message, message
    repr(batch)  # printing the batch still works
    # Equal values read as before.
    same = ModelBatch([make(values[1]).double() for _ in values], seeds=seeds)
    same(torch.randn(5, 4, dtype=torch.float64))


def test_setting_a_per_model_setting_in_the_batch_is_refused() -> None:
    """Assigning ``p`` / ``eps`` on the batch's layer would change nothing (each model runs
    its recorded value): refused, not ignored."""
    batch = ModelBatch([ln_net(e) for e in (1e-5, 1e-3)])
    with pytest.raises(modelbatch.ArchitectureMismatchError, match="eps"):
        batch.stacked[1].eps = 0.1
    drop = ModelBatch([nn.Sequential(nn.Dropout(p)) for p in (0.1, 0.2)], seeds=[0, 1])
    with pytest.raises(modelbatch.ArchitectureMismatchError, match="'p'"):
        drop.stacked[0].p = 0.5


def test_transformer_layer_norm_eps_sweep_runs_in_one_batch() -> None:
    """torch's TransformerEncoderLayer reads norm1.eps only on its fused path, which the
    batch turns off: an eps sweep trains as alone."""
    torch.manual_seed(0)
    models = [
        nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, layer_norm_eps=e, batch_first=True)
        .double()
        for e in (1e-5, 0.5)
    ]
    batch = ModelBatch(copy.deepcopy(models))
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    for mode in ("train", "eval"):
        getattr(batch, mode)()
        out = batch(x)
        for i, m in enumerate(models):
            getattr(m, mode)()
            torch.testing.assert_close(out[i], m(x), rtol=1e-10, atol=1e-12)


def test_a_setting_read_after_drop_is_the_remaining_models_value() -> None:
    """Once the models left agree, the setting reads as their value (not model 0's, which
    may have been dropped), and the batch prints each layer's per-model values."""

    def net(v: float) -> nn.Module:
        return nn.Sequential(
            nn.Linear(3, 3), nn.Dropout(v), nn.LayerNorm(3, eps=v), nn.LeakyReLU(v),
            nn.BatchNorm1d(3, momentum=v, eps=v), nn.GroupNorm(1, 3, eps=v),
        )  # fmt: skip

    batch = ModelBatch([net(0.1), net(0.2)], seeds=[1, 2])
    text = repr(batch)
    assert text.count("[0.1, 0.2]") == 6, text  # p, 2 x eps, slope, momentum, eps
    batch.drop(0)
    layers = batch.stacked
    assert layers[1].p == 0.2 and layers[2].eps == 0.2 and layers[3].negative_slope == 0.2
    assert layers[4].momentum == 0.2 and layers[4].eps == 0.2 and layers[5].eps == 0.2
    assert [batch.extract(1)[k].eps for k in (2, 5)] == [0.2, 0.2]
