"""Vectorised optimizer machinery (``modelbatch.optim.base``) under cross-feature use:
moving the batch after the state exists, copying, lazily created state of quarantined
models, complex and frozen parameters, state loading checks, per-step host-side cost."""

from __future__ import annotations

import copy
import pickle
import sys
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import modelbatch
from modelbatch import ModelBatch
from modelbatch.optim import SGD, Adam, AdamW, PerModelOptimizer, SlowOptimizerWarning
from tests.helpers import TOL, assert_close_models, rel_err

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
class KernelCounter(TorchDispatchMode):
    """Counts aten ops dispatched in the block (views excluded): deterministic, unlike time."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if not getattr(func, "is_view", False):
            self.count += 1
        return func(*args, **(kwargs or {}))


def deep_mlp(layers: int) -> nn.Module:
    return nn.Sequential(*[nn.Linear(4, 4) for _ in range(layers)], nn.Linear(4, 3))


OPTS_FOR_COUNT: dict[str, Any] = {
    "sgd": lambda b, n: SGD(b, lr=0.1, momentum=[0.9, 0.0] * (n // 2), weight_decay=0.1,
                           maximize=[True, False] * (n // 2), nesterov=False),
    "adam": lambda b, n: Adam(b, lr=0.1, weight_decay=0.1, amsgrad=[True, False] * (n // 2)),
    "adamw": lambda b, n: AdamW(b, lr=[0.1, 0.0] * (n // 2), maximize=True),
}  # fmt: skip


@pytest.mark.parametrize("masked", [False, True], ids=["all-active", "quarantine"])
@pytest.mark.parametrize("opt_name", list(OPTS_FOR_COUNT))
def test_step_kernel_count_depends_neither_on_n_nor_on_tensor_count(
    opt_name: str, masked: bool
) -> None:
    """One kernel per arithmetic step for the whole batch: the same number of aten ops for
    N = 2 or 16 and 2 or 8 parameter tensors; at most 22 with every option on (maximize, a
    model at lr 0, weight decay, per-model AMSGrad, a quarantine, float32)."""

    def count(n: int, layers: int) -> tuple[int, int]:
        torch.manual_seed(0)
        batch = ModelBatch([deep_mlp(layers) for _ in range(n)])
        opt = OPTS_FOR_COUNT[opt_name](batch, n)
        if masked:
            batch.quarantine(1)
        train(batch, opt, data(2))
        with KernelCounter() as counter:
            opt.step()
        calls = [0]

        def profile(frame: Any, event: str, arg: Any) -> None:
            calls[0] += event in ("call", "c_call")

        sys.setprofile(profile)
        try:
            opt.step()
        finally:
            sys.setprofile(None)
        return counter.count, calls[0]

    kernels, python_calls = count(2, 1)
    assert count(16, 1) == (kernels, python_calls)  # neither kernels nor host work grow with N
    assert count(2, 4)[0] == kernels  # nor kernels with the number of parameter tensors
    assert kernels <= 22


def test_hyperparameters_are_read_only_when_they_change() -> None:
    """A step reads the N param groups only after one was assigned to (a scheduler step):
    detecting a change is O(1), not a loop over N groups."""
    batch = ModelBatch(models())
    opt = SGD(batch, lr=0.1, momentum=[0.9, 0.0, 0.9], nesterov=[True, False, False])
    train(batch, opt, data(1))
    reads = [0]
    original = opt._host_values

    def counting() -> dict[str, list[Any]]:
        reads[0] += 1
        return original()

    opt._host_values = counting  # type: ignore[method-assign]
    train(batch, opt, data(2))
    assert reads[0] == 0
    opt.param_groups[1]["lr"] = 0.05
    train(batch, opt, data(1))
    assert reads[0] == 1
    assert opt.hparam("lr").tolist() == [0.1, 0.05, 0.1]


# --------------------------------------------------------------------------- refusals
def test_add_param_group_is_refused_with_the_reason() -> None:
    batch = ModelBatch(models())
    extra = nn.Parameter(torch.zeros(2))
    for opt in (Adam(batch, lr=0.1), PerModelOptimizer(batch, torch.optim.Adagrad, lr=0.1)):
        with pytest.raises(TypeError, match="one param group per model"):
            opt.add_param_group({"params": [extra]})
    with pytest.raises(TypeError, match="one param group per model"):
        Adam(batch).param_groups.append({"params": [extra], "lr": 0.1})


def test_load_state_dict_names_a_torch_optim_state_dict() -> None:
    ms = models()
    ref_opt = torch.optim.Adam(ms[0].parameters(), lr=0.1)
    train_plain(ms[0], ref_opt, data(1))
    batch = ModelBatch(models())
    with pytest.raises(ValueError, match=r"torch.optim state dict.*load_torch_state_dicts"):
        Adam(batch).load_state_dict(ref_opt.state_dict())
    with pytest.raises(ValueError, match="without 'model_ids'"):
        PerModelOptimizer(batch, torch.optim.Adam).load_state_dict(ref_opt.state_dict())


# --------------------------------------------------------------------------- torch.optim interop
@pytest.mark.parametrize(
    ("make", "make_ref"),
    [
        (lambda b: Adam(b, lr=[0.01, 0.02, 0.03], amsgrad=True, weight_decay=0.1),
         lambda i, ps: torch.optim.Adam(ps, lr=[0.01, 0.02, 0.03][i], amsgrad=True,
                                        weight_decay=0.1)),
        (lambda b: SGD(b, lr=0.1, momentum=[0.9, 0.0, 0.5], nesterov=[True, False, False]),
         lambda i, ps: torch.optim.SGD(ps, lr=0.1, momentum=[0.9, 0.0, 0.5][i],
                                       nesterov=[True, False, False][i])),
    ],
    ids=["adam-amsgrad", "sgd-momentum"],
)  # fmt: skip
def test_torch_state_dicts_round_trip_both_ways(make: Any, make_ref: Any) -> None:
    """Models trained alone with torch.optim resume inside a batch (load_torch_state_dicts),
    and the batch's state exported per model (torch_state_dicts) resumes a model alone:
    both continue exactly like uninterrupted training alone (float64)."""
    dtype = torch.float64
    ms = [m.double() for m in models()]
    first, second = data(3, dtype), data(3, dtype)
    refs, ref_opts = [], []
    for i, m in enumerate(ms):
        r = copy.deepcopy(m)
        o = make_ref(i, r.parameters())
        train_plain(r, o, first)
        refs.append(r)
        ref_opts.append(o)
    batch = ModelBatch(copy.deepcopy(refs))
    opt = make(batch)
    opt.load_torch_state_dicts([o.state_dict() for o in ref_opts])
    train(batch, opt, second)
    exported = opt.torch_state_dicts()
    for r, o in zip(refs, ref_opts, strict=True):
        train_plain(r, o, second)
    assert_close_models(batch.extract_all(), refs, dtype, "resumed in a batch")
    # The reverse: each model alone from the batch's exported state.
    again = []
    for i in range(len(refs)):
        alone = copy.deepcopy(batch.extract(i))
        o = make_ref(i, alone.parameters())
        o.load_state_dict(exported[i])
        train_plain(alone, o, first)
        again.append(alone)
    for r, o in zip(refs, ref_opts, strict=True):
        train_plain(r, o, first)
    assert_close_models(again, refs, dtype, "resumed alone")


def test_load_torch_state_dicts_checks_the_layout() -> None:
    ms = models()
    sds = []
    for m in ms:
        o = torch.optim.Adam(m.parameters())
        train_plain(m, o, data(1))
        sds.append(o.state_dict())
    opt = Adam(ModelBatch(models()))
    with pytest.raises(ValueError, match=r"2 torch\.optim state dicts for 3 models"):
        opt.load_torch_state_dicts(sds[:2])
    del sds[1]["state"][0]
    with pytest.raises(ValueError, match=r"'0.weight' has optimizer state .* models \[1\]"):
        opt.load_torch_state_dicts(sds)


# --------------------------------------------------------------------------- missing gradients
class _TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 5)
        self.a = nn.Linear(5, 3)
        self.b = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor, head: str = "a") -> torch.Tensor:
        return getattr(self, head)(torch.tanh(self.body(x)))


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_parameters_without_gradient_are_skipped_like_torch_optim(kind: str) -> None:
    """A head unused in a step gets no gradient (``.grad`` None after zero_grad): torch.optim
    leaves it, its state and its step count alone; so does the batch (then per tensor)."""
    dtype = torch.float64
    torch.manual_seed(0)
    ms = [_TwoHeads().double() for _ in range(N)]
    heads = ["a", "a", "b", "a", "b"]
    steps = data(len(heads), dtype)

    def make(params: Any, i: int | None = None) -> Any:
        if kind == "adam":
            return torch.optim.Adam(params, lr=0.05) if i is not None else Adam(params, lr=0.05)
        lr = 0.1
        return (torch.optim.SGD(params, lr=lr, momentum=0.9) if i is not None
                else SGD(params, lr=lr, momentum=0.9))  # fmt: skip

    batch = ModelBatch(copy.deepcopy(ms))
    opt = make(batch)
    for (x, y), head in zip(steps, heads, strict=True):
        opt.zero_grad()
        batch.compute_loss(batch(x, head=head), y, F.cross_entropy).backward()
        assert batch.stacked.b.weight.grad is None or head == "b"
        opt.step()
    refs = []
    for i, m in enumerate(ms):
        r = copy.deepcopy(m)
        o = make(r.parameters(), i)
        for (x, y), head in zip(steps, heads, strict=True):
            o.zero_grad()
            F.cross_entropy(r(x, head=head), y).backward()
            o.step()
        refs.append(r)
    assert_close_models(batch.extract_all(), refs, dtype, "unused head")
    if kind == "adam":
        assert opt.state["b.weight"]["step"].tolist() == [2.0] * N
        assert opt.state["a.weight"]["step"].tolist() == [3.0] * N


class _Mixed(nn.Module):
    """Two flat storages: float64 parameters, then float32 ones."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 5).double()
        self.b = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x.double())).float())


@pytest.mark.parametrize("dampening", [0.5, 0.0])
def test_sgd_first_step_of_every_storage_starts_its_momentum(dampening: float) -> None:
    """SGD learned "every momentum buffer exists" after the first storage stepped, before
    the second one had: the float32 storage then took its first step as a later one (with
    dampening the buffer started as (1 - dampening) * grad, not grad: 25% off torch.optim),
    and its ``momentum_started`` stayed 0 (exported as no buffer)."""
    torch.manual_seed(0)
    ms = [_Mixed() for _ in range(N)]
    steps = data(4)
    kw: dict[str, Any] = {"lr": 0.1, "momentum": 0.9, "dampening": dampening}
    batch = ModelBatch(copy.deepcopy(ms))
    opt = SGD(batch, **kw)
    train(batch, opt, steps)
    assert {k: s["momentum_started"].tolist() for k, s in opt.state.items()} == {
        k: [1.0] * N for k in ("a.weight", "a.bias", "b.weight", "b.bias")
    }
    assert all(len(sd["state"]) == 4 for sd in opt.torch_state_dicts())
    for i, m in enumerate(copy.deepcopy(ms)):
        train_plain(m, torch.optim.SGD(m.parameters(), **kw), steps)
        ours = batch.extract(i)
        for name, p in m.named_parameters():
            err = rel_err(ours.get_parameter(name), p)
            assert err <= TOL[p.dtype], (i, name, err)


def test_parameter_frozen_after_the_batch_was_built_is_left_alone() -> None:
    batch = ModelBatch(models())
    opt = Adam(batch, lr=0.1)
    train(batch, opt, data(1))
    batch.stacked[0].weight.requires_grad_(False)
    before = batch.stacked[0].weight.detach().clone()
    train(batch, opt, data(2))
    assert torch.equal(batch.stacked[0].weight, before)
    assert opt.state["0.weight"]["step"].tolist() == [1.0] * N
    assert opt.state["2.weight"]["step"].tolist() == [3.0] * N


# --------------------------------------------------------------------------- 16-bit parameters
def test_bfloat16_parameters_train_like_torch_optim_in_bfloat16() -> None:
    """bf16 parameters: the coefficients stay float32 (no bf16 rounding of lr / bias
    corrections), so each model ends within bf16 rounding of torch.optim.AdamW on bf16."""
    torch.manual_seed(0)
    ms = [mlp().to(torch.bfloat16) for _ in range(N)]
    steps = data(4, torch.bfloat16)
    lrs = [1e-2, 3e-3, 1e-3]
    batch = ModelBatch(copy.deepcopy(ms))
    opt = AdamW(batch, lr=lrs, amsgrad=True)
    train(batch, opt, steps)
    for i, m in enumerate(ms):
        ref = copy.deepcopy(m)
        train_plain(ref, torch.optim.AdamW(ref.parameters(), lr=lrs[i], amsgrad=True), steps)
        for a, b in zip(batch.extract(i).parameters(), ref.parameters(), strict=True):
            assert a.dtype == torch.bfloat16
            err = (a.float() - b.float()).abs().max() / b.float().abs().max()
            assert err < 2e-2


# --------------------------------------------------------------------------- held state dicts
@pytest.mark.parametrize(
    "make",
    [
        lambda b: Adam(b, lr=0.01),
        lambda b: AdamW(b, lr=0.01),
        lambda b: SGD(b, lr=0.1, momentum=0.9),
    ],
    ids=["adam", "adamw", "sgd"],
)
def test_held_state_dict_shows_later_host_path_steps(make: Any) -> None:
    """``state_dict()`` returns references (as torch.optim's does): a state dict taken at
    step 3 and loaded after step 5 holds step 5's moments AND step 5's step counts. The host
    path used to leave the step counts at 3 (written lazily), so the resumed run drifted."""
    steps = data(8, torch.float64)
    ms = [m.double() for m in models()]
    batch = ModelBatch(copy.deepcopy(ms))
    opt = make(batch)
    train(batch, opt, steps[:3])
    held = opt.state_dict()
    train(batch, opt, steps[3:5])
    for s in held["state"].values():
        assert s["step"].tolist() == [5.0] * N
    again = ModelBatch(copy.deepcopy(ms))
    again.load_state_dict(copy.deepcopy(batch.state_dict()))
    opt2 = make(again)
    opt2.load_state_dict(held)
    train(batch, opt, steps[5:])
    train(again, opt2, steps[5:])
    for a, b in zip(batch.parameters(), again.parameters(), strict=True):
        assert torch.equal(a, b)
    # A step read through ``opt.state`` and kept is current too.
    kept = opt.state["0.weight"]["step"]
    train(batch, opt, steps[:1])
    assert kept.tolist() == [9.0] * N


_SPLIT_CASES = {
    "adam": (lambda b: Adam(b, lr=0.01), lambda ps: torch.optim.Adam(ps, lr=0.01)),
    "adamw": (lambda b: AdamW(b, lr=0.01), lambda ps: torch.optim.AdamW(ps, lr=0.01)),
    "sgd": (
        lambda b: SGD(b, lr=0.1, momentum=0.9),
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    ),
    "generic": (
        lambda b: PerModelOptimizer(b, torch.optim.Adam, lr=0.01),
        lambda ps: torch.optim.Adam(ps, lr=0.01),
    ),
}


def _train_skipping(step: Any, model: nn.Module, steps: list[Any], skip: set[int]) -> None:
    """``step(x, y)`` computes the loss of ``model``; at the steps in ``skip`` the first
    parameter gets no gradient (``.grad = None``), as torch.optim skips such a parameter."""
    for k, (x, y) in enumerate(steps):
        step(x, y, k in skip)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind", list(_SPLIT_CASES))
def test_held_state_dict_follows_each_parameter_after_a_skipped_gradient(
    kind: str, dtype: torch.dtype
) -> None:
    """A step in which one parameter has no gradient makes the parameters' step counts
    differ (it is skipped, as in torch.optim). A state dict (and an ``optimizer.state``
    entry) held from before used to keep showing the old step state afterwards: every
    parameter's step state was one tensor, replaced by per-parameter copies at that step.
    Held, it must show what a fresh ``state_dict()`` shows and what torch.optim's held state
    dict shows for each model trained alone with the same skipped gradient."""
    make, make_ref = _SPLIT_CASES[kind]
    steps = data(6, dtype)
    skip = {3}  # "0.weight" has no gradient at step 3: one step fewer than the others
    ms = [m.to(dtype) for m in models()]
    batch = ModelBatch(copy.deepcopy(ms))
    opt = make(batch)
    first = next(iter(batch.parameters()))

    def step(x: torch.Tensor, y: torch.Tensor, drop: bool) -> None:
        opt.zero_grad()
        batch.compute_loss(batch(x), y, F.cross_entropy).backward()
        if drop:
            first.grad = None
        opt.step()

    _train_skipping(step, batch, steps[:3], set())
    held = opt.state_dict()
    held_entries = {k: opt.state[k] for k in opt.state} if kind != "generic" else {}
    _train_skipping(step, batch, steps[3:], {k - 3 for k in skip})
    fresh = opt.state_dict()

    refs, ref_held = [], []
    for m in copy.deepcopy(ms):
        ref_opt = make_ref(m.parameters())

        def ref_step(x: torch.Tensor, y: torch.Tensor, drop: bool, m: Any = m, o: Any = ref_opt):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            if drop:
                next(iter(m.parameters())).grad = None
            o.step()

        _train_skipping(ref_step, m, steps[:3], set())
        ref_held.append(ref_opt.state_dict())
        _train_skipping(ref_step, m, steps[3:], {k - 3 for k in skip})
        refs.append(m)

    # Held equals fresh, key by key, exactly.
    assert held["state"].keys() == fresh["state"].keys()
    for name, s in fresh["state"].items():
        for key, v in s.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(held["state"][name][key], v), (name, key)
                if held_entries:
                    assert torch.equal(held_entries[name][key], v), (name, key)
    if kind != "generic":
        steps_now = {name: s["step"].tolist() for name, s in held["state"].items()}
        assert steps_now == {name: [5.0 if name == "0.weight" else 6.0] * N
                             for name in steps_now}  # fmt: skip
        # ... and what torch.optim's held state dict shows, model by model.
        names = [name for name, _ in batch.stacked_parameters()]
        for i, rs in enumerate(ref_held):
            for j, name in enumerate(names):
                for key, v in rs["state"][j].items():
                    ours = held["state"][name][key][i]
                    assert rel_err(ours, v) <= TOL[dtype], (i, name, key)
    assert_close_models(batch.extract_all(), refs, dtype)


def test_a_write_into_one_parameters_step_state_changes_that_parameter_only() -> None:
    """Each parameter has its own step state (as in torch.optim): restarting one
    parameter's momentum through ``optimizer.state`` (momentum_started = 0, torch's
    ``momentum_buffer = None``) restarts that parameter's only. With one step state shared
    by every parameter of the storage, it restarted all of them."""
    steps = data(5, torch.float64)
    ms = [m.double() for m in models()]
    batch = ModelBatch(copy.deepcopy(ms))
    opt = SGD(batch, lr=0.1, momentum=0.9)
    train(batch, opt, steps[:2])
    opt.state["2.bias"]["momentum_started"].zero_()
    train(batch, opt, steps[2:])
    assert opt.state["2.bias"]["step"].tolist() == [5.0] * N
    refs = []
    for m in copy.deepcopy(ms):
        ref_opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        train_plain(m, ref_opt, steps[:2])
        ref_opt.state[m[2].bias]["momentum_buffer"] = None
        train_plain(m, ref_opt, steps[2:])
        refs.append(m)
    assert_close_models(batch.extract_all(), refs, torch.float64)


# --------------------------------------------------------------------------- tensor-valued lr
@pytest.mark.parametrize("kind", ["adam", "sgd"])
@pytest.mark.parametrize("copied", [False, True], ids=["same", "pickled"])
def test_tensor_lr_updated_in_place_by_a_scheduler(kind: str, copied: bool) -> None:
    """``group["lr"] = torch.tensor(...)``: torch's LR schedulers then update it in place
    (``fill_``), with no assignment into the group. The optimizer kept stepping with the
    first lr (silently: StepLR's halving never reached the update)."""
    steps = data(6, torch.float64)
    ms = [m.double() for m in models()]
    cls: Any = Adam if kind == "adam" else SGD
    ref_cls: Any = torch.optim.Adam if kind == "adam" else torch.optim.SGD
    kw: dict[str, Any] = {} if kind == "adam" else {"momentum": 0.9}
    batch = ModelBatch(copy.deepcopy(ms))
    opt = cls(batch, lr=0.01, **kw)
    for g in opt.param_groups:
        g["lr"] = torch.tensor(0.01, dtype=torch.float64)
    if copied:
        batch, opt = pickle.loads(pickle.dumps((batch, opt)))
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    for x, y in steps:
        train(batch, opt, [(x, y)])
        sched.step()
    alone = []
    for m in ms:
        m = copy.deepcopy(m)
        ref = ref_cls(m.parameters(), lr=torch.tensor(0.01, dtype=torch.float64), **kw)
        ref_sched = torch.optim.lr_scheduler.StepLR(ref, 1, gamma=0.5)
        for x, y in steps:
            train_plain(m, ref, [(x, y)])
            ref_sched.step()
        alone.append(m)
    assert_close_models(batch.extract_all(), alone, torch.float64)


def test_change_counter_unpickles_from_before_it_watched_tensors() -> None:
    """A param-group change counter pickled by an earlier version (state ``(None,
    {"value": v})``) loads with its count and nothing watched."""
    from modelbatch.optim.base import _Counter

    c = _Counter.__new__(_Counter)
    c.__setstate__((None, {"value": 5}))
    assert c.value == 5 and c.watch == []
    again = pickle.loads(pickle.dumps(c))
    assert again.value == 5 and again.watch == []


@pytest.mark.parametrize("split", [False, True], ids=["shared", "split"])
def test_step_state_pickled_before_the_rows_loads(split: bool) -> None:
    """A slot pickled with the earlier layout (one ``small`` [N, c] shared by the storage's
    tensors, or after a split one per parameter in a ``split`` list) loads as rows."""
    batch = ModelBatch(models())
    opt = Adam(batch, lr=0.01)
    train(batch, opt, data(2))
    slot = opt._slots[0]
    if split:
        slot.rows[0, :, 2] += 1  # tensor 0 one step ahead
        slot.split = True
    old = slot.__getstate__()
    rows = old.pop("rows")
    old["small"] = rows[0].clone()
    old["split"] = [r.clone() for r in rows] if split else None
    loaded = object.__new__(type(slot))
    loaded.__setstate__(old)
    assert torch.equal(loaded.rows, rows) and loaded.split is split
    assert loaded.rows.shape == (slot.count, N, rows.shape[2])
