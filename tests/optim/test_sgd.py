"""Vectorised SGD details that the equivalence suite does not reach: per-model momentum
switched on mid-training (a momentum warm-up), exactly as torch.optim.SGD per model; the
host path (shared momentum, step counts on the host) and its hand-overs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modelbatch
from modelbatch.bench.profile import KernelCounter
from modelbatch.speed import run_and_undo
from tests.helpers import assert_close_models


def test_momentum_switched_on_mid_training_starts_from_the_raw_gradient() -> None:
    """Model 1 trains without momentum for 2 steps, then with 0.9; model 2 switches at step
    3; model 0 has momentum from the start. torch.optim.SGD creates a model's buffer from
    the raw gradient at its first step with momentum: so must the batch."""
    dtype = torch.float64
    torch.manual_seed(0)
    models = [
        nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype) for _ in range(3)
    ]
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(8, 5, generator=g, dtype=dtype), torch.randint(0, 3, (8,), generator=g))
            for _ in range(6)]  # fmt: skip
    schedule = {0: [0.9, 0.0, 0.0], 2: [0.9, 0.9, 0.0], 3: [0.9, 0.9, 0.5]}

    batch = modelbatch.ModelBatch([copy.deepcopy(m) for m in models])
    opt = modelbatch.optim.SGD(batch, lr=0.1, momentum=schedule[0], dampening=[0.0, 0.1, 0.2])
    for k, (x, y) in enumerate(data):
        for i, mom in enumerate(schedule.get(k, [])):
            opt.param_groups[i]["momentum"] = mom
        opt.zero_grad()
        batch.compute_loss(batch(x), y, F.cross_entropy).backward()
        opt.step()

    expected = []
    for i, m in enumerate(models):
        ref = copy.deepcopy(m)
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=schedule[0][i],
                                  dampening=[0.0, 0.1, 0.2][i])  # fmt: skip
        for k, (x, y) in enumerate(data):
            if k in schedule:
                ref_opt.param_groups[0]["momentum"] = schedule[k][i]
            ref_opt.zero_grad()
            F.cross_entropy(ref(x), y).backward()
            ref_opt.step()
        expected.append(ref)
    assert_close_models(batch.extract_all(), expected, dtype, "momentum warm-up")
    started = opt.state["0.weight"]["momentum_started"]
    assert started.tolist() == [1.0, 1.0, 1.0]


# ----------------------------------------------------------------------------- host path
SGD_CONFIGS = {
    "momentum": ({"momentum": 0.9}, 3),
    "nesterov-wd-maximize": (
        {"momentum": 0.8, "nesterov": True, "weight_decay": 0.05, "maximize": True},
        6,
    ),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", list(SGD_CONFIGS))
def test_host_path_equals_torch_optim_and_counts_steps(name: str, dtype: torch.dtype) -> None:
    """Every model with momentum, no dampening, all active: a settled step is the gather,
    one buffer kernel and the parameter update (the step counts stay on the host until the
    state is read), and equals torch.optim.SGD per model, a quarantined step included."""
    kwargs, kernels = SGD_CONFIGS[name]
    torch.manual_seed(0)
    models = [
        nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype) for _ in range(3)
    ]
    g = torch.Generator().manual_seed(5)
    data = [(torch.randn(8, 5, generator=g, dtype=dtype), torch.randint(0, 3, (8,), generator=g))
            for _ in range(7)]  # fmt: skip
    batch = modelbatch.ModelBatch([copy.deepcopy(m) for m in models])
    opt = modelbatch.optim.SGD(batch, lr=0.05, **kwargs)
    for k, (x, y) in enumerate(data):
        if k == 4:
            batch.quarantine(2)
        if k == 5:
            batch.unquarantine(2)
        opt.zero_grad()
        batch.compute_loss(batch(x), y, F.cross_entropy).backward()
        if k == 6:  # (reading the state at step 2 unsettles SGD for one step)
            with KernelCounter() as counter:
                opt.step()
            assert counter.total == kernels
        else:
            opt.step()
        if k == 2:
            assert opt.state["0.weight"]["step"].tolist() == [3.0, 3.0, 3.0]

    expected = []
    for i, m in enumerate(models):
        ref = copy.deepcopy(m)
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, **kwargs)
        for k, (x, y) in enumerate(data):
            ref_opt.zero_grad()
            F.cross_entropy(ref(x), y).backward()
            if not (k == 4 and i == 2):
                ref_opt.step()
        expected.append(ref)
    assert_close_models(batch.extract_all(), expected, dtype, name)
    assert opt.state["0.weight"]["step"].tolist() == [7.0, 7.0, 6.0]


def test_run_and_undo_drops_the_host_steps() -> None:
    """The warm-up before a graph capture restores the state tensors: steps counted on
    the host in between must not reappear in the step count."""
    torch.manual_seed(0)
    batch = modelbatch.ModelBatch([nn.Linear(4, 2).double() for _ in range(2)])
    opt = modelbatch.optim.SGD(batch, lr=0.1, momentum=0.9)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 2, (6,))

    def body() -> None:
        batch.compute_loss(batch(x), y, F.cross_entropy).backward()
        opt.step()

    for _ in range(3):
        opt.zero_grad()
        body()
    run_and_undo(batch, opt, body, steps=4)
    opt.zero_grad()
    body()
    assert opt.state["weight"]["step"].tolist() == [4.0, 4.0]


def test_host_and_device_paths_are_bit_identical() -> None:
    """The same models on the host path, and on the masked device path (a quarantined
    fourth model next to them), end bit for bit the same."""
    dtype = torch.float32

    def make(n: int) -> list[nn.Module]:
        torch.manual_seed(0)
        return [nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)) for _ in range(n)]

    g = torch.Generator().manual_seed(5)
    data = [(torch.randn(8, 5, generator=g, dtype=dtype), torch.randint(0, 3, (8,), generator=g))
            for _ in range(5)]  # fmt: skip
    host = modelbatch.ModelBatch(make(3))
    dev = modelbatch.ModelBatch([*make(3), make(1)[0]])
    dev.quarantine(3)
    opts = [modelbatch.optim.SGD(b, lr=0.05, momentum=0.9, nesterov=True) for b in (host, dev)]
    for batch, opt in zip((host, dev), opts, strict=True):
        for x, y in data:
            opt.zero_grad()
            batch.compute_loss(batch(x), y, F.cross_entropy).backward()
            opt.step()
    assert opts[0]._slots[0].pending > 0  # the host path ran (internal)
    dev_params = dict(dev.stacked_parameters())
    for key, value in host.stacked_parameters():
        assert torch.equal(value, dev_params[key][:3]), key
    buf = opts[1].state["0.weight"]["momentum_buffer"][:3]
    assert torch.equal(opts[0].state["0.weight"]["momentum_buffer"], buf)


@pytest.mark.parametrize(
    "kw",
    [
        {"momentum": 0.9},
        {"momentum": 0.9, "dampening": 0.5},
        {"momentum": 0.9, "nesterov": True},
    ],
    ids=["plain", "dampening", "nesterov"],
)
def test_momentum_restarts_after_run_and_undo_and_stays_recorded(kw: dict[str, float]) -> None:
    """``run_and_undo`` (CUDA graph warm-up) puts every momentum buffer back to "not
    started"; SGD still believed them all started (settled), so it skipped recording them:
    with dampening the first real step used ``(1 - dampening) * g`` for the new buffer, and
    otherwise ``momentum_started`` stayed 0, so the next read of the state (a checkpoint)
    restarted every model's momentum. A checkpoint resumed from it must continue exactly."""
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
              for _ in range(3)]  # fmt: skip
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(6, 4, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (6,), generator=g)) for _ in range(6)]  # fmt: skip
    batch = modelbatch.ModelBatch(copy.deepcopy(models))
    opt = modelbatch.optim.SGD(batch, lr=0.1, **kw)
    x0, y0 = data[0]

    def body() -> None:
        batch.compute_loss(batch(x0), y0, F.cross_entropy).backward()
        opt.step()

    def step(b: modelbatch.ModelBatch, o: modelbatch.optim.SGD, x: torch.Tensor,
             y: torch.Tensor) -> None:  # fmt: skip
        o.zero_grad()
        b.compute_loss(b(x), y, F.cross_entropy).backward()
        o.step()

    run_and_undo(batch, opt, body, 2)
    for x, y in data[:3]:
        step(batch, opt, x, y)
    saved = copy.deepcopy(opt.state_dict())
    assert saved["state"]["0.weight"]["momentum_started"].tolist() == [1.0] * 3
    resumed = modelbatch.ModelBatch(batch.extract_all())
    opt2 = modelbatch.optim.SGD(resumed, lr=0.1, **kw)
    opt2.load_state_dict(saved)
    for x, y in data[3:]:
        step(batch, opt, x, y)
        step(resumed, opt2, x, y)
    alone = []
    for m in models:
        m = copy.deepcopy(m)
        ref = torch.optim.SGD(m.parameters(), lr=0.1, **kw)
        for x, y in data:
            ref.zero_grad()
            F.cross_entropy(m(x), y).backward()
            ref.step()
        alone.append(m)
    assert_close_models(batch.extract_all(), alone, torch.float64)
    assert_close_models(resumed.extract_all(), alone, torch.float64)
