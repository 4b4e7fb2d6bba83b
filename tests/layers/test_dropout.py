"""Seeded dropout: model i's masks depend on its seed and its own call count only."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modelbatch import ModelBatch, seeded_models, use_seeded_dropout
from modelbatch.layers.dropout import PerModelDropout, SeededDropout, dropout_keep_mask
from modelbatch.optim import SGD
from tests.helpers import TOL, rel_err


def only_dropout(p: float = 0.5) -> nn.Module:
    return nn.Sequential(nn.Dropout(p))


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(x) * self.scale


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(5, 16), nn.Dropout(0.3), nn.Tanh(), nn.Linear(16, 3), nn.Dropout(0.2)
    ).double()


def test_masks_do_not_depend_on_n_or_neighbours() -> None:
    x = torch.ones(7, 11)
    small = ModelBatch([only_dropout() for _ in range(3)], seeds=[10, 11, 12])
    big = ModelBatch([only_dropout() for _ in range(8)], seeds=[99, 12, 5, 6, 10, 7, 8, 11])
    for _ in range(3):  # successive calls advance each model's own counter
        a, b = small(x), big(x)
        assert torch.equal(a[0], b[4])
        assert torch.equal(a[1], b[7])
        assert torch.equal(a[2], b[1])
    assert not torch.equal(a[0], a[1])  # different seeds, different masks


def test_trajectory_is_the_same_in_a_batch_of_3_of_8_and_alone() -> None:
    """Model i trained with dropout in a batch of 3, in a batch of 8 (with other models)
    and alone with torch.optim (plain module + use_seeded_dropout) ends up the same."""
    seeds = [3, 1, 4, 1_000_003, 5, 9, 2, 6]
    models = seeded_models(mlp, seeds)
    g = torch.Generator().manual_seed(0)
    data = [
        (
            torch.randn(6, 5, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (6,), generator=g),
        )
        for _ in range(4)
    ]

    def train_batch(picked: list[int]) -> list[nn.Module]:
        batch = ModelBatch([models[i] for i in picked], seeds=[seeds[i] for i in picked])
        opt = SGD(batch, lr=0.1, momentum=0.9)
        for x, y in data:
            loss = batch.compute_loss(batch(x), y, F.cross_entropy)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return batch.extract_all()

    in3 = train_batch([0, 1, 3])
    in8 = train_batch([7, 3, 6, 0, 5, 2, 4, 1])
    alone = []
    for i in (0, 1, 3):
        m = use_seeded_dropout(copy.deepcopy(models[i]), seeds[i])
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        for x, y in data:
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
        alone.append(m)
    for k, pos8 in enumerate((3, 7, 1)):
        sd3, sd8 = in3[k].state_dict(), in8[pos8].state_dict()
        ref = alone[k].state_dict()
        for name, v in sd3.items():
            assert rel_err(v, sd8[name]) <= TOL[torch.float64], (k, name)
            assert rel_err(v, ref[name]) <= TOL[torch.float64], (k, name)
    # Dropout really acted: without it the trajectory differs.
    plain = copy.deepcopy(models[0])
    opt = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    plain.eval()
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(plain(x), y).backward()
        opt.step()
    assert rel_err(plain[0].weight, in3[0][0].weight) > 1e-6


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_rate_and_scaling(p: float) -> None:
    batch = ModelBatch([only_dropout(p) for _ in range(4)], seeds=[0, 1, 2, 3])
    x = torch.ones(200, 250)
    out = batch(x)  # [4, 200, 250]
    kept = out != 0
    assert torch.allclose(out[kept], torch.full_like(out[kept], 1 / (1 - p)))
    keep_rate = kept.double().mean(dim=(1, 2))
    # 50,000 Bernoulli draws per model: standard error < 0.0023.
    assert torch.all((keep_rate - (1 - p)).abs() < 0.012), keep_rate
    assert abs(float(out.mean()) - 1.0) < 0.02  # unbiased


def test_eval_mode_is_the_identity_and_does_not_advance() -> None:
    batch = ModelBatch([only_dropout() for _ in range(2)], seeds=[1, 2])
    x = torch.randn(4, 6)
    batch.eval()
    assert torch.equal(batch(x), torch.stack([x, x]))
    counters = dict(batch.stacked_buffers())["0.counter"]
    assert counters.tolist() == [0, 0]
    batch.train()
    batch(x)
    assert dict(batch.stacked_buffers())["0.counter"].tolist() == [1, 1]


def test_layers_and_calls_get_different_masks() -> None:
    model = nn.Sequential(nn.Dropout(0.5), nn.Dropout(0.5))
    single = use_seeded_dropout(model, 7)
    ones = torch.ones(64, 64)
    m0 = single[0](ones)
    m1 = single[1](ones)
    assert not torch.equal(m0, m1)
    assert not torch.equal(m0, single[0](ones))


def test_channel_dropout_drops_whole_channels() -> None:
    batch = ModelBatch([nn.Sequential(nn.Dropout2d(0.5)) for _ in range(3)], seeds=[1, 2, 3])
    out = batch(torch.ones(5, 8, 4, 4))  # [3, 5, 8, 4, 4]
    per_channel = out.flatten(3)
    assert torch.all(per_channel.amin(dim=-1) == per_channel.amax(dim=-1))
    assert 0 < int((per_channel[..., 0] == 0).sum()) < per_channel[..., 0].numel()


def _shared_dims(out: torch.Tensor) -> tuple[int, ...]:
    """The dimensions along which ``out`` (dropout of an all-ones input) is constant, i.e.
    where one mask entry covers the whole dimension."""
    return tuple(d for d in range(out.dim()) if out.shape[d] > 1 and
                 bool((out == out.narrow(d, 0, 1)).all()))  # fmt: skip


# Mask dimensions have 12 entries, so that a random mask is never constant along one.
CHANNEL_CASES = [
    (nn.Dropout1d, (12, 3)),  # one sample [C, L]
    (nn.Dropout1d, (12, 12, 3)),
    (nn.Dropout2d, (12, 12)),  # torch warns: a 2-D input
    (nn.Dropout2d, (12, 12, 3)),  # torch warns: a 3-D input is read as [B, C, L]
    (nn.Dropout2d, (12, 12, 3, 3)),
    (nn.Dropout2d, (12, 12, 2, 2, 2)),  # torch warns
    (nn.Dropout3d, (12, 3, 3)),  # torch warns
    (nn.Dropout3d, (12, 3, 3, 3)),  # one sample [C, D, H, W]
    (nn.Dropout3d, (12, 12, 2, 2, 2)),
    (nn.FeatureAlphaDropout, (12, 12, 3)),
    (nn.FeatureAlphaDropout, (12, 12)),
]


@pytest.mark.parametrize(("cls", "shape"), CHANNEL_CASES)
def test_channel_masks_and_warnings_follow_torch(
    cls: type[nn.Module], shape: tuple[int, ...]
) -> None:
    """Under seeds=, each channel variant shares its mask over the same dimensions as torch's
    own module on the same input alone, and warns exactly as torch does (``Dropout2d`` on a
    3-D input drops channels of each sample, not whole samples)."""
    torch.manual_seed(0)
    x = torch.ones(shape, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as torch_warnings:
        warnings.simplefilter("always")
        ref = cls(0.5)(x)
    with warnings.catch_warnings(record=True) as our_warnings:
        warnings.simplefilter("always")
        out = ModelBatch([cls(0.5), cls(0.5)], seeds=[1, 2])(x)
    assert [str(w.message) for w in our_warnings] == [str(w.message) for w in torch_warnings]
    assert _shared_dims(out[0]) == _shared_dims(out[1]) == _shared_dims(ref), (cls, shape)


def test_channel_dropout_refuses_what_torch_refuses() -> None:
    batch = ModelBatch([nn.Dropout1d(0.5), nn.Dropout1d(0.5)], seeds=[1, 2])
    with pytest.raises(RuntimeError, match="dropout1d: Expected 2D or 3D input, but received a 4D"):
        batch(torch.ones(2, 3, 4, 5))
    batch = ModelBatch([nn.Dropout2d(0.5), nn.Dropout2d(0.5)], seeds=[1, 2])
    with (
        pytest.warns(UserWarning, match="Received a 1-D input to dropout2d"),
        pytest.raises(RuntimeError, match="Feature dropout requires at least 2 dimensions"),
    ):
        batch(torch.ones(4))


def test_alpha_dropout_values_are_torchs() -> None:
    """Alpha dropout: kept and dropped entries take exactly torch's two values."""
    x = torch.ones(64, 64)
    for cls in (nn.AlphaDropout, nn.FeatureAlphaDropout):
        ref = torch.unique(cls(0.3)(x))
        out = ModelBatch([cls(0.3), cls(0.3)], seeds=[5, 6])(x)
        assert torch.equal(torch.unique(out), ref), cls
    z = torch.randn(400, 500)
    out = ModelBatch([nn.AlphaDropout(0.2), nn.AlphaDropout(0.2)], seeds=[1, 2])(z)
    assert (out.mean(dim=(1, 2)).abs() < 0.02).all()  # self-normalising: mean 0, variance 1
    assert ((out.var(dim=(1, 2)) - 1).abs() < 0.03).all()


# ------------------------------------------------------------------ per-model rates
RATES = [0.0, 0.1, 0.25, 0.5, 0.9, 1.0]
# Each layer of the dropout family with an input it takes without a warning.
FAMILY = [(nn.Dropout, (3, 4, 5)), (nn.Dropout1d, (3, 4, 5)), (nn.Dropout2d, (3, 4, 5, 6)),
          (nn.Dropout3d, (3, 4, 5, 6, 2)), (nn.AlphaDropout, (3, 4, 5)),
          (nn.FeatureAlphaDropout, (3, 4, 5, 6))]  # fmt: skip


@pytest.mark.parametrize(("cls", "shape"), FAMILY)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_per_model_rates_draw_exactly_the_masks_of_the_model_alone(
    cls: type[nn.Module], shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    """Each model of a dropout-rate sweep (seeds=) computes exactly, bit for bit, what the
    same layer computes alone with use_seeded_dropout, call after call."""
    layers = [cls(p) for p in RATES]
    seeds = [31 + k for k in range(len(RATES))]
    batch = ModelBatch(layers, seeds=seeds)
    assert isinstance(batch.stacked, SeededDropout)  # the root module itself is replaced
    assert batch.stacked.per_model_p == RATES
    alone = [use_seeded_dropout(copy.deepcopy(m), s) for m, s in zip(layers, seeds, strict=True)]
    x = torch.randn(shape, dtype=dtype)
    for _ in range(2):
        out = batch(x)
        for i, m in enumerate(alone):
            assert torch.equal(out[i], m(x)), (i, RATES[i])
    for i, p in enumerate(RATES):
        extracted = batch.extract(i)
        assert type(extracted) is cls and extracted.p == p


def rate_net(p: float) -> nn.Module:
    return nn.Sequential(
        nn.Linear(5, 16), nn.Tanh(), nn.Dropout(p), nn.Linear(16, 16), nn.AlphaDropout(p / 2),
        nn.Linear(16, 3)
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dropout_rate_sweep_trains_like_each_model_alone(dtype: torch.dtype) -> None:
    rates = [0.0, 0.1, 0.3, 0.5]
    seeds = [7, 8, 9, 10]
    models = [m.to(dtype) for m in seeded_models(lambda: rate_net(0.0), seeds)]
    for m, p in zip(models, rates, strict=True):
        m[2].p, m[4].p = p, p / 2
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 5, generator=g, dtype=dtype), torch.randint(0, 3, (8,), generator=g))
            for _ in range(5)]  # fmt: skip
    batch = ModelBatch(copy.deepcopy(models), seeds=seeds)
    opt = SGD(batch, lr=0.1, momentum=0.9)
    for x, y in data:
        opt.zero_grad()
        batch.compute_loss(batch(x), y, F.cross_entropy).backward()
        opt.step()
    alone = []
    for m, s in zip(models, seeds, strict=True):
        m = use_seeded_dropout(copy.deepcopy(m), s)
        ref_opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        for x, y in data:
            ref_opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            ref_opt.step()
        alone.append(m)
    extracted = batch.extract_all()
    assert [(m[2].p, m[4].p) for m in extracted] == [(p, p / 2) for p in rates]
    for i, (mine, ref) in enumerate(zip(extracted, alone, strict=True)):
        ref_state = ref.state_dict()
        for name, v in mine.state_dict().items():
            assert rel_err(v, ref_state[name]) <= TOL[dtype], (i, name)
    # The rates really differ: model 0 (p=0) and model 3 (p=0.5) see different activations.
    assert rel_err(extracted[0][0].weight, extracted[3][0].weight) > 1e-3


def test_per_model_rates_without_seeds() -> None:
    """Without seeds a layer whose rate differs becomes a PerModelDropout: torch's formula
    with model i's rate, vmap's random numbers."""
    batch = ModelBatch([nn.Sequential(nn.Dropout(p)) for p in RATES])
    layer = batch.stacked[0]
    assert isinstance(layer, PerModelDropout) and layer.per_model_p == RATES
    out = batch(torch.ones(300, 400))
    kept = (out != 0).double().mean(dim=(1, 2))
    # 120,000 draws per model: standard error < 0.0015.
    assert torch.allclose(kept, 1 - torch.tensor(RATES, dtype=torch.float64), atol=0.008), kept
    for i, p in enumerate(RATES):
        values = torch.unique(out[i][out[i] != 0])
        assert values.tolist() == ([] if p == 1 else [pytest.approx(1 / (1 - p))])
    batch.eval()
    assert torch.equal(batch(torch.ones(2, 3)), torch.ones(len(RATES), 2, 3))
    twins = ModelBatch([nn.Dropout(p) for p in (0.3, 0.3, 0.5)])(torch.ones(20, 30))
    assert not torch.equal(twins[0], twins[1])  # same rate, independent masks
    # randomness="same": one uniform draw shared, so a higher rate drops a superset.
    same = ModelBatch([nn.Dropout(p) for p in (0.2, 0.6)], randomness="same")
    out = same(torch.ones(50, 60))
    assert bool(((out[1] != 0) <= (out[0] != 0)).all())
    alpha = ModelBatch([nn.AlphaDropout(p) for p in (0.1, 0.4)])
    z = alpha(torch.randn(400, 500))
    assert (z.mean(dim=(1, 2)).abs() < 0.02).all() and ((z.var(dim=(1, 2)) - 1).abs() < 0.03).all()


def test_per_model_rates_do_not_change_with_the_dtype() -> None:
    """The rates live in an integer buffer: batch.float() / .half() cannot round them."""
    batch = ModelBatch([nn.Dropout(p) for p in (0.1, 0.3)], seeds=[1, 2]).half()
    rates = batch.stacked._per_model_p.view(torch.float64).tolist()
    assert rates == [0.1, 0.3] and batch.stacked.per_model_p == [0.1, 0.3]
    assert "_per_model_p" not in batch.stacked.state_dict()  # settings, not state


# ------------------------------------------------------------------ the model is the layer
def test_a_model_that_is_a_layer_is_substituted() -> None:
    batch = ModelBatch([nn.Dropout(0.3), nn.Dropout(0.3)], seeds=[4, 5])
    assert isinstance(batch.stacked, SeededDropout)
    x = torch.randn(6, 7)
    assert torch.equal(batch(x)[1], use_seeded_dropout(nn.Dropout(0.3), 5)(x))
    assert type(batch.extract(0)) is nn.Dropout
    # Class swaps work on the root too: BatchNorm (momentum=None) and channels_last conv.
    torch.manual_seed(0)
    bns = [nn.BatchNorm1d(3, momentum=None).double() for _ in range(2)]
    x = torch.randn(8, 3, dtype=torch.float64)
    batch = ModelBatch(copy.deepcopy(bns))
    batch(x)
    for i, bn in enumerate(bns):
        bn(x)
        torch.testing.assert_close(batch.extract(i).running_var, bn.running_var)
    convs = [nn.Conv2d(2, 3, 3).double() for _ in range(2)]
    batch = ModelBatch(copy.deepcopy(convs), conv_layout="channels_last")
    assert type(batch.stacked).__name__ == "VmapConv2d"
    img = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    for i, conv in enumerate(convs):
        torch.testing.assert_close(batch(img)[i], conv(img))


def test_edge_probabilities() -> None:
    x = torch.randn(3, 4)
    assert torch.equal(use_seeded_dropout(only_dropout(0.0), 1)(x), x)
    assert torch.equal(use_seeded_dropout(only_dropout(1.0), 1)(x), torch.zeros_like(x))
    with pytest.raises(ValueError, match="between 0 and 1"):
        SeededDropout(1.5)
    with pytest.raises(ValueError, match="non-negative"):
        SeededDropout(0.5, seed=-1)


def test_extract_and_insert_see_a_plain_dropout() -> None:
    batch = ModelBatch(seeded_models(mlp, [1, 2]), seeds=[1, 2])
    assert isinstance(batch.stacked[1], SeededDropout)
    assert "stacked.1.counter" in batch.state_dict()
    batch(torch.randn(3, 5, dtype=torch.float64))
    plain = batch.extract(0)
    assert type(plain[1]) is nn.Dropout
    assert set(plain.state_dict()) == set(mlp().state_dict())
    batch.insert(1, plain)  # batch-only buffers (seed, counter) keep their values
    assert dict(batch.stacked_buffers())["1.seed"].tolist() == [1, 2]
    assert dict(batch.stacked_buffers())["1.counter"].tolist() == [1, 1]


def test_without_seeds_torch_dropout_stays() -> None:
    batch = ModelBatch([Scaled() for _ in range(2)])
    assert type(batch.stacked.drop) is nn.Dropout
    out = batch(torch.ones(50, 50))
    assert not torch.equal(out[0], out[1])  # vmap randomness="different"


def test_drop_keeps_each_models_stream() -> None:
    x = torch.ones(6, 6)
    full = ModelBatch(
        [only_dropout() for _ in range(3)], seeds=[4, 5, 6], model_ids=["a", "b", "c"]
    )
    ref = ModelBatch([only_dropout() for _ in range(1)], seeds=[6])
    full(x)
    ref(x)
    full.drop(["a", "b"])
    assert full.seeds == [6]
    assert torch.equal(full(x), ref(x))


def test_seeds_validation() -> None:
    with pytest.raises(ValueError, match="got 1 seeds for 2 models"):
        ModelBatch([only_dropout(), only_dropout()], seeds=[1])
    with pytest.raises(ValueError, match="seed of model 1 must lie in"):
        ModelBatch([only_dropout(), only_dropout()], seeds=[1, -2])
    with pytest.raises(TypeError, match="seed of model 0 must be an int"):
        ModelBatch([only_dropout(), only_dropout()], seeds=[1.5, 2])  # type: ignore[list-item]


def test_keep_mask_is_a_pure_function() -> None:
    seed, ctr = torch.tensor(123), torch.tensor(4)
    a = dropout_keep_mask(seed, ctr, 0, (10, 10), 0.5)
    assert torch.equal(a, dropout_keep_mask(seed, ctr, 0, (10, 10), 0.5))
    assert not torch.equal(a, dropout_keep_mask(seed, ctr + 1, 0, (10, 10), 0.5))
    assert not torch.equal(a, dropout_keep_mask(seed + 2**40, ctr, 0, (10, 10), 0.5))


@pytest.mark.cuda
def test_masks_are_the_same_on_cuda_and_cpu() -> None:
    seed, ctr = torch.tensor(2**40 + 17), torch.tensor(3)
    cpu = dropout_keep_mask(seed, ctr, 1, (33, 65), 0.3)
    gpu = dropout_keep_mask(seed.cuda(), ctr.cuda(), 1, (33, 65), 0.3)
    assert torch.equal(cpu, gpu.cpu())
    models = seeded_models(lambda: nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5)), [1, 2])
    on_cpu = ModelBatch(copy.deepcopy(models), seeds=[1, 2])
    on_gpu = ModelBatch([m.cuda() for m in models], seeds=[1, 2])
    assert dict(on_gpu.stacked_buffers())["1.seed"].is_cuda
    x = torch.randn(5, 4)
    assert torch.equal(on_cpu(x) != 0, (on_gpu(x.cuda()) != 0).cpu())


def test_a_model_without_tensors_runs() -> None:
    """A bare ``nn.Dropout`` has no parameter or buffer for vmap to map over."""
    batch = ModelBatch([nn.Dropout(0.5), nn.Dropout(0.5)])
    out = batch(torch.ones(40, 50))
    assert out.shape == (2, 40, 50) and not torch.equal(out[0], out[1])
    batch.drop(0)
    assert batch(torch.ones(2, 3)).shape == (1, 2, 3)
    assert batch.state_dict().keys() == {"active", "model_ids"}


# ------------------------------------------------------------------ inplace=True
class InplaceResidual(nn.Module):
    """``h + drop(h)`` with an in-place dropout: alone, ``h`` itself is overwritten, so the
    output is ``2 * drop(h)`` (a model that relies on torch's in-place semantics)."""

    def __init__(self, cls: type[nn.Module], p: float) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 6)
        self.drop = cls(p, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x).unsqueeze(-1).expand(-1, -1, 4).contiguous()  # [B, 6, 4]
        y = self.drop(h)
        return h + y


@pytest.mark.parametrize("cls", [nn.Dropout, nn.Dropout1d, nn.AlphaDropout])
@pytest.mark.parametrize("rates", [(0.4, 0.4), (0.2, 0.6)])
def test_inplace_dropout_writes_into_its_input_as_alone(
    cls: type[nn.Module], rates: tuple[float, float]
) -> None:
    """With seeds=, each model equals the model alone with use_seeded_dropout, whose
    SeededDropout keeps inplace=True (torch's own dropout overwrites its input)."""
    seeds = [3, 4]
    models = [InplaceResidual(cls, p).double() for p in rates]
    batch = ModelBatch(models, seeds=seeds)
    alone = [use_seeded_dropout(copy.deepcopy(m), s) for m, s in zip(models, seeds, strict=True)]
    assert all(m.drop.inplace for m in alone)
    x = torch.randn(7, 5, dtype=torch.float64)
    out = batch(x)
    for i, m in enumerate(alone):
        expected = m(x)
        assert torch.equal(out[i] == 0, expected == 0), i  # the same mask
        assert rel_err(out[i], expected) <= 1e-12, i  # (the Linear differs in rounding)
        h = models[i].fc(x).unsqueeze(-1).expand(-1, -1, 4)
        assert not torch.allclose(expected, h + h)  # the in-place write matters here


def test_inplace_dropout_without_seeds_writes_into_its_input() -> None:
    """Per-model rates without seeds (PerModelDropout): the output is 2 * drop(h)."""
    models = [InplaceResidual(nn.Dropout, p).double() for p in (0.3, 0.7)]
    batch = ModelBatch(models)
    x = torch.randn(50, 5, dtype=torch.float64)
    out = batch(x)
    for i, (m, p) in enumerate(zip(models, (0.3, 0.7), strict=True)):
        h = m.fc(x).unsqueeze(-1).expand(-1, -1, 4)
        kept = out[i] != 0
        assert torch.allclose(out[i][kept], (2 * h / (1 - p))[kept], rtol=1e-12), i
        assert 0.1 < 1 - kept.double().mean() < 0.9


# ------------------------------------------------------------------ one layer, two names
class SharedDropout(nn.Module):
    """One dropout module registered under two names (applied twice)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        drop = nn.Dropout(p)
        self.first = drop
        self.second = drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


@pytest.mark.parametrize("seeds", [None, [1, 2]])
def test_a_dropout_under_two_names_is_replaced_under_both(seeds: list[int] | None) -> None:
    """Only the first name was replaced: the second still ran model 0's torch Dropout, so
    model 1 (p=0.9) dropped 90% instead of 99%."""
    batch = ModelBatch([SharedDropout(0.0), SharedDropout(0.9)], seeds=seeds)
    assert batch.stacked.first is batch.stacked.second
    out = batch(torch.ones(20000, dtype=torch.float64))
    dropped = (out == 0).double().mean(dim=1)
    assert dropped[0] == 0 and abs(dropped[1] - 0.99) < 0.005, dropped
    if seeds is not None:
        fresh = [SharedDropout(0.0), SharedDropout(0.9)]
        alone = [use_seeded_dropout(m, s) for m, s in zip(fresh, seeds, strict=True)]
        assert alone[1].first is alone[1].second and isinstance(alone[1].second, SeededDropout)
        x = torch.randn(50, dtype=torch.float64)
        out = batch(x)
        for i, m in enumerate(alone):
            m(x)  # the batch's layer ran once already (counter 1)
            assert torch.equal(out[i], m(x)), i
