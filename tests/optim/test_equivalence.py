"""The heart of the project: N models trained in a ModelBatch equal the same N models
trained one by one with plain ``torch.optim`` (float64 within 1e-10, float32 within 1e-5)."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import modelbatch
from modelbatch.optim import SlowOptimizerWarning
from tests.helpers import assert_close_models, train_alone

N = 3
STEPS = 4


# --------------------------------------------------------------------------- architectures
class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(F.relu(self.bn(self.conv(x))).flatten(1))


class EmbedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.norm = nn.LayerNorm(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.fc(self.norm(self.emb(tokens)).mean(dim=1))


def mlp_bn1d() -> nn.Module:
    # No bias before BatchNorm (standard practice): its true gradient is zero, so Adam would
    # amplify pure rounding noise and no two implementations could agree to 1e-10.
    return nn.Sequential(nn.Linear(5, 7, bias=False), nn.BatchNorm1d(7), nn.Tanh(), nn.Linear(7, 3))


def mlp_layernorm() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.ReLU(), nn.Linear(7, 3))


def make_data(arch: str, dtype: torch.dtype, steps: int = STEPS) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1234)
    data = []
    for _ in range(steps):
        if arch == "conv":
            x = torch.randn(6, 2, 4, 4, generator=g, dtype=dtype)
        elif arch == "embed":
            x = torch.randint(0, 11, (6, 5), generator=g)
        else:
            x = torch.randn(6, 5, generator=g, dtype=dtype)
        y = torch.randint(0, 3, (6,), generator=g)
        data.append((x, y))
    return data


ARCHS: dict[str, Callable[[], nn.Module]] = {
    "bn1d": mlp_bn1d,
    "layernorm": mlp_layernorm,
    "conv": ConvNet,
    "embed": EmbedNet,
}


def make_models(arch: str, dtype: torch.dtype, n: int = N) -> list[nn.Module]:
    torch.manual_seed(0)
    return [ARCHS[arch]().to(dtype) for _ in range(n)]


def train_batched(
    models: list[nn.Module],
    make_opt: Callable[[modelbatch.ModelBatch], torch.optim.Optimizer],
    data: list[tuple[Tensor, Tensor]],
    make_sched: Callable[[torch.optim.Optimizer], Any] | None = None,
) -> list[nn.Module]:
    batch = modelbatch.ModelBatch([copy.deepcopy(m) for m in models])
    opt = make_opt(batch)
    sched = make_sched(opt) if make_sched is not None else None
    for x, y in data:
        opt.zero_grad()
        loss = batch.compute_loss(batch(x), y, F.cross_entropy)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
    return batch.extract_all()


LRS = [0.05, 0.1, 0.02]
WDS = [0.0, 0.01, 0.1]

# name -> (batched optimizer factory, per-model torch.optim factory)
OPTIMIZERS: dict[str, tuple[Callable[..., Any], Callable[[int, nn.Module], Any]]] = {
    "sgd": (
        lambda b: modelbatch.optim.SGD(b, lr=LRS),
        lambda i, m: torch.optim.SGD(m.parameters(), lr=LRS[i]),
    ),
    "sgd-momentum-wd": (
        lambda b: modelbatch.optim.SGD(b, lr=LRS, momentum=[0.9, 0.5, 0.0], weight_decay=WDS),
        lambda i, m: torch.optim.SGD(
            m.parameters(), lr=LRS[i], momentum=[0.9, 0.5, 0.0][i], weight_decay=WDS[i]
        ),
    ),
    "sgd-dampening": (
        lambda b: modelbatch.optim.SGD(b, lr=LRS, momentum=0.8, dampening=[0.0, 0.3, 0.6]),
        lambda i, m: torch.optim.SGD(
            m.parameters(), lr=LRS[i], momentum=0.8, dampening=[0.0, 0.3, 0.6][i]
        ),
    ),
    "sgd-nesterov": (
        lambda b: modelbatch.optim.SGD(
            b, lr=LRS, momentum=0.9, nesterov=[True, False, True], weight_decay=WDS
        ),
        lambda i, m: torch.optim.SGD(
            m.parameters(),
            lr=LRS[i],
            momentum=0.9,
            nesterov=[True, False, True][i],
            weight_decay=WDS[i],
        ),
    ),
    "adam": (
        lambda b: modelbatch.optim.Adam(
            b,
            lr=[1e-2, 3e-3, 1e-3],
            betas=[(0.9, 0.999), (0.8, 0.99), (0.5, 0.9)],
            eps=[1e-8, 1e-6, 1e-4],
        ),
        lambda i, m: torch.optim.Adam(
            m.parameters(),
            lr=[1e-2, 3e-3, 1e-3][i],
            betas=[(0.9, 0.999), (0.8, 0.99), (0.5, 0.9)][i],
            eps=[1e-8, 1e-6, 1e-4][i],
        ),
    ),
    "adam-l2-amsgrad": (
        lambda b: modelbatch.optim.Adam(b, lr=1e-2, weight_decay=WDS, amsgrad=[True, False, True]),
        lambda i, m: torch.optim.Adam(
            m.parameters(), lr=1e-2, weight_decay=WDS[i], amsgrad=[True, False, True][i]
        ),
    ),
    "adamw": (
        lambda b: modelbatch.optim.AdamW(b, lr=[1e-2, 3e-3, 1e-3], weight_decay=[0.0, 0.05, 0.5]),
        lambda i, m: torch.optim.AdamW(
            m.parameters(), lr=[1e-2, 3e-3, 1e-3][i], weight_decay=[0.0, 0.05, 0.5][i]
        ),
    ),
    "adamw-amsgrad-maximize": (
        lambda b: modelbatch.optim.AdamW(b, lr=1e-2, amsgrad=True, maximize=[False, True, False]),
        lambda i, m: torch.optim.AdamW(
            m.parameters(), lr=1e-2, amsgrad=True, maximize=[False, True, False][i]
        ),
    ),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_batch_equals_models_trained_alone(opt_name: str, arch: str, dtype: torch.dtype) -> None:
    models = make_models(arch, dtype)
    data = make_data(arch, dtype)
    make_batched, make_alone = OPTIMIZERS[opt_name]
    got = train_batched(models, make_batched, data)
    expected = train_alone(models, make_alone, data, F.cross_entropy)
    assert_close_models(got, expected, dtype, f"{opt_name}/{arch}")
    # Training really changed the weights (the test cannot pass by doing nothing).
    assert not torch.equal(
        got[0].state_dict()["fc.weight" if arch in ("conv", "embed") else "3.weight"],
        models[0].state_dict()["fc.weight" if arch in ("conv", "embed") else "3.weight"],
    )


SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], Any]] = {
    "step": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    "cosine": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=5),
    "onecycle": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=LRS, total_steps=STEPS + 1),
    "lambda-per-model": lambda o: torch.optim.lr_scheduler.LambdaLR(
        o, [lambda s, k=k: 1.0 / (1 + k * s) for k in range(len(o.param_groups))]
    ),
}


def _alone_scheduler(name: str, i: int, opt: torch.optim.Optimizer) -> Any:
    if name == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LRS[i], total_steps=STEPS + 1)
    if name == "lambda-per-model":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s, k=i: 1.0 / (1 + k * s))
    return SCHEDULERS[name](opt)


@pytest.mark.parametrize("sched_name", list(SCHEDULERS))
@pytest.mark.parametrize("opt_cls", ["SGD", "AdamW"])
def test_stock_schedulers_drive_per_model_lrs(sched_name: str, opt_cls: str) -> None:
    dtype = torch.float64
    models = make_models("bn1d", dtype)
    data = make_data("bn1d", dtype)
    kwargs: dict[str, Any] = {"momentum": 0.9} if opt_cls == "SGD" else {}
    got = train_batched(
        models,
        lambda b: getattr(modelbatch.optim, opt_cls)(b, lr=LRS, **kwargs),
        data,
        SCHEDULERS[sched_name],
    )
    expected = train_alone(
        models,
        lambda i, m: getattr(torch.optim, opt_cls)(m.parameters(), lr=LRS[i], **kwargs),
        data,
        F.cross_entropy,
        make_scheduler=lambda i, o: _alone_scheduler(sched_name, i, o),
    )
    assert_close_models(got, expected, dtype, sched_name)


def test_editing_one_param_group_changes_only_that_model() -> None:
    dtype = torch.float64
    models = make_models("layernorm", dtype)
    data = make_data("layernorm", dtype)
    lrs = [0.1, 0.1, 0.1]

    def make(b: modelbatch.ModelBatch) -> torch.optim.Optimizer:
        opt = modelbatch.optim.SGD(b, lr=lrs)
        opt.param_groups[1]["lr"] = 0.5
        return opt

    got = train_batched(models, make, data)
    expected = train_alone(
        models,
        lambda i, m: torch.optim.SGD(m.parameters(), lr=[0.1, 0.5, 0.1][i]),
        data,
        F.cross_entropy,
    )
    assert_close_models(got, expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("opt_cls", [torch.optim.RMSprop, torch.optim.Adagrad])
def test_generic_path_any_torch_optimizer(opt_cls: type, dtype: torch.dtype) -> None:
    models = make_models("conv", dtype)
    data = make_data("conv", dtype)
    lrs = [1e-2, 3e-3, 1e-3]
    factory = modelbatch.OptimizerFactory(opt_cls, lr=lrs, weight_decay=0.01)
    modelbatch.optim.factory._warned.discard(opt_cls)
    with pytest.warns(SlowOptimizerWarning, match="generic per-model path"):
        factory.build(modelbatch.ModelBatch(models))
    got = train_batched(models, factory.build, data)
    expected = train_alone(
        models,
        lambda i, m: opt_cls(m.parameters(), lr=lrs[i], weight_decay=0.01),
        data,
        F.cross_entropy,
    )
    assert_close_models(got, expected, dtype, opt_cls.__name__)


def test_generic_path_with_scheduler_and_state_dict_round_trip() -> None:
    dtype = torch.float64
    models = make_models("bn1d", dtype)
    data = make_data("bn1d", dtype, steps=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SlowOptimizerWarning)
        batch = modelbatch.ModelBatch([copy.deepcopy(m) for m in models])
        opt = modelbatch.OptimizerFactory(torch.optim.RMSprop, lr=LRS, momentum=0.5).build(batch)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for k, (x, y) in enumerate(data):
        if k == 3:  # round-trip the optimizer state mid-run
            sd = copy.deepcopy(opt.state_dict())
            opt.load_state_dict(sd)
        opt.zero_grad()
        batch.compute_loss(batch(x), y, F.cross_entropy).backward()
        opt.step()
        sched.step()
    expected = train_alone(
        models,
        lambda i, m: torch.optim.RMSprop(m.parameters(), lr=LRS[i], momentum=0.5),
        data,
        F.cross_entropy,
        make_scheduler=lambda i, o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    )
    assert_close_models(batch.extract_all(), expected, dtype)


@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW])
def test_factory_picks_vectorised_optimizer(opt_cls: type) -> None:
    batch = modelbatch.ModelBatch(make_models("bn1d", torch.float32))
    opt = modelbatch.OptimizerFactory(opt_cls, lr=LRS, foreach=True).build(batch)
    assert isinstance(opt, modelbatch.optim.BatchOptimizer)
    assert type(opt).__name__ == opt_cls.__name__


def test_design_doc_one_line_construction() -> None:
    dtype = torch.float64
    models = make_models("bn1d", dtype)
    data = make_data("bn1d", dtype)
    batch = modelbatch.ModelBatch([copy.deepcopy(m) for m in models], LRS, torch.optim.Adam)
    assert isinstance(batch.optimizer, modelbatch.optim.Adam)
    for x, y in data:
        batch.optimizer.zero_grad()
        batch.compute_loss(batch(x), y, F.cross_entropy).backward()
        batch.optimizer.step()
    expected = train_alone(
        models, lambda i, m: torch.optim.Adam(m.parameters(), lr=LRS[i]), data, F.cross_entropy
    )
    assert_close_models(batch.extract_all(), expected, dtype)


def test_optimizer_state_dict_round_trip_resumes_exactly() -> None:
    dtype = torch.float64
    models = make_models("conv", dtype)
    data = make_data("conv", dtype, steps=6)

    def run(split: bool) -> list[nn.Module]:
        batch = modelbatch.ModelBatch([copy.deepcopy(m) for m in models])
        opt = modelbatch.optim.AdamW(batch, lr=LRS, amsgrad=True)
        for k, (x, y) in enumerate(data):
            if split and k == 3:
                saved_model = copy.deepcopy(batch.state_dict())
                saved_opt = copy.deepcopy(opt.state_dict())
                batch = modelbatch.ModelBatch(make_models("conv", dtype))
                batch.load_state_dict(saved_model)
                opt = modelbatch.optim.AdamW(batch, lr=0.5)
                opt.load_state_dict(saved_opt)
            opt.zero_grad()
            batch.compute_loss(batch(x), y, F.cross_entropy).backward()
            opt.step()
        return batch.extract_all()

    straight, resumed = run(False), run(True)
    for a, b in zip(straight, resumed, strict=False):
        for (name, t1), t2 in zip(a.state_dict().items(), b.state_dict().values(), strict=False):
            assert torch.equal(t1, t2), name


def test_step_kernel_count_does_not_depend_on_n() -> None:
    """The vectorised step launches the same number of ops for N=2 and N=16."""
    from torch.profiler import ProfilerActivity, profile

    def count_ops(n: int) -> int:
        models = [mlp_layernorm() for _ in range(n)]
        batch = modelbatch.ModelBatch(models)
        opt = modelbatch.optim.AdamW(batch, lr=[1e-3] * n, amsgrad=True)
        x, y = torch.randn(4, 5), torch.randint(0, 3, (4,))
        for _ in range(2):  # the first step creates state
            opt.zero_grad()
            batch.compute_loss(batch(x), y, F.cross_entropy).backward()
            opt.step()
        with warnings.catch_warnings():  # some torch versions warn about profiler cycles
            warnings.simplefilter("ignore", UserWarning)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                opt.step()
        return sum(1 for e in prof.events() if e.name.startswith("aten::"))

    assert count_ops(2) == count_ops(16)


def test_invalid_hyperparameters_name_the_model() -> None:
    batch = modelbatch.ModelBatch(make_models("bn1d", torch.float32))
    with pytest.raises(ValueError, match=r"model 1 \(id 1\): invalid lr -0.1"):
        modelbatch.optim.SGD(batch, lr=[0.1, -0.1, 0.1])
    with pytest.raises(ValueError, match="3 models"):
        modelbatch.optim.Adam(batch, lr=[0.1, 0.2])
    with pytest.raises(ValueError, match=r"model 2 .*beta parameter at index 1"):
        modelbatch.optim.Adam(batch, betas=[(0.9, 0.99), (0.9, 0.99), (0.9, 1.5)])
    with pytest.raises(ValueError, match="Nesterov"):
        modelbatch.optim.SGD(batch, lr=0.1, momentum=[0.9, 0.0, 0.9], nesterov=True)
    with pytest.raises(TypeError, match="unexpected keyword argument 'betas'"):
        modelbatch.optim.SGD(batch, lr=0.1, betas=(0.9, 0.9))  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="ModelBatch"):
        modelbatch.optim.SGD(nn.Linear(2, 2), lr=0.1)  # type: ignore[arg-type]
