"""BatchNorm substitution: identical to ``nn.BatchNorm`` in full precision (float64 within
1e-10), working under vmap with low-precision inputs (what autocast produces), and with
``momentum=None``."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import modelbatch
from modelbatch import ModelBatch
from modelbatch.layers.batchnorm import VmapBatchNorm1d, VmapBatchNorm2d, VmapBatchNorm3d
from tests.helpers import assert_close_models, rel_err, train_alone

N = 3

BN_CASES = {
    "1d": (nn.BatchNorm1d, VmapBatchNorm1d, (6, 4)),
    "1d_seq": (nn.BatchNorm1d, VmapBatchNorm1d, (6, 4, 5)),
    "2d": (nn.BatchNorm2d, VmapBatchNorm2d, (6, 4, 3, 3)),
    "3d": (nn.BatchNorm3d, VmapBatchNorm3d, (6, 4, 2, 2, 2)),
}
OPTIONS = {
    "default": {},
    "cumulative": {"momentum": None},
    "no_affine": {"affine": False},
    "no_running_stats": {"track_running_stats": False},
}


class Net(nn.Module):
    def __init__(self, bn: nn.Module, dims: int) -> None:
        super().__init__()
        self.bn = bn
        self.dims = dims
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.bn(x)
        if h.dim() > 2:
            h = h.flatten(2).mean(2)
        return self.head(h)


def make(case: str, option: str, dtype: torch.dtype = torch.float64) -> list[nn.Module]:
    cls, _, shape = BN_CASES[case]
    torch.manual_seed(0)
    models = []
    for _ in range(N):
        m = Net(cls(4, **OPTIONS[option]), len(shape)).to(dtype)
        if m.bn.affine:
            with torch.no_grad():
                m.bn.weight.uniform_(0.5, 1.5)
                m.bn.bias.uniform_(-0.5, 0.5)
        models.append(m)
    return models


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("case", list(BN_CASES))
def test_float64_training_equals_nn_batchnorm(case: str, option: str) -> None:
    models = make(case, option)
    batch = ModelBatch(models)
    _, vcls, shape = BN_CASES[case]
    assert type(batch.stacked.bn) is vcls
    assert batch.state_dict().keys() == {f"stacked.{k}" for k in models[0].state_dict()} | {
        "active",
        "model_ids",
    }
    opt = modelbatch.optim.SGD(batch, lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    data = [
        (
            torch.randn(*shape, generator=g, dtype=torch.float64),
            torch.randint(0, 2, (shape[0],), generator=g),
        )
        for _ in range(3)
    ]
    for x, y in data:
        loss = batch.compute_loss(batch(x), y, F.cross_entropy)
        opt.zero_grad()
        loss.backward()
        opt.step()
    ref = train_alone(
        models,
        lambda i, m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
        data,
        F.cross_entropy,
    )
    extracted = batch.extract_all()
    assert type(extracted[0].bn) is BN_CASES[case][0]  # users get plain nn.BatchNorm back
    assert_close_models(extracted, ref, torch.float64, f"{case}/{option}")
    # Eval mode (running statistics) too.
    batch.eval()
    x = data[0][0]
    out = batch(x)
    for i, m in enumerate(ref):
        m.eval()
        assert rel_err(out[i], m(x)) <= 1e-10


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["1d", "2d"])
def test_low_precision_input_matches_single_module(case: str, dtype: torch.dtype) -> None:
    """A bf16/fp16 input with float32 weights and statistics (what a layer under autocast
    hands to BatchNorm) fails in plain vmap; the substitute matches nn.BatchNorm alone."""
    cls, _, shape = BN_CASES[case]
    torch.manual_seed(0)
    bns = [cls(4) for _ in range(N)]
    for bn in bns:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    batch = ModelBatch([nn.Sequential(copy.deepcopy(bn)) for bn in bns])
    x = (torch.randn(*shape) * 3 + 1).to(dtype)
    xb = x.clone().requires_grad_()
    out = batch(xb)
    assert out.dtype == dtype
    grad_out = torch.randn(out.shape).to(dtype)
    out.backward(grad_out)
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    params = dict(batch.stacked_parameters())
    buffers = dict(batch.stacked_buffers())
    x_grad = torch.zeros_like(x, dtype=torch.float32)
    for i, bn in enumerate(bns):
        xi = x.clone().requires_grad_()
        ref = bn(xi)
        assert ref.dtype == dtype
        ref.backward(grad_out[i])
        x_grad += xi.grad.float()
        assert rel_err(out[i], ref) <= tol
        assert rel_err(params["0.weight"].grad[i], bn.weight.grad) <= tol
        assert rel_err(params["0.bias"].grad[i], bn.bias.grad) <= tol
        # Statistics are accumulated in float32 from the same low-precision values.
        assert rel_err(buffers["0.running_mean"][i], bn.running_mean) <= 1e-5
        assert rel_err(buffers["0.running_var"][i], bn.running_var) <= 1e-5
    assert xb.grad is not None and rel_err(xb.grad, x_grad) <= 5 * tol


# ---------------------------------------------------------------------------- per-model settings
SWEEPS = {
    "momentum": [{"momentum": 0.1}, {"momentum": 0.5}, {"momentum": 0.01}],
    "momentum_with_none": [{"momentum": 0.1}, {"momentum": None}, {"momentum": 0.3}],
    "eps": [{"eps": 1e-5}, {"eps": 1e-2}, {"eps": 0.3}],
    "both": [
        {"momentum": 0.2, "eps": 1e-3},
        {"momentum": None, "eps": 0.1},
        {"momentum": 0.9, "eps": 1e-5},
    ],
}


def _sweep_models(case: str, sweep: str, option: str = "default") -> list[nn.Module]:
    cls, _, shape = BN_CASES[case]
    torch.manual_seed(0)
    models = []
    for settings in SWEEPS[sweep]:
        kwargs = {**OPTIONS[option], **settings}
        m = Net(cls(4, **kwargs), len(shape)).double()
        if m.bn.affine:
            with torch.no_grad():
                m.bn.weight.uniform_(0.5, 1.5)
                m.bn.bias.uniform_(-0.5, 0.5)
        models.append(m)
    return models


@pytest.mark.parametrize("sweep", list(SWEEPS))
@pytest.mark.parametrize("case", ["1d", "2d", "3d"])
def test_per_model_momentum_and_eps_sweep_equals_each_model_alone(case: str, sweep: str) -> None:
    """A BatchNorm momentum (or eps) sweep is one batch; each model trains with its own."""
    models = _sweep_models(case, sweep)
    batch = ModelBatch(models)
    bn = batch.stacked.bn
    assert bn.per_model_momentum == [m.bn.momentum for m in models]
    assert bn.per_model_eps == [m.bn.eps for m in models]
    opt = modelbatch.optim.SGD(batch, lr=0.1, momentum=0.9)
    shape = BN_CASES[case][2]
    g = torch.Generator().manual_seed(1)
    data = [
        (
            torch.randn(*shape, generator=g, dtype=torch.float64),
            torch.randint(0, 2, (shape[0],), generator=g),
        )
        for _ in range(3)
    ]
    for x, y in data:
        loss = batch.compute_loss(batch(x), y, F.cross_entropy)
        opt.zero_grad()
        loss.backward()
        opt.step()
    ref = train_alone(
        models,
        lambda i, m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
        data,
        F.cross_entropy,
    )
    extracted = batch.extract_all()
    assert_close_models(extracted, ref, torch.float64, f"{case}/{sweep}")
    for m, orig in zip(extracted, models, strict=True):  # each model's own settings back
        assert (m.bn.momentum, m.bn.eps) == (orig.bn.momentum, orig.bn.eps)
    batch.eval()
    out = batch(data[0][0])
    for i, m in enumerate(ref):
        m.eval()
        assert rel_err(out[i], m(data[0][0])) <= 1e-10


def test_per_model_settings_follow_the_models_when_dropped() -> None:
    models = _sweep_models("2d", "both")
    batch = ModelBatch(models, model_ids=["a", "b", "c"])
    batch.drop("b")
    bn = batch.stacked.bn
    assert bn.per_model_momentum == [0.2, 0.9] and bn.per_model_eps == [1e-3, 1e-5]
    batch.keep_positions([1, 0])
    assert bn.per_model_momentum == [0.9, 0.2] and bn.per_model_eps == [1e-5, 1e-3]
    batch.double()  # a dtype change does not touch the settings
    assert bn.per_model_eps == [1e-5, 1e-3]


@pytest.mark.parametrize("option", ["no_affine", "no_running_stats"])
def test_per_model_momentum_sweep_with_options(option: str) -> None:
    models = _sweep_models("2d", "both", option)
    batch = ModelBatch(models)
    x = torch.randn(6, 4, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for _ in range(2):
        out = batch(x)
    for i, m in enumerate(models):
        ref = copy.deepcopy(m)
        ref(x)
        assert rel_err(out[i], ref(x)) <= 1e-10
        if ref.bn.running_mean is not None:
            assert rel_err(batch.stacked.bn.running_mean[i], ref.bn.running_mean) <= 1e-10


# ---------------------------------------------------------------------------- one native call
def test_one_native_batch_norm_kernel_per_layer() -> None:
    """The N models' BatchNorm is one native call: no separate affine multiply and add."""
    from modelbatch.bench.profile import KernelCounter

    batch = ModelBatch([nn.Sequential(m.bn) for m in make("2d", "default")])
    x = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    with KernelCounter() as k:
        batch(x)
    ops = dict(k.ops["other"])
    ops.pop("all", None)  # ModelBatch's check that every model is active
    # the running-batch counter (add_), the shared input laid out per model (clone), the call;
    # and one clone each for weight and bias: they are column ranges of the batch's flat
    # [N, P] parameter storage (modelbatch._flat), copied to the N*C layout of the call
    assert ops == {"add_": 1, "clone": 3, "native_batch_norm": 1}, ops


def test_resnet8_saves_no_more_for_backward_than_one_model_alone() -> None:
    """Bytes autograd saves per model (distinct storages, saved_tensors_hooks) on ResNet-8,
    against the same model alone: at most 1.05x (vmap's own rule: 1.54x)."""
    from modelbatch.bench.profile import saved_bytes
    from modelbatch.bench.workloads import ResNet8

    torch.manual_seed(0)
    models = [ResNet8() for _ in range(2)]
    x = torch.randn(16, 3, 32, 32)
    y = torch.randint(0, 10, (16,))
    with saved_bytes() as alone:
        F.cross_entropy(models[0](x), y)
    batch = ModelBatch(models)
    with saved_bytes() as batched:
        batch.compute_loss(batch(x), y, F.cross_entropy)
    ratio = batched["bytes"] / 2 / alone["bytes"]
    assert ratio <= 1.05, ratio


def test_channels_last_conv_then_batchnorm_stays_one_call() -> None:
    from modelbatch.bench.workloads import ResNet8

    torch.manual_seed(0)
    models = [ResNet8().double() for _ in range(2)]
    batch = ModelBatch(models, conv_layout="channels_last")
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    out = batch(x)
    for i, m in enumerate(models):
        assert rel_err(out[i], copy.deepcopy(m)(x)) <= 1e-10


def test_bf16_autocast_resnet_trains() -> None:
    """Under CPU bf16 autocast the conv hands BatchNorm a bf16 input with float32 weights and
    statistics: the native mixed-precision kernel runs it, as for one model alone."""
    from modelbatch.bench.workloads import ResNet8

    torch.manual_seed(0)
    models = [ResNet8() for _ in range(2)]
    batch = ModelBatch(models)
    x = torch.randn(4, 3, 8, 8)
    y = torch.randint(0, 10, (4,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = batch.compute_loss(batch(x), y, F.cross_entropy, reduction="none")
        ref = [F.cross_entropy(copy.deepcopy(m)(x), y) for m in models]
    loss.sum().backward()
    for i in range(2):
        assert abs(loss[i].item() - ref[i].item()) <= 2e-2 * abs(ref[i].item())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in batch.parameters())
    assert batch.stacked.bn.running_mean.dtype == torch.float32


@pytest.mark.parametrize("case", ["1d", "1d_seq", "2d", "3d"])
def test_per_model_inputs_train_and_eval(case: str) -> None:
    """Inputs [N, B, ...] (model dimension first, not where the rule puts it)."""
    models = make(case, "default")
    batch = ModelBatch(models)
    shape = BN_CASES[case][2]
    x = torch.randn(N, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    refs = [copy.deepcopy(m) for m in models]
    out = batch(x, per_model=True)
    for i, m in enumerate(refs):
        assert rel_err(out[i], m(x[i])) <= 1e-10
        assert rel_err(batch.stacked.bn.running_var[i], m.bn.running_var) <= 1e-10
    batch.eval()
    out = batch(x, per_model=True)
    for i, m in enumerate(refs):
        assert rel_err(out[i], m.eval()(x[i])) <= 1e-10


def test_float32_momentum_sweep_trains_like_alone() -> None:
    models = [m.float() for m in _sweep_models("2d", "momentum_with_none")]
    batch = ModelBatch(models)
    opt = modelbatch.optim.SGD(batch, lr=0.1)
    g = torch.Generator().manual_seed(5)
    data = [
        (torch.randn(6, 4, 3, 3, generator=g), torch.randint(0, 2, (6,), generator=g))
        for _ in range(3)
    ]
    for x, y in data:
        loss = batch.compute_loss(batch(x), y, F.cross_entropy)
        opt.zero_grad()
        loss.backward()
        opt.step()
    ref = train_alone(
        models, lambda i, m: torch.optim.SGD(m.parameters(), lr=0.1), data, F.cross_entropy
    )
    assert_close_models(batch.extract_all(), ref, torch.float32, "float32 sweep")


def test_eps_sweep_saves_what_one_model_alone_saves() -> None:
    """Per-model eps runs modelbatch::batch_norm_eps: one pass, native backward, the same
    saved tensors as one model alone."""
    from modelbatch.bench.profile import saved_bytes

    torch.manual_seed(0)
    models = [
        nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, eps=e), nn.ReLU())
        for e in (1e-5, 1e-3, 0.1)
    ]
    x = torch.randn(8, 3, 10, 10)
    with saved_bytes() as alone:
        models[0](x).sum()
    batch = ModelBatch(models)
    with saved_bytes() as batched:
        batch(x).sum()
    assert batched["bytes"] / 3 <= 1.05 * alone["bytes"]


def test_batch_norm_eps_op_alone_equals_f_batch_norm() -> None:
    from modelbatch.layers.batchnorm import batch_norm_eps

    g = torch.Generator().manual_seed(6)
    x = torch.randn(5, 4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.rand(4, dtype=torch.float64, generator=g).add(0.5).requires_grad_()
    b = torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True)
    eps = torch.full((4,), 0.01, dtype=torch.float64)
    out = batch_norm_eps(x, w, b, eps)[0]
    ref = F.batch_norm(x, None, None, w, b, True, 0.0, 0.01)
    grad = torch.randn(out.shape, dtype=torch.float64, generator=g)
    got = torch.autograd.grad(out, (x, w, b), grad)
    want = torch.autograd.grad(ref, (x, w, b), grad)
    assert rel_err(out, ref) <= 1e-12
    for a, e in zip(got, want, strict=True):
        assert rel_err(a, e) <= 1e-12
    assert torch.autograd.gradcheck(
        lambda x, w, b: batch_norm_eps(x, w, b, eps)[0], (x, w, b), eps=1e-6, atol=1e-6
    )


def test_eps_sweep_with_low_precision_input() -> None:
    torch.manual_seed(0)
    bns = [nn.BatchNorm2d(4, eps=e) for e in (1e-5, 0.5)]
    batch = ModelBatch([nn.Sequential(copy.deepcopy(bn)) for bn in bns])
    x = (torch.randn(6, 4, 3, 3) * 3 + 1).bfloat16()
    out = batch(x)
    assert out.dtype == torch.bfloat16
    for i, bn in enumerate(bns):
        assert rel_err(out[i], bn(x)) <= 1e-2


def test_momentum_sweep_through_sweep_is_one_batch_equal_to_alone() -> None:
    """A BatchNorm-momentum sweep through ``modelbatch.sweep``: one group, one batch; each
    model (and its extracted copy's momentum and eps) as if trained alone."""
    from modelbatch.integrations.sweep import group_by_structure, sweep

    configs = [
        {"bn_momentum": m, "eps": e, "lr": 0.1} for m, e in ((0.1, 1e-5), (None, 1e-3), (0.7, 1e-5))
    ]

    def make_model(c: dict[str, object]) -> nn.Module:
        torch.manual_seed(0)
        return Net(nn.BatchNorm1d(4, momentum=c["bn_momentum"], eps=c["eps"]), 2).double()

    g = torch.Generator().manual_seed(7)
    data = [
        (
            torch.randn(6, 4, generator=g, dtype=torch.float64),
            torch.randint(0, 2, (6,), generator=g),
        )
        for _ in range(3)
    ]
    models = [make_model(c) for c in configs]
    assert len(group_by_structure(models)) == 1
    results = sweep(
        configs,
        make_model,
        train_loader=data,
        loss_fn=F.cross_entropy,
        epochs=1,
        optimizer_cls=torch.optim.SGD,
        keep_models=True,
    )
    ref = train_alone(
        models, lambda i, m: torch.optim.SGD(m.parameters(), lr=0.1), data, F.cross_entropy
    )
    trained = [results[i].model for i in range(3)]
    assert_close_models(trained, ref, torch.float64, "sweep")
    for model, c in zip(trained, configs, strict=True):
        assert model.bn.momentum == c["bn_momentum"] and model.bn.eps == c["eps"]


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("case", ["1d", "2d"])
def test_eps_sweep_on_a_shared_input_without_per_model_tensors(case: str, train: bool) -> None:
    """A BatchNorm without affine and running statistics (input normalisation as a model's
    first layer) has no per-model tensor: on a shared input nothing it sees is batched, yet
    each model must still use its own eps."""
    cls, _, shape = BN_CASES[case]
    models = [
        nn.Sequential(cls(4, eps=eps, affine=False, track_running_stats=False)).double()
        for eps in (1e-5, 1.0, 0.25)
    ]
    for m in models:
        m.train(train)
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    out = ModelBatch(models)(x)
    for i, m in enumerate(models):
        assert rel_err(out[i], m(x)) <= 1e-10, i


def test_a_momentum_set_on_the_batch_applies_to_every_model_or_is_refused() -> None:
    """``batch.stacked.bn.momentum = v`` (a momentum schedule over ``batch.modules()``) was
    silently ignored: the layer runs the values recorded at build time. With one value for
    all models it now applies to every model (and extract returns it); with per-model
    values it is refused."""
    torch.manual_seed(0)
    models = [Net(nn.BatchNorm1d(4), 2).double() for _ in range(2)]
    batch = ModelBatch(copy.deepcopy(models))
    for module in batch.modules():
        if isinstance(module, nn.BatchNorm1d):
            module.momentum = 0.75
            module.eps = 0.5
    x = torch.randn(6, 4, dtype=torch.float64)
    out = batch(x)
    for i, m in enumerate(models):
        m.bn.momentum, m.bn.eps = 0.75, 0.5
        assert rel_err(out[i], m(x)) <= 1e-10
        assert rel_err(batch.stacked.bn.running_mean[i], m.bn.running_mean) <= 1e-10
        assert (batch.extract(i).bn.momentum, batch.extract(i).bn.eps) == (0.75, 0.5)
    sweep = ModelBatch(_sweep_models("1d", "momentum"))
    with pytest.raises(modelbatch.ArchitectureMismatchError, match="cannot set 'momentum'"):
        sweep.stacked.bn.momentum = 0.5
