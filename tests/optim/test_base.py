"""Vectorised optimizer machinery (``modelbatch.optim.base``) under cross-feature use:
moving the batch after the state exists, copying, lazily created state of quarantined
models, complex and frozen parameters, state loading checks, per-step host-side cost."""

from __future__ import annotations

import copy
import pickle
import warnings
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modelbatch
from modelbatch import ModelBatch
from modelbatch.optim import SGD, Adam, AdamW, PerModelOptimizer, SlowOptimizerWarning
from tests.helpers import assert_close_models

N = 3


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def models(n: int = N) -> list[nn.Module]:
    torch.manual_seed(0)
    return [mlp() for _ in range(n)]


def data(k: int, dtype: torch.dtype = torch.float32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [
        (torch.randn(6, 4, generator=g).to(dtype), torch.randint(0, 3, (6,), generator=g))
        for _ in range(k)
    ]


def train(batch: ModelBatch, opt: Any, steps: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for x, y in steps:
        opt.zero_grad()
        batch.compute_loss(batch(x), y, F.cross_entropy).backward()
        opt.step()


def train_plain(model: nn.Module, opt: Any, steps: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for x, y in steps:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


# --------------------------------------------------------------------------- .to() after state
@pytest.mark.parametrize("kind", ["adam", "generic"])
def test_state_follows_the_batch_to_another_dtype(kind: str) -> None:
    """``batch.double()`` after the optimizer state exists: the state follows (it used to
    stay float32 and the next step failed), and training continues exactly like a plain
    model whose optimizer state was cast by ``load_state_dict`` (torch's way)."""
    ms = models()
    batch = ModelBatch(ms)
    if kind == "adam":
        opt: Any = Adam(batch, lr=0.01, amsgrad=True)
    else:
        opt = PerModelOptimizer(batch, torch.optim.Adam, lr=0.01, amsgrad=True)
    first, second = data(2), data(2, torch.float64)
    train(batch, opt, first)
    batch.double()
    train(batch, opt, second)
    for _, s in (opt.state.items() if kind == "adam" else []):
        assert s["exp_avg"].dtype == torch.float64
    refs = []
    for m in copy.deepcopy(ms):
        ref_opt = torch.optim.Adam(m.parameters(), lr=0.01, amsgrad=True)
        train_plain(m, ref_opt, first)
        sd = ref_opt.state_dict()
        m.double()
        ref_opt = torch.optim.Adam(m.parameters(), lr=0.01, amsgrad=True)
        ref_opt.load_state_dict(sd)
        train_plain(m, ref_opt, second)
        refs.append(m)
    assert_close_models(batch.extract_all(), refs, torch.float32)


# --------------------------------------------------------------------------- copy and pickle
def test_deepcopy_and_pickle_keep_optimizers_attached_to_their_batch() -> None:
    """A copied batch (with the optimizer built by ``ModelBatch(..., lr=...)``) trains
    exactly like the original and a drop on the copy leaves the original's optimizer alone
    (the copy used to share the original's optimizer registry; the copied optimizer lost its
    ``batch``). Pickle round trips work too, also after a scheduler wrapped ``step``."""
    batch = ModelBatch(models(), lr=[0.01, 0.02, 0.03], optimizer_cls=torch.optim.AdamW)
    opt = batch.optimizer
    assert isinstance(opt, AdamW)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    steps = data(3)
    train(batch, opt, steps[:1])
    clone = copy.deepcopy(batch)
    assert clone.optimizer is not opt and clone.optimizer.batch is clone  # type: ignore[union-attr]
    assert clone._live_optimizers() == [clone.optimizer]
    train(batch, opt, steps[1:])
    train(clone, clone.optimizer, steps[1:])
    for a, b in zip(batch.state_dict().values(), clone.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    clone.drop(0)
    assert len(opt.param_groups) == N and opt.state["0.weight"]["exp_avg"].shape[0] == N
    assert len(clone.optimizer.param_groups) == N - 1  # type: ignore[union-attr]
    sched.step()

    generic = PerModelOptimizer(batch, torch.optim.RMSprop, lr=0.01)
    scaler = modelbatch.BatchGradScaler(batch)
    b2, o2, g2, s2 = pickle.loads(pickle.dumps((batch, opt, generic, scaler)))
    assert o2.batch is b2 and g2.batch is b2 and s2.batch is b2
    assert {id(o) for o in b2._live_optimizers()} == {id(o2), id(g2), id(s2)}
    train(b2, o2, steps[:1])
    train(b2, g2, steps[:1])
    b2.drop(1)
    assert len(o2.param_groups) == len(g2.param_groups) == len(b2) == N - 1
    assert s2.get_scale().shape == (N - 1,)


# --------------------------------------------------------------------------- lazily created state
def test_momentum_buffer_created_while_quarantined_is_zero() -> None:
    """SGD creates its momentum buffer at the first step; a model quarantined then must not
    get that step's gradient in its buffer (it has not stepped), and once back it trains
    exactly like a model alone that never saw that step."""
    ms = models()
    batch = ModelBatch(ms)
    opt = SGD(batch, lr=0.1, momentum=0.9, dampening=0.1)
    steps = data(3)
    batch.quarantine(1)
    train(batch, opt, steps[:1])
    buf = opt.state["0.weight"]["momentum_buffer"]
    assert torch.count_nonzero(buf[1]) == 0 and torch.count_nonzero(buf[0]) > 0
    assert opt.state["0.weight"]["step"].tolist() == [1.0, 0.0, 1.0]
    batch.unquarantine(1)
    train(batch, opt, steps[1:])
    ref = copy.deepcopy(ms[1])
    train_plain(ref, torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, dampening=0.1),
                steps[1:])  # fmt: skip
    assert_close_models([batch.extract(1)], [ref], torch.float32)


# --------------------------------------------------------------------------- complex, frozen
def test_complex_parameters_refused_by_adam_and_routed_by_the_factory() -> None:
    torch.manual_seed(0)
    ms = [nn.Linear(3, 2, dtype=torch.complex64) for _ in range(2)]
    batch = ModelBatch(ms)
    with pytest.raises(TypeError, match=r"Adam does not support complex.*'weight'.*\(2, 3\)"):
        Adam(batch, lr=0.1)
    with pytest.warns(SlowOptimizerWarning, match="complex"):
        opt = modelbatch.OptimizerFactory(torch.optim.AdamW, lr=0.1).build(batch)
    assert isinstance(opt, PerModelOptimizer)
    sgd_batch = ModelBatch(copy.deepcopy(ms))
    sgd = SGD(sgd_batch, lr=0.1, momentum=0.9, weight_decay=0.1)  # linear update: fine
    x = torch.randn(5, 3, dtype=torch.complex64)
    for _ in range(3):
        for b, o in ((batch, opt), (sgd_batch, sgd)):
            o.zero_grad()
            b(x).abs().sum().backward()
            o.step()
    for b, cls, hp in (
        (batch, torch.optim.AdamW, {"lr": 0.1}),
        (sgd_batch, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.1}),
    ):
        for i, m in enumerate(ms):
            ref = copy.deepcopy(m)
            ref_opt = cls(ref.parameters(), **hp)
            for _ in range(3):
                ref_opt.zero_grad()
                ref(x).abs().sum().backward()
                ref_opt.step()
            err = (b.extract(i).weight - ref.weight).abs().max() / ref.weight.abs().max()
            assert err < 1e-5


def test_init_state_skips_frozen_parameters() -> None:
    ms = models()
    for m in ms:
        m[0].weight.requires_grad_(False)
    opt = Adam(ModelBatch(ms), lr=0.1)
    opt.init_state()
    assert "0.weight" not in opt.state and "0.bias" in opt.state


# --------------------------------------------------------------------------- loading, inputs
def test_load_state_dict_checks_every_dimension() -> None:
    batch = ModelBatch(models())
    opt = Adam(batch, lr=0.1)
    train(batch, opt, data(1))
    sd = opt.state_dict()
    sd["state"]["0.weight"]["exp_avg"] = torch.zeros(N, 4, 5)
    with pytest.raises(ValueError, match=r"'0.weight'/'exp_avg' has shape \(3, 4, 5\), "
                                         r"expected \(3, 5, 4\)"):  # fmt: skip
        opt.load_state_dict(sd)


def test_numpy_hyperparameters() -> None:
    opt = SGD(ModelBatch(models()), lr=np.array([0.1, 0.2, 0.3]), momentum=np.float64(0.5))
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.2, 0.3]
    assert all(type(g["momentum"]) is float for g in opt.param_groups)


def test_generic_state_stays_the_wrapped_optimizers_after_loading() -> None:
    """``PerModelOptimizer.state`` used to keep pointing at the dict the wrapped optimizer
    had before ``load_state_dict`` replaced it."""
    batch = ModelBatch(models())
    opt = PerModelOptimizer(batch, torch.optim.Adam, lr=0.1)
    train(batch, opt, data(1))
    opt.load_state_dict(opt.state_dict())
    assert opt.state is opt.inner.state and len(opt.state) == N * 4


# --------------------------------------------------------------------------- per-step cost
class _CountingGroup(dict):  # type: ignore[type-arg]
    reads: ClassVar[dict[str, int]] = {}

    def __getitem__(self, key: str) -> Any:
        _CountingGroup.reads[key] = _CountingGroup.reads.get(key, 0) + 1
        return super().__getitem__(key)


def test_host_side_flags_are_read_once_per_step() -> None:
    """Branch flags (``any_hparam``) are read from the N param groups once per step, not
    once per parameter tensor (that was O(N x tensors) Python work per step)."""
    batch = ModelBatch(models())
    opt = SGD(batch, lr=0.1, momentum=[0.9, 0.0, 0.9], nesterov=[True, False, False])
    train(batch, opt, data(1))
    opt.param_groups[:] = [_CountingGroup(g) for g in opt.param_groups]
    _CountingGroup.reads = {}
    train(batch, opt, data(1))
    assert _CountingGroup.reads["maximize"] == N  # only read by any_hparam


@pytest.mark.parametrize("make", [
    lambda b: SGD(b, lr=0.1, momentum=[0.9, 0.0] * (len(b) // 2), nesterov=False,
                  weight_decay=0.1, maximize=[True, False] * (len(b) // 2)),
    lambda b: Adam(b, lr=0.1, weight_decay=0.1, amsgrad=[True, False] * (len(b) // 2)),
])  # fmt: skip
def test_step_kernel_count_does_not_depend_on_n(make: Any) -> None:
    from torch.profiler import ProfilerActivity, profile

    def count_ops(n: int) -> int:
        batch = ModelBatch(models(n))
        opt = make(batch)
        train(batch, opt, data(2))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                opt.step()
        return sum(1 for e in prof.events() if e.name.startswith("aten::"))

    assert count_ops(2) == count_ops(16)
