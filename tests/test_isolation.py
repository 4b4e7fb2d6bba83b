"""Per-model isolation: a bad model never changes the others, quarantined models are frozen
(parameters, buffers, optimizer state), clipping is per model, dropping models shrinks every
per-model structure and the remaining models then train exactly as if alone."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import modelbatch
from modelbatch import CallbackPack, ModelBatch, NaNGuard
from modelbatch.isolation import shrink_scheduler
from modelbatch.optim import PerModelOptimizer
from tests.helpers import assert_close_models, train_alone

N = 3


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 6, bias=False)  # a bias before BatchNorm has ~0 gradient
        self.bn = nn.BatchNorm1d(6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))


def make_models(bn: bool, dtype: torch.dtype = torch.float32, n: int = N) -> list[nn.Module]:
    torch.manual_seed(0)
    return [(BNNet() if bn else mlp()).to(dtype) for _ in range(n)]


def data(steps: int, n: int = N, dtype: torch.dtype = torch.float32) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(n, 8, 5, generator=g, dtype=dtype), torch.randint(0, 3, (8,), generator=g))
        for _ in range(steps)
    ]


OPTIMIZERS: dict[str, Callable[[ModelBatch], torch.optim.Optimizer]] = {
    "sgd_momentum": lambda b: modelbatch.optim.SGD(b, lr=0.1, momentum=0.9),
    "adamw": lambda b: modelbatch.optim.AdamW(b, lr=0.01, weight_decay=0.1),
}


def snapshot(batch: ModelBatch, opt: torch.optim.Optimizer) -> dict[str, Tensor]:
    out = {f"p.{k}": v.detach().clone() for k, v in batch.stacked_parameters()}
    out.update({f"b.{k}": v.detach().clone() for k, v in batch.stacked_buffers()})
    for name, st in opt.state.items():
        for k, v in st.items():
            if isinstance(v, Tensor):
                out[f"s.{name}.{k}"] = v.detach().clone()
    return out


def run_guarded(bn: bool, opt_name: str, poison: int | None, poison_from: int) -> tuple[
    list[dict[str, Tensor]], ModelBatch, CallbackPack
]:
    """Train with per-model inputs and a NaNGuard; model ``poison`` sees NaN inputs from
    step ``poison_from`` on. Returns the snapshot after every step."""
    batch = ModelBatch(make_models(bn))
    opt = OPTIMIZERS[opt_name](batch)
    pack = CallbackPack(batch, [NaNGuard()], optimizer=opt)
    snaps = []
    for step, (x, y) in enumerate(data(5)):
        if poison is not None and step >= poison_from:
            x = x.clone()
            x[poison] = float("nan")
        pack.on_step_begin()
        loss = batch.compute_loss(batch(x, per_model=True), y, F.cross_entropy)
        opt.zero_grad()
        loss.backward()
        pack.on_before_optimizer_step()
        opt.step()
        pack.on_step_end()
        snaps.append(snapshot(batch, opt))
    return snaps, batch, pack


@pytest.mark.parametrize("bn", [False, True], ids=["mlp", "batchnorm"])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_nan_model_is_quarantined_and_others_are_bit_identical(bn: bool, opt_name: str) -> None:
    clean, _, _ = run_guarded(bn, opt_name, poison=None, poison_from=0)
    dirty, batch, pack = run_guarded(bn, opt_name, poison=1, poison_from=2)
    assert batch.active.tolist() == [True, False, True]
    assert [e["model_id"] for e in pack.events] == [1]
    assert pack.events[0]["step"] == 2 and "non-finite" in pack.events[0]["reason"]
    assert [row["active"] for row in batch.metrics()] == [True, False, True]
    for step in range(5):
        for key, value in dirty[step].items():
            for i in (0, 2):  # the other models: bit-identical to the clean run
                assert torch.equal(value[i], clean[step][key][i]), (step, key, i)
            # The poisoned model is frozen as it was after its last good step (step 1).
            frozen_at = clean[min(step, 1)][key][1]
            assert torch.equal(value[1], frozen_at), (step, key)


def test_manual_quarantine_freezes_everything_and_unquarantine_resumes() -> None:
    models = make_models(bn=True, dtype=torch.float64)
    batch = ModelBatch(models)
    opt = modelbatch.optim.AdamW(batch, lr=0.01)
    steps = data(4, dtype=torch.float64)
    x0 = steps[0][0][0]
    batch.quarantine(1)
    assert not batch.all_active
    before = snapshot(batch, opt)
    for x, y in steps[:2]:
        loss = batch.compute_loss(batch(x[0]), y, F.cross_entropy)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = snapshot(batch, opt)
    for key, value in before.items():  # model 1: parameters and BatchNorm buffers frozen
        assert torch.equal(after[key][1], value[1]), key
    assert float(opt.state["fc1.weight"]["step"][1]) == 0.0
    # The others trained exactly as alone.
    ref = train_alone(
        [models[0], models[2]],
        lambda i, m: torch.optim.AdamW(m.parameters(), lr=0.01),
        [(x[0], y) for x, y in steps[:2]],
        F.cross_entropy,
    )
    assert_close_models([batch.extract(0), batch.extract(2)], ref, torch.float64)
    batch.unquarantine(1)
    assert batch.all_active
    loss = batch.compute_loss(batch(x0), steps[0][1], F.cross_entropy)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert float(opt.state["fc1.weight"]["step"][1]) == 1.0


def test_all_active_sees_direct_edits_of_the_mask() -> None:
    batch = ModelBatch(make_models(bn=False))
    assert batch.all_active
    batch.active[2] = False
    assert not batch.all_active
    batch.active.fill_(True)
    assert batch.all_active


# --------------------------------------------------------------------------- detection
def test_nonfinite_and_divergence_detection() -> None:
    batch = ModelBatch(make_models(bn=False))
    x, y = data(1)[0]
    batch.compute_loss(batch(x, per_model=True), y, F.cross_entropy).backward()
    assert not modelbatch.nonfinite_models(batch).any()
    params = dict(batch.stacked_parameters())
    params["2.bias"].grad[0, 1] = float("inf")
    params["0.weight"].grad[2, 0, 0] = float("nan")
    assert modelbatch.nonfinite_grads(batch).tolist() == [True, False, True]
    losses = torch.tensor([1.0, float("nan"), 2.0])
    assert modelbatch.nonfinite_models(batch, losses, grads=False).tolist() == [False, True, False]
    assert modelbatch.nonfinite_models(batch, losses).tolist() == [True, True, True]
    assert modelbatch.diverged_models(torch.tensor([1.0, 5.0, math.inf]), 3.0).tolist() == [
        False, True, True,
    ]
    assert modelbatch.diverged_models(
        torch.tensor([1.0, 5.0, 0.5]), [2.0, 6.0, 0.1], mode="min"
    ).tolist() == [True, True, False]


# --------------------------------------------------------------------------- clipping
def _grads_batch(dtype: torch.dtype = torch.float64) -> tuple[ModelBatch, list[nn.Module]]:
    models = make_models(bn=False, dtype=dtype)
    batch = ModelBatch(models)
    x, y = data(1, dtype=dtype)[0]
    batch.compute_loss(batch(x, per_model=True), y, F.cross_entropy).backward()
    alone = []
    for i, m in enumerate(copy.deepcopy(models)):
        F.cross_entropy(m(x[i]), y).backward()
        alone.append(m)
    return batch, alone


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_clip_grad_norm_matches_torch_per_model(norm_type: float) -> None:
    batch, alone = _grads_batch()
    max_norms = [0.05, 1e6, 0.2]
    norms = modelbatch.clip_grad_norm_(batch, max_norms, norm_type)
    assert norms.shape == (N,)
    for i, m in enumerate(alone):
        ref = torch.nn.utils.clip_grad_norm_(m.parameters(), max_norms[i], norm_type)
        assert abs(float(norms[i]) - float(ref)) <= 1e-10 * float(ref)
        for name, p in m.named_parameters():
            g = dict(batch.stacked_parameters())[name].grad[i]
            assert torch.allclose(g, p.grad, rtol=1e-10, atol=0), (i, name)


def test_clip_grad_norm_shared_limit_and_nonfinite_error() -> None:
    batch, alone = _grads_batch()
    modelbatch.clip_grad_norm_(batch, 0.1)
    for i, m in enumerate(alone):
        torch.nn.utils.clip_grad_norm_(m.parameters(), 0.1)
        g = dict(batch.stacked_parameters())["0.weight"].grad[i]
        assert torch.allclose(g, m[0].weight.grad, rtol=1e-10, atol=0)
    dict(batch.stacked_parameters())["0.bias"].grad[1, 0] = float("nan")
    with pytest.raises(RuntimeError, match=r"positions \[1\] \(ids \[1\]\)"):
        modelbatch.clip_grad_norm_(batch, 0.1, error_if_nonfinite=True)
    with pytest.raises(ValueError, match="one value per model"):
        modelbatch.clip_grad_norm_(batch, [0.1, 0.2])


@pytest.mark.parametrize("value", [0.01, [0.01, 1e6, 0.003]])
def test_clip_grad_value_matches_torch_per_model(value: Any) -> None:
    batch, alone = _grads_batch()
    modelbatch.clip_grad_value_(batch, value)
    for i, m in enumerate(alone):
        v = value if isinstance(value, float) else value[i]
        torch.nn.utils.clip_grad_value_(m.parameters(), v)
        for name, p in m.named_parameters():
            g = dict(batch.stacked_parameters())[name].grad[i]
            assert torch.allclose(g, p.grad, rtol=1e-10, atol=0), (i, name)
            assert float(g.abs().max()) <= v


# --------------------------------------------------------------------------- drop
def _lambda(i: int) -> Callable[[int], float]:
    return lambda epoch: 1.0 / (1.0 + (i + 1) * epoch)


DROP_CASES: dict[str, tuple[Callable[[ModelBatch], torch.optim.Optimizer],
                            Callable[[int, nn.Module], torch.optim.Optimizer]]] = {
    "sgd_momentum": (
        lambda b: modelbatch.optim.SGD(b, lr=[0.1, 0.2, 0.3, 0.4], momentum=0.9),
        lambda i, m: torch.optim.SGD(m.parameters(), lr=[0.1, 0.2, 0.3, 0.4][i], momentum=0.9),
    ),
    "adamw": (
        lambda b: modelbatch.optim.AdamW(b, lr=[0.01, 0.02, 0.03, 0.04]),
        lambda i, m: torch.optim.AdamW(m.parameters(), lr=[0.01, 0.02, 0.03, 0.04][i]),
    ),
    "generic_rmsprop": (
        lambda b: PerModelOptimizer(b, torch.optim.RMSprop, lr=[0.01, 0.02, 0.03, 0.04]),
        lambda i, m: torch.optim.RMSprop(m.parameters(), lr=[0.01, 0.02, 0.03, 0.04][i]),
    ),
}


@pytest.mark.parametrize("case", list(DROP_CASES))
def test_drop_shrinks_state_and_schedulers_then_trains_as_alone(case: str) -> None:
    """Models 1 and 3 leave after 2 steps; 0 and 2 go on with per-model LambdaLR schedules
    and must equal the same models trained alone for all 4 steps."""
    make_opt, make_ref_opt = DROP_CASES[case]
    models = make_models(bn=True, dtype=torch.float64, n=4)
    batch = ModelBatch(models, model_ids=["a", "b", "c", "d"])
    opt = make_opt(batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [_lambda(i) for i in range(4)])
    steps = data(4, n=4, dtype=torch.float64)
    for k, (x, y) in enumerate(steps):
        if k == 2:
            batch.drop(["d", "b"], schedulers=[sched])
            assert batch.model_ids == ["a", "c"]
            assert batch.index_of("c") == 1
            assert len(opt.param_groups) == 2
            assert [g["model_id"] for g in opt.param_groups] == ["a", "c"]
            assert len(sched.base_lrs) == len(sched.lr_lambdas) == 2
            assert all(p.shape[0] == 2 for _, p in batch.stacked_parameters())
            assert all(b.shape[0] == 2 for _, b in batch.stacked_buffers())
            if isinstance(opt, modelbatch.optim.BatchOptimizer):
                for st in opt.state.values():
                    assert all(v.shape[0] == 2 for v in st.values() if isinstance(v, Tensor))
            else:
                assert len(opt.state) == 2 * len(list(batch.stacked_parameters()))
        if k >= 2:
            x = x[[0, 2]]
        loss = batch.compute_loss(batch(x, per_model=True), y, F.cross_entropy)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    kept = [models[0], models[2]]
    ref = train_alone(
        kept,
        lambda j, m: make_ref_opt([0, 2][j], m),
        [([x[0], x[2]], y) for x, y in steps],
        F.cross_entropy,
        make_scheduler=lambda j, o: torch.optim.lr_scheduler.LambdaLR(o, _lambda([0, 2][j])),
    )
    assert_close_models(batch.extract_all(), ref, torch.float64, case)


def test_shrink_scheduler_handles_nested_and_plateau_schedulers() -> None:
    batch = ModelBatch(make_models(bn=False))
    opt = modelbatch.optim.SGD(batch, lr=[0.1, 0.2, 0.3])
    s1 = torch.optim.lr_scheduler.LambdaLR(opt, [_lambda(i) for i in range(3)])
    s2 = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    seq = torch.optim.lr_scheduler.SequentialLR(opt, [s1, s2], milestones=[2])
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, min_lr=[0.01, 0.02, 0.03])
    for s in (seq, plateau):
        shrink_scheduler(s, [2, 0], 3)
    assert s1.lr_lambdas[0] is not None and len(s1.lr_lambdas) == 2
    assert s1.base_lrs == [0.3, 0.1] and s2.base_lrs == [0.3, 0.1]
    assert plateau.min_lrs == [0.03, 0.01]


def test_drop_errors_and_keep_positions_order() -> None:
    batch = ModelBatch(make_models(bn=False), model_ids=[10, 11, 12])
    with pytest.raises(KeyError, match="no model with id 7"):
        batch.drop(7)
    with pytest.raises(ValueError, match="every model"):
        batch.drop([10, 11, 12])
    with pytest.raises(ValueError, match="repeated positions"):
        batch.keep_positions([0, 0])
    w = dict(batch.stacked_parameters())["0.weight"].detach().clone()
    batch.keep_positions([2, 0])
    assert batch.model_ids == [12, 10]
    assert torch.equal(dict(batch.stacked_parameters())["0.weight"], w[[2, 0]])
    assert batch.active.shape == (2,)


def test_generic_optimizer_skips_quarantined_model() -> None:
    models = make_models(bn=False, dtype=torch.float64)
    batch = ModelBatch(models)
    opt = PerModelOptimizer(batch, torch.optim.Adagrad, lr=0.1)
    batch.quarantine(0)
    w0 = dict(batch.stacked_parameters())["0.weight"][0].detach().clone()
    x, y = data(1, dtype=torch.float64)[0]
    loss = batch.compute_loss(batch(x[0]), y, F.cross_entropy)
    loss.backward()
    opt.step()
    assert torch.equal(dict(batch.stacked_parameters())["0.weight"][0], w0)
    ref = train_alone(models[1:], lambda i, m: torch.optim.Adagrad(m.parameters(), lr=0.1),
                      [(x[0], y)], F.cross_entropy)
    assert_close_models([batch.extract(1), batch.extract(2)], ref, torch.float64)

