"""Speed-up toggles train exactly what eager mode trains: static hyper-parameters (what a
CUDA graph or a compiled step needs), torch.compile of forward and optimizer, and one CUDA
graph per step, each against the same models trained alone with plain torch.optim."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import modelbatch
from modelbatch.speed import compile_optimizer, run_and_undo
from tests.helpers import assert_close_models, train_alone

N = 3
LRS = [0.05, 0.02, 0.01]


def bn_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 7, bias=False), nn.BatchNorm1d(7), nn.Tanh(), nn.Linear(7, 3))


def make_models(dtype: torch.dtype, device: str = "cpu") -> list[nn.Module]:
    torch.manual_seed(0)
    return [bn_mlp().to(device=device, dtype=dtype) for _ in range(N)]


def make_data(dtype: torch.dtype, steps: int, device: str = "cpu") -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [
        (
            torch.randn(6, 5, generator=g, dtype=dtype).to(device),
            torch.randint(0, 3, (6,), generator=g).to(device),
        )
        for _ in range(steps)
    ]


# name -> (batched optimizer, per-model torch.optim); both scheduled by StepLR below.
OPTIMIZERS: dict[str, tuple[Callable[..., Any], Callable[[int, nn.Module], Any]]] = {
    "sgd-momentum-wd": (
        lambda b: modelbatch.optim.SGD(b, lr=LRS, momentum=[0.9, 0.5, 0.8], weight_decay=0.01),
        lambda i, m: torch.optim.SGD(
            m.parameters(), lr=LRS[i], momentum=[0.9, 0.5, 0.8][i], weight_decay=0.01
        ),
    ),
    "adam-amsgrad": (
        lambda b: modelbatch.optim.Adam(b, lr=LRS, amsgrad=[True, False, True]),
        lambda i, m: torch.optim.Adam(m.parameters(), lr=LRS[i], amsgrad=[True, False, True][i]),
    ),
}


def step_lr(opt: torch.optim.Optimizer) -> Any:
    return torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)


def reference(
    models: list[nn.Module], opt_name: str, data: list[tuple[Tensor, Tensor]]
) -> list[nn.Module]:
    return train_alone(
        models,
        OPTIMIZERS[opt_name][1],
        data,
        F.cross_entropy,
        make_scheduler=lambda i, o: step_lr(o),
    )


def state_ids(opt: torch.optim.Optimizer) -> list[int]:
    """Addresses of every state tensor (``opt.state`` holds views of the flat state)."""
    return [v.data_ptr() for s in opt.state.values() for v in s.values() if isinstance(v, Tensor)]


# --------------------------------------------------------------------------- static mode (CPU)
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_static_hparams_train_like_eager_and_keep_tensor_addresses(opt_name: str) -> None:
    dtype = torch.float64
    models = make_models(dtype)
    data = make_data(dtype, 5)
    batch = modelbatch.ModelBatch([copy.deepcopy(m) for m in models])
    opt = OPTIMIZERS[opt_name][0](batch)
    sched = step_lr(opt)
    opt.set_static_hparams(True, masked=False)
    ids: list[int] | None = None
    lr_tensor = None
    for k, (x, y) in enumerate(data):
        opt.zero_grad()
        batch.compute_loss(batch(x), y, F.cross_entropy).backward()
        opt.step()
        sched.step()
        if k == 1:  # after the momentum buffer exists, nothing is rebound any more
            ids = state_ids(opt)
            lr_tensor = opt.hparam("lr", next(iter(batch.stacked.parameters())))
    assert ids == state_ids(opt)
    assert lr_tensor is not None
    assert opt.hparam("lr", next(iter(batch.stacked.parameters()))).data_ptr() == (
        lr_tensor.data_ptr()
    )
    assert_close_models(batch.extract_all(), reference(models, opt_name, data), dtype, opt_name)


def test_static_masked_update_freezes_quarantined_model_like_eager() -> None:
    dtype = torch.float64
    models = make_models(dtype)
    data = make_data(dtype, 4)
    results = []
    for static in (False, True):
        batch = modelbatch.ModelBatch([copy.deepcopy(m) for m in models])
        opt = modelbatch.optim.Adam(batch, lr=LRS)
        if static:
            opt.set_static_hparams(True, masked=True)
        for k, (x, y) in enumerate(data):
            if k == 2:
                batch.quarantine(1)
                frozen = {n: p[1].clone() for n, p in batch.stacked_parameters()}
                frozen_state = {n: s["exp_avg"][1].clone() for n, s in opt.state.items()}
            opt.zero_grad()
            batch.compute_loss(batch(x), y, F.cross_entropy).backward()
            opt.step()
        for n, p in batch.stacked_parameters():
            assert torch.equal(p[1], frozen[n]), n
            assert torch.equal(opt.state[n]["exp_avg"][1], frozen_state[n]), n
        results.append(batch.extract_all())
    assert_close_models(results[1], results[0], dtype, "static vs eager masked")


def test_refresh_refuses_a_change_that_flips_a_captured_branch() -> None:
    batch = modelbatch.ModelBatch(make_models(torch.float64))
    opt = modelbatch.optim.Adam(batch, lr=0.01, weight_decay=0.0)
    opt.set_static_hparams(True, masked=False)
    x, y = make_data(torch.float64, 1)[0]
    batch.compute_loss(batch(x), y, F.cross_entropy).backward()
    opt.step()
    opt.param_groups[2]["lr"] = 0.5  # a value change is fine
    opt.refresh_hparams()
    assert opt.hparam("lr", x)[2].item() == 0.5
    opt.param_groups[1]["weight_decay"] = 0.1  # turns on a code path the step skipped
    with pytest.raises(RuntimeError, match="weight_decay"):
        opt.step()


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_warmup_before_capture_is_undone_exactly(opt_name: str) -> None:
    # What capture_cuda_graph does before capturing, run on the CPU: warm-up steps that
    # create the optimizer state, then everything put back; training must not notice.
    dtype = torch.float64
    models = make_models(dtype)
    data = make_data(dtype, 4)
    batch = modelbatch.ModelBatch([copy.deepcopy(m) for m in models])
    opt = OPTIMIZERS[opt_name][0](batch)
    sched = step_lr(opt)
    opt.init_state()
    opt.set_static_hparams(True, masked=False)
    x0, y0 = data[-1]

    def body() -> None:
        batch.compute_loss(batch(x0), y0, F.cross_entropy).backward()
        opt.step()

    run_and_undo(batch, opt, body, steps=3)
    assert all(torch.equal(s["step"], torch.zeros(N, dtype=dtype)) for s in opt.state.values())
    for x, y in data:
        opt.zero_grad()
        batch.compute_loss(batch(x), y, F.cross_entropy).backward()
        opt.step()
        sched.step()
    assert_close_models(batch.extract_all(), reference(models, opt_name, data), dtype, opt_name)


def test_capture_cuda_graph_needs_a_cuda_batch() -> None:
    batch = modelbatch.ModelBatch(make_models(torch.float32))
    opt = modelbatch.optim.Adam(batch)
    x, y = make_data(torch.float32, 1)[0]
    with pytest.raises(RuntimeError, match="CUDA device"):
        batch.capture_cuda_graph(opt, F.cross_entropy, x, y)


# --------------------------------------------------------------------------- torch.compile (CPU)
def test_enable_compile_and_compiled_optimizer_match_training_alone() -> None:
    torch._dynamo.reset()
    dtype = torch.float32
    models = make_models(dtype)
    data = make_data(dtype, 4)
    batch = modelbatch.ModelBatch([copy.deepcopy(m) for m in models])
    opt = OPTIMIZERS["adam-amsgrad"][0](batch)
    sched = step_lr(opt)
    assert batch.enable_compile() is batch
    compile_optimizer(opt)
    for x, y in data:
        opt.zero_grad()
        batch.compute_loss(batch(x), y, F.cross_entropy).backward()
        opt.step()
        sched.step()  # changes the lr: refreshed in place, no recompilation needed
    assert batch._compiled_forward is not None
    assert_close_models(batch.extract_all(), reference(models, "adam-amsgrad", data), dtype)
    torch._dynamo.reset()


# --------------------------------------------------------------------------- CUDA graphs (GPU)
@pytest.fixture
def exact_cuda_math() -> Any:
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.cuda
@pytest.mark.usefixtures("exact_cuda_math")
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_cuda_graph_step_matches_training_alone(opt_name: str) -> None:
    dtype = torch.float32
    models = make_models(dtype, "cuda")
    data = make_data(dtype, 6, "cuda")
    batch = modelbatch.ModelBatch([copy.deepcopy(m) for m in models])
    opt = OPTIMIZERS[opt_name][0](batch)
    sched = step_lr(opt)
    step = batch.capture_cuda_graph(opt, F.cross_entropy, *data[0])
    # The warm-up was undone: nothing trained yet.
    for p, m in zip(batch.extract(0).parameters(), models[0].parameters(), strict=True):
        assert torch.equal(p, m)
    losses = []
    for x, y in data:
        losses.append(step(x, y).item())
        sched.step()
    expected = reference(models, opt_name, data)
    assert_close_models(batch.extract_all(), expected, dtype, f"cuda graph {opt_name}")
    assert losses[0] != losses[-1]


@pytest.mark.cuda
def test_cuda_graph_quarantine_rules() -> None:
    models = make_models(torch.float32, "cuda")
    data = make_data(torch.float32, 3, "cuda")
    batch = modelbatch.ModelBatch(models)
    opt = modelbatch.optim.Adam(batch, lr=0.01)
    step = batch.capture_cuda_graph(opt, F.cross_entropy, *data[0])
    step(*data[0])
    with pytest.raises(ValueError, match="captured for"):
        step(data[1][0][:3], data[1][1][:3])
    batch.quarantine(1)
    with pytest.raises(RuntimeError, match="quarantine_aware=True"):
        step(*data[1])

    batch.unquarantine(1)
    # Captured with every model active; model 1 is quarantined only afterwards.
    aware = batch.capture_cuda_graph(opt, F.cross_entropy, *data[0], quarantine_aware=True)
    aware(*data[0])
    batch.quarantine(1)
    before = {n: t.clone() for n, t in [*batch.stacked_parameters(), *batch.stacked_buffers()]}
    aware(*data[1])
    aware(*data[2])
    for n, t in [*batch.stacked_parameters(), *batch.stacked_buffers()]:
        assert torch.equal(t[1], before[n][1]), n  # quarantined: parameters and BN stats frozen
        assert not torch.equal(t[0], before[n][0]), n  # active: trained


# --------------------------------------------------------------------------- compiled flat update
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_compiled_optimizer_matches_eager_without_recompiling(opt_name: str) -> None:
    """The compiled flat update trains like eager (float64 within 1e-10), under an LR
    scheduler and a quarantine, with one compilation for the whole run."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    dtype = torch.float64
    models = make_models(dtype)
    data = make_data(dtype, 5)
    results = []
    for compiled in (False, True):
        batch = modelbatch.ModelBatch([copy.deepcopy(m) for m in models])
        opt = OPTIMIZERS[opt_name][0](batch)
        sched = step_lr(opt)
        if compiled:
            compile_optimizer(opt)
            counters.clear()
        for k, (x, y) in enumerate(data):
            if k == 3:
                batch.quarantine(1)
                frozen = {n: p[1].clone() for n, p in batch.stacked_parameters()}
            opt.zero_grad()
            batch.compute_loss(batch(x), y, F.cross_entropy).backward()
            opt.step()
            sched.step()
        for n, p in batch.stacked_parameters():
            assert torch.equal(p[1], frozen[n]), n
        results.append(batch.extract_all())
    assert counters["stats"]["unique_graphs"] == 2  # coefficients + update, compiled once
    assert_close_models(results[1], results[0], dtype, f"compiled {opt_name}")
    torch._dynamo.reset()
