"""Adam/AdamW's host path (every model with the same hyper-parameters and step count, all
active: bias corrections as Python numbers, the step state written lazily) against
``torch.optim`` per model, and its hand-overs to and from the device path."""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import modelbatch
from modelbatch.bench.profile import KernelCounter
from modelbatch.speed import run_and_undo
from tests.helpers import assert_close_models

N = 3


def make_models(dtype: torch.dtype = torch.float64) -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype) for _ in range(N)]


def make_data(steps: int, dtype: torch.dtype = torch.float64) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(8, 5, generator=g, dtype=dtype), torch.randint(0, 3, (8,), generator=g))
            for _ in range(steps)]  # fmt: skip


def train(batch: modelbatch.ModelBatch, opt: Any, data: list[tuple[Tensor, Tensor]]) -> None:
    for x, y in data:
        opt.zero_grad()
        batch.compute_loss(batch(x), y, F.cross_entropy).backward()
        opt.step()


def train_alone(
    models: list[nn.Module],
    make_opt: Callable[[nn.Module], torch.optim.Optimizer],
    data: list[tuple[Tensor, Tensor]],
    skip: dict[int, set[int]] | None = None,
    betas_at: dict[int, tuple[float, float]] | None = None,
) -> list[nn.Module]:
    """Each model alone; ``skip[k]``: models that do not step at step k."""
    out = []
    for i, model in enumerate(models):
        m = copy.deepcopy(model)
        opt = make_opt(m)
        for k, (x, y) in enumerate(data):
            if betas_at and k in betas_at:
                opt.param_groups[0]["betas"] = betas_at[k]
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            if skip is None or i not in skip.get(k, set()):
                opt.step()
        out.append(m)
    return out


CONFIGS: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {
    "adam": (
        lambda b: modelbatch.optim.Adam(b, lr=1e-2, betas=(0.8, 0.99), eps=1e-6),
        lambda m: torch.optim.Adam(m.parameters(), lr=1e-2, betas=(0.8, 0.99), eps=1e-6),
    ),
    "adam-l2-amsgrad-maximize": (
        lambda b: modelbatch.optim.Adam(b, lr=1e-2, weight_decay=0.1, amsgrad=True, maximize=True),
        lambda m: torch.optim.Adam(
            m.parameters(), lr=1e-2, weight_decay=0.1, amsgrad=True, maximize=True
        ),
    ),
    "adamw": (
        lambda b: modelbatch.optim.AdamW(b, lr=1e-2, weight_decay=0.3),
        lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.3),
    ),
}


def kernels_of_step(batch: modelbatch.ModelBatch, opt: Any, x: Tensor, y: Tensor) -> int:
    opt.zero_grad()
    batch.compute_loss(batch(x), y, F.cross_entropy).backward()
    with KernelCounter() as counter:
        opt.step()
    return counter.total


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_host_path_equals_torch_optim(name: str, dtype: torch.dtype) -> None:
    models = make_models(dtype)
    data = make_data(5, dtype)
    make_batched, make_alone = CONFIGS[name]
    batch = modelbatch.ModelBatch(copy.deepcopy(models))
    opt = make_batched(batch)
    train(batch, opt, data[:4])
    # The host path ran: the element-wise kernels only (no [N]-sized step-state work).
    expected = {"adam": 7, "adam-l2-amsgrad-maximize": 10, "adamw": 8}[name]
    assert kernels_of_step(batch, opt, *data[4]) == expected
    assert_close_models(batch.extract_all(), train_alone(models, make_alone, data), dtype, name)
    # The step state reads as torch.optim's (written from the host count when read).
    state = opt.state["0.weight"]
    assert torch.equal(state["step"], torch.full((N,), 5.0, dtype=torch.float64))
    assert float(opt.torch_state_dicts()[1]["state"][0]["step"]) == 5.0
    b1, b2 = opt.param_groups[0]["betas"]
    expected_bc = torch.full((N,), 1 - b1**5, dtype=torch.float64)
    torch.testing.assert_close(state["bias_correction1"], expected_bc, rtol=1e-14, atol=0)
    expected_bc = torch.full((N,), 1 - b2**5, dtype=torch.float64)
    torch.testing.assert_close(state["bias_correction2"], expected_bc, rtol=1e-14, atol=0)


@pytest.mark.parametrize("copied", [False, True], ids=["scalars", "copied"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_host_and_device_paths_are_bit_identical(
    name: str, dtype: torch.dtype, copied: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model's numbers do not depend on which path ran: the same models trained on the
    host path, and on the device path (a fourth model with another lr next to them), are
    bit for bit the same; so is their optimizer state. ``copied``: the host numbers reach
    the kernel as off the CPU (a [1, 2] tensor copied to the device)."""
    monkeypatch.setattr(modelbatch.optim.Adam, "_host_ke_copy", copied)
    make_batched = CONFIGS[name][0]
    data = make_data(5, dtype)
    host_batch = modelbatch.ModelBatch(make_models(dtype))
    host_opt = make_batched(host_batch)
    extra = [*make_models(dtype), make_models(dtype)[0]]
    dev_batch = modelbatch.ModelBatch(extra)
    dev_opt = make_batched(dev_batch)
    dev_opt.param_groups[N]["lr"] = 0.5  # another lr: the device path for every step
    train(host_batch, host_opt, data)
    train(dev_batch, dev_opt, data)
    assert host_opt._slots[0].host_t == 5 and dev_opt._slots[0].host_t is None
    dev_params = dict(dev_batch.stacked_parameters())
    for key, value in host_batch.stacked_parameters():
        assert torch.equal(value, dev_params[key][:N]), key
    for key, s in host_opt.state.items():
        for k, v in s.items():
            assert torch.equal(v, dev_opt.state[key][k][:N]), (key, k)


def test_hand_overs_between_host_and_device_paths() -> None:
    """Host steps, a quarantined model (device path, masked), per-model lrs for a step
    (device path), the same lr again, a betas change, a state read: the result equals each
    model trained alone with the same skips and changes."""
    models = make_models()
    data = make_data(8)
    batch = modelbatch.ModelBatch(copy.deepcopy(models))
    opt = modelbatch.optim.Adam(batch, lr=1e-2)
    train(batch, opt, data[:2])  # host path
    _ = opt.state_dict()  # flushes the host count into the step state
    batch.quarantine(1)
    before = {k: v.clone() for k, v in opt.state["2.weight"].items()}
    weight = dict(batch.stacked_parameters())["2.weight"]
    p_before = weight.detach().clone()
    train(batch, opt, data[2:3])  # device path, masked
    after = opt.state["2.weight"]
    for k, v in before.items():
        assert torch.equal(after[k][1], v[1]), k  # the quarantined model is untouched
    assert torch.equal(weight[1], p_before[1])
    batch.unquarantine(1)
    train(batch, opt, data[3:4])  # device path (steps differ now)
    train(batch, opt, data[4:6])
    for g in opt.param_groups:
        g["betas"] = (0.85, 0.995)
    train(batch, opt, data[6:8])

    def make(m: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.Adam(m.parameters(), lr=1e-2)

    expected = train_alone(models, make, data, skip={2: {1}}, betas_at={6: (0.85, 0.995)})
    assert_close_models(batch.extract_all(), expected, torch.float64, "hand-overs")


def test_betas_change_hands_over_to_the_device_path_and_matches_torch() -> None:
    """torch.optim recomputes the bias corrections from the new betas; so does the step
    state, on the device (the host path hands over: a model's numbers then follow the same
    arithmetic whatever the other models do)."""
    models = make_models()
    data = make_data(6)
    batch = modelbatch.ModelBatch(copy.deepcopy(models))
    opt = modelbatch.optim.AdamW(batch, lr=1e-2)
    train(batch, opt, data[:3])
    for g in opt.param_groups:
        g["betas"] = (0.7, 0.9)
    train(batch, opt, data[3:5])
    assert kernels_of_step(batch, opt, *data[5]) == 13  # the device path (8 + 5 [N]-sized)

    def make(m: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(m.parameters(), lr=1e-2)

    expected = train_alone(models, make, data, betas_at={3: (0.7, 0.9)})
    assert_close_models(batch.extract_all(), expected, torch.float64, "betas")
    state = opt.state["0.bias"]
    expected_bc = torch.full((N,), 1 - 0.7**6, dtype=torch.float64)
    torch.testing.assert_close(state["bias_correction1"], expected_bc, rtol=1e-14, atol=0)


def _fresh(make: Callable[[modelbatch.ModelBatch], Any]) -> tuple[modelbatch.ModelBatch, Any]:
    batch = modelbatch.ModelBatch(make_models())
    return batch, make(batch)


@pytest.mark.parametrize("per_model_lr", [False, True], ids=["host", "device"])
def test_resume_from_state_dict_is_bit_for_bit(per_model_lr: bool) -> None:
    lr: Any = [1e-2, 2e-2, 3e-2] if per_model_lr else 1e-2

    def make(b: modelbatch.ModelBatch) -> Any:
        return modelbatch.optim.Adam(b, lr=lr)

    data = make_data(5)
    batch, opt = _fresh(make)
    train(batch, opt, data[:3])
    saved = copy.deepcopy((batch.state_dict(), opt.state_dict()))
    train(batch, opt, data[3:])
    batch2, opt2 = _fresh(make)
    batch2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    # The loaded step state is the same for every model: the host knows the count again
    # (internal), and the host path resumes when the hyper-parameters allow it.
    assert [s.host_t for s in opt2._slots] == [3]
    train(batch2, opt2, data[3:])
    for a, b in zip(batch.state_dict().values(), batch2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for name, s in opt.state.items():
        for k, v in s.items():
            assert torch.equal(v, opt2.state[name][k]), (name, k)


def test_run_and_undo_restores_the_host_step_count() -> None:
    """``run_and_undo`` (the warm-up before a graph capture) snapshots the state tensors,
    runs steps, restores them: steps the host path took in between must not survive."""
    data = make_data(4)

    def make(b: modelbatch.ModelBatch) -> Any:
        return modelbatch.optim.Adam(b, lr=1e-2)

    batch, opt = _fresh(make)
    ref_batch, ref_opt = _fresh(make)
    train(batch, opt, data[:2])
    train(ref_batch, ref_opt, data[:2])
    x, y = data[2]

    def body() -> None:
        batch.compute_loss(batch(x), y, F.cross_entropy).backward()
        opt.step()

    run_and_undo(batch, opt, body, steps=3)
    train(batch, opt, data[2:])
    train(ref_batch, ref_opt, data[2:])
    assert torch.equal(opt.state["0.weight"]["step"], ref_opt.state["0.weight"]["step"])
    for a, b in zip(batch.parameters(), ref_batch.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=0)


def test_pickle_mid_run_keeps_the_step_count() -> None:
    data = make_data(4)
    batch, opt = _fresh(lambda b: modelbatch.optim.Adam(b, lr=1e-2))
    train(batch, opt, data[:2])
    b2, o2 = pickle.loads(pickle.dumps((batch, opt)))
    train(batch, opt, data[2:])
    train(b2, o2, data[2:])
    assert torch.equal(o2.state["0.weight"]["step"], torch.full((N,), 4.0, dtype=torch.float64))
    for a, b in zip(batch.parameters(), b2.parameters(), strict=True):
        assert torch.equal(a, b)
