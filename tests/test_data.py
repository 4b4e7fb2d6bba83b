"""Data routing: k-fold and bootstrap models in one batch equal the same models trained
alone on exactly their samples of each batch."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import modelbatch
from modelbatch import DataRouter, IndexedDataset, ModelBatch, evaluate_held_out
from modelbatch.data import bootstrap_counts, kfold_assignments, skip_models_without_samples
from modelbatch.optim import SGD, Adam
from tests.helpers import assert_close_models, rel_err

D = 30


def make_models(n: int) -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double() for _ in range(n)]


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(
        torch.randn(D, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (D,), generator=g)
    )


def batches(batch_size: int, epochs: int = 2) -> list[tuple[Tensor, Tensor, Tensor]]:
    loader = DataLoader(
        IndexedDataset(dataset()),
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(2),
    )
    return [tuple(item) for _ in range(epochs) for item in loader]  # type: ignore[misc]


def train_alone_weighted(
    model: nn.Module, make_opt, data, weights: Tensor
) -> tuple[nn.Module, int]:
    """Train alone on each batch's samples repeated ``weights[idx]`` times; batches without
    a sample are skipped, as a model trained alone never sees them. Returns the model and
    the number of skipped batches."""
    m = copy.deepcopy(model)
    opt = make_opt(m)
    skipped = 0
    for x, y, idx in data:
        reps = weights[idx].long()
        if int(reps.sum()) == 0:
            skipped += 1
            continue
        xs, ys = x.repeat_interleave(reps, dim=0), y.repeat_interleave(reps, dim=0)
        opt.zero_grad()
        F.cross_entropy(m(xs), ys).backward()
        opt.step()
    return m, skipped


# ------------------------------------------------------------------------- fold / resample
def test_kfold_assignments_match_sklearn_without_shuffle() -> None:
    model_selection = pytest.importorskip("sklearn.model_selection")
    folds = kfold_assignments(4, 10, shuffle=False)
    for f, (_, test_idx) in enumerate(model_selection.KFold(4).split(range(10))):
        assert (folds == f).nonzero().flatten().tolist() == list(test_idx)


def test_kfold_router_partitions_the_data() -> None:
    router = DataRouter.kfold(4, 22, seed=3)
    assert router.folds is not None
    assert sorted(torch.bincount(router.folds).tolist()) == [5, 5, 6, 6]
    assert router.eval_weights is not None
    assert torch.equal(router.eval_weights.sum(0), torch.ones(22, dtype=torch.long))
    assert torch.equal(router.train_weights, ~router.eval_weights)
    assert not torch.equal(router.folds, kfold_assignments(4, 22, seed=4))
    with pytest.raises(ValueError, match="2 <= k <= dataset_size"):
        DataRouter.kfold(1, 10)


def test_bootstrap_counts_are_resamples_independent_of_n() -> None:
    small, big = bootstrap_counts(3, 50, seed=7), bootstrap_counts(6, 50, seed=7)
    assert torch.equal(small, big[:3])
    assert torch.equal(small.sum(1), torch.full((3,), 50))
    assert not torch.equal(small[0], small[1])
    router = DataRouter.bootstrap(3, 50, seed=7)
    assert router.eval_weights is not None
    assert torch.equal(router.eval_weights, small == 0)  # out-of-bag samples


def test_router_validation() -> None:
    with pytest.raises(ValueError, match=r"train_weights must have shape \[N, D\]"):
        DataRouter(torch.ones(5))
    with pytest.raises(ValueError, match="negative weights for model 1"):
        DataRouter(torch.tensor([[1.0, 0.0], [1.0, -1.0]]))
    with pytest.raises(ValueError, match="they must match"):
        DataRouter(torch.ones(2, 3), torch.ones(2, 4))
    router = DataRouter.kfold(3, 9)
    with pytest.raises(TypeError, match="sample indices must be integers"):
        router.train_mask(torch.zeros(3))
    with pytest.raises(ValueError, match="IndexedDataset"):
        router.train_mask(torch.zeros(3, 1, dtype=torch.long))
    batch = ModelBatch(make_models(2))
    with pytest.raises(ValueError, match="weights for 3 models, the batch holds 2"):
        router.check_batch(batch)
    assert router.subset([0, 2]).num_models == 2
    assert torch.equal(router.subset([2]).train_weights, router.train_weights[2:])
    with pytest.raises(ValueError, match="no eval_weights"):
        DataRouter(torch.ones(2, 3)).eval_mask(torch.tensor([0]))


def test_indexed_dataset_appends_the_index() -> None:
    ds = IndexedDataset(dataset())
    x, _, i = ds[4]
    assert i == 4 and torch.equal(x, dataset()[4][0])
    assert IndexedDataset([10, 20])[1] == (20, 1)
    assert len(ds) == D


# ------------------------------------------------------------------------- equivalence
def test_kfold_training_equals_training_alone_on_the_training_folds() -> None:
    k = 3
    router = DataRouter.kfold(k, D, seed=0)
    data = batches(batch_size=2)
    models = make_models(k)
    batch = ModelBatch(models)
    opt = Adam(batch, lr=[0.01, 0.02, 0.05])
    losses = modelbatch.train_one_epoch(batch, data, opt, F.cross_entropy, router=router)
    assert losses.shape == (k,)
    lrs = [0.01, 0.02, 0.05]
    alone, skipped = [], 0
    for i in range(k):
        m, s = train_alone_weighted(
            models[i],
            lambda mm, i=i: torch.optim.Adam(mm.parameters(), lr=lrs[i]),
            data,
            router.train_weights[i],
        )
        alone.append(m)
        skipped += s
    assert skipped > 0  # the "model has no sample in this batch" path ran
    assert_close_models(batch.extract_all(), alone, torch.float64, "k-fold")

    # Held-out evaluation: each model on its own fold, as evaluated alone.
    loader = DataLoader(IndexedDataset(dataset()), batch_size=7)
    result = evaluate_held_out(batch, loader, router, F.cross_entropy)
    x_all, y_all = dataset().tensors
    assert router.folds is not None
    for i, m in enumerate(alone):
        held = router.folds == i
        with torch.no_grad():
            out = m(x_all[held])
        acc = (out.argmax(-1) == y_all[held]).double().mean()
        assert abs(float(result["accuracy"][i]) - float(acc)) < 1e-12
        assert abs(float(result["loss"][i]) - float(F.cross_entropy(out, y_all[held]))) < 1e-10
        assert float(result["count"][i]) == int(held.sum())


def test_bootstrap_training_equals_training_alone_on_the_resample() -> None:
    n = 3
    router = DataRouter.bootstrap(n, D, seed=5)
    data = batches(batch_size=6)
    models = make_models(n)
    batch = ModelBatch(models)
    opt = SGD(batch, lr=0.1, momentum=0.9)
    modelbatch.train_one_epoch(batch, data, opt, F.cross_entropy, router=router)
    alone = [
        train_alone_weighted(
            models[i],
            lambda mm: torch.optim.SGD(mm.parameters(), lr=0.1, momentum=0.9),
            data,
            router.train_weights[i],
        )[0]
        for i in range(n)
    ]
    assert_close_models(batch.extract_all(), alone, torch.float64, "bootstrap")
    oob = evaluate_held_out(batch, DataLoader(IndexedDataset(dataset()), batch_size=10), router)
    assert router.eval_weights is not None
    assert torch.equal(oob["count"], router.eval_weights.double().sum(1))


def test_per_model_inputs_with_routing() -> None:
    """Per-model inputs [N, B, ...] (a different augmentation per model) through the same
    API, combined with k-fold masks."""
    k = 3
    router = DataRouter.kfold(k, D, seed=1)
    g = torch.Generator().manual_seed(9)
    data = []
    for x, y, idx in batches(batch_size=5, epochs=1):
        noise = 0.1 * torch.randn(k, *x.shape, generator=g, dtype=x.dtype)
        data.append((x.unsqueeze(0) + noise, y, idx))  # x: [N, B, 4]
    models = make_models(k)
    batch = ModelBatch(models)
    opt = SGD(batch, lr=0.2)
    modelbatch.train_one_epoch(batch, data, opt, F.cross_entropy, per_model=True, router=router)
    alone = []
    for i in range(k):
        per_model_data = [(x[i], y, idx) for x, y, idx in data]
        alone.append(
            train_alone_weighted(
                models[i],
                lambda mm: torch.optim.SGD(mm.parameters(), lr=0.2),
                per_model_data,
                router.train_weights[i],
            )[0]
        )
    assert_close_models(batch.extract_all(), alone, torch.float64, "per-model inputs")


def test_skip_models_without_samples_restores_quarantine() -> None:
    batch = ModelBatch(make_models(3))
    batch.quarantine(2)
    mask = torch.tensor([[1, 0], [0, 0], [1, 1]])
    with skip_models_without_samples(batch, mask):
        assert batch.active.tolist() == [True, False, False]
    assert batch.active.tolist() == [True, True, False]


# ------------------------------------------------------------------------- isolation
def _bn_models(n: int) -> list[nn.Module]:
    torch.manual_seed(3)
    return [
        nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()
        for _ in range(n)
    ]


def _routed_run(router: DataRouter, x_all: Tensor, y_all: Tensor) -> tuple[ModelBatch, Adam]:
    batch = ModelBatch(_bn_models(router.num_models))
    opt = Adam(batch, lr=0.05)
    pack = modelbatch.CallbackPack(batch, [modelbatch.NaNGuard()], optimizer=opt)
    order = torch.Generator().manual_seed(4)
    data = []
    for _ in range(2):
        perm = torch.randperm(D, generator=order)
        data += [(x_all[i], y_all[i], i) for i in perm.split(6)]
    modelbatch.train_one_epoch(batch, data, opt, F.cross_entropy, router=router, callbacks=pack)
    return batch, opt


@pytest.mark.parametrize("kind", ["kfold", "bootstrap"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_nonfinite_sample_reaches_only_the_models_routed_to_it(kind: str, bad: float) -> None:
    """Sample 5 is non-finite and only model 0 trains on it (weight 0 for the others):
    model 0 is quarantined, every other model (weights, BatchNorm statistics, optimizer
    state) is bit-identical to the run in which sample 5 is an ordinary sample."""
    n = 3
    router = DataRouter.kfold(n, D, seed=0) if kind == "kfold" else DataRouter.bootstrap(n, D, 1)
    w = router.train_weights.clone()
    w[:, 5] = 0
    w[0, 5] = 1
    router = DataRouter(w, isolate_inputs=True)
    x_clean, y = dataset().tensors
    x_bad = x_clean.clone()
    x_bad[5, 2] = bad
    clean, opt_clean = _routed_run(router, x_clean, y)
    dirty, opt_dirty = _routed_run(router, x_bad, y)
    assert clean.active.tolist() == [True] * n
    assert dirty.active.tolist() == [False] + [True] * (n - 1)
    for i in range(1, n):
        for (name, a), b in zip(
            clean.extract(i).state_dict().items(), dirty.extract(i).state_dict().values(),
            strict=True,
        ):
            assert torch.equal(a, b), f"model {i} {name}"
        for name, s in opt_clean.state.items():
            for key, v in s.items():
                assert torch.equal(v[i], opt_dirty.state[name][key][i]), (i, name, key)
    # Without the per-model masking the bad sample poisons every model (0 * NaN = NaN).
    shared = DataRouter(w, isolate_inputs=False)
    poisoned, _ = _routed_run(shared, x_bad, y)
    assert poisoned.active.tolist() == [False] * n


def test_route_inputs_and_targets() -> None:
    mask = torch.tensor([[1, 0, 2], [0, 1, 0]])
    x = torch.arange(6.0).view(3, 2)
    routed = modelbatch.data.route_inputs(x, mask)
    assert routed.shape == (2, 3, 2)
    assert routed[0].tolist() == [[0, 1], [0, 0], [4, 5]]
    assert routed[1].tolist() == [[0, 0], [2, 3], [0, 0]]
    assert torch.equal(modelbatch.data.route_inputs(routed, mask, per_model=True), routed)
    y = torch.tensor([1.0, float("nan"), 3.0])
    out = torch.zeros(2, 3)
    ys, per = modelbatch.data.route_targets(out, y, mask)
    assert per is True and ys[0].tolist() == [1.0, 0.0, 3.0]
    assert ys[1, 1].isnan() and ys[1, 0] == 0 and ys[1, 2] == 0
    classes = torch.tensor([0, 1, 2])
    assert modelbatch.data.route_targets(out, classes, mask) == (classes, None)
    with pytest.raises(ValueError, match="do not match"):
        modelbatch.data.route_inputs(torch.zeros(4, 2), mask)


# ------------------------------------------------------------------------- routed BatchNorm
def _cnn(momentum: float | None) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, bias=False),  # a bias before BatchNorm has no gradient
        nn.BatchNorm2d(3, momentum=momentum),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 3),
    )


def _mlp(momentum: float | None) -> nn.Module:
    return nn.Sequential(
        nn.Linear(4, 6, bias=False),
        nn.BatchNorm1d(6, momentum=momentum),
        nn.Tanh(),
        nn.Linear(6, 5),
        nn.Unflatten(1, (1, 5)),
        nn.BatchNorm1d(1, momentum=momentum, affine=False),  # [B, C, L] input
        nn.Flatten(),
        nn.Linear(5, 3),
    )


BN_D = 24


def _bn_data(kind: str) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(7)
    shape = (BN_D, 2, 4, 4) if kind == "cnn" else (BN_D, 4)
    return (
        torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5,
        torch.randint(0, 3, (BN_D,), generator=g),
    )


def _bn_batches(kind: str, shuffle: bool) -> list[tuple[Tensor, Tensor, Tensor]]:
    x, y = _bn_data(kind)
    order = torch.Generator().manual_seed(8)
    out = []
    for _ in range(2):
        perm = torch.randperm(BN_D, generator=order) if shuffle else torch.arange(BN_D)
        out += [(x[i], y[i], i) for i in perm.split(8)]
    return out


def _momenta(case: str, n: int) -> list[float | None]:
    return {"0.1": [0.1] * n, "None": [None] * n, "mixed": [0.3, None, 0.1, 0.5][:n]}[case]


@pytest.mark.parametrize("kind", ["cnn", "mlp"])
@pytest.mark.parametrize("routing", ["kfold", "bootstrap"])
@pytest.mark.parametrize("momenta", ["0.1", "None", "mixed"])
def test_routed_batchnorm_training_equals_training_alone(
    kind: str, routing: str, momenta: str
) -> None:
    """k-fold / bootstrap training of models with BatchNorm through train_one_epoch equals
    each model trained alone with torch.optim on its own (repeated) samples of each batch:
    parameters, running statistics and num_batches_tracked after several steps, then eval
    outputs. Unshuffled k-fold batches coincide with the folds, so each model skips a batch
    (its running statistics must not move)."""
    n = 3
    router = (
        DataRouter.kfold(n, BN_D, shuffle=False)
        if routing == "kfold"
        else DataRouter.bootstrap(n, BN_D, seed=3)
    )
    data = _bn_batches(kind, shuffle=routing == "bootstrap")
    torch.manual_seed(0)
    make = _cnn if kind == "cnn" else _mlp
    models = [make(m).double() for m in _momenta(momenta, n)]
    batch = ModelBatch(models)
    opt = Adam(batch, lr=0.05)
    modelbatch.train_one_epoch(batch, data, opt, F.cross_entropy, router=router)
    alone, skipped = [], 0
    for i in range(n):
        m, s = train_alone_weighted(
            models[i],
            lambda mm: torch.optim.Adam(mm.parameters(), lr=0.05),
            data,
            router.train_weights[i],
        )
        alone.append(m)
        skipped += s
    if routing == "kfold":
        assert skipped == 2 * n  # each model skipped its own fold's batch, twice
    assert_close_models(batch.extract_all(), alone, torch.float64, f"{routing} {kind}")
    x_all, _ = _bn_data(kind)
    batch.eval()
    with torch.no_grad():
        out = batch(x_all)
        for i, m in enumerate(alone):
            m.eval()
            err = rel_err(out[i], m(x_all))
            assert err <= 1e-10, f"eval model {i}: {err:.3g}"


@pytest.mark.parametrize("kind", ["cnn", "mlp"])
def test_routed_batchnorm_step_outputs_and_gradients(kind: str) -> None:
    """A hand-written routed step (the documented opt-in): the outputs of each model's
    selected samples and every gradient equal the model's alone on its repeated samples;
    unselected samples' outputs are finite; an all-zero row keeps its running statistics."""
    n = 3
    x, y = _bn_data(kind)
    x, y = x[:10], y[:10]
    counts = torch.tensor(
        [[2, 0, 1, 3, 0, 1, 1, 0, 2, 1], [0] * 10, [1, 1, 0, 0, 1, 4, 0, 1, 1, 1]]
    )
    torch.manual_seed(1)
    make = _cnn if kind == "cnn" else _mlp
    models = [make(None if i == 1 else 0.2).double() for i in range(n)]
    batch = ModelBatch(models)
    before = [copy.deepcopy(b) for b in batch.stacked.buffers()]
    xs = modelbatch.data.route_inputs(x, counts)
    with modelbatch.data.routed_batch_norm(counts):
        out = batch(xs, per_model=True)
    loss = batch.compute_loss(out, y, F.cross_entropy, mask=counts)
    loss.backward()
    assert bool(torch.isfinite(out).all())
    params = dict(batch.stacked.named_parameters())
    for i in (0, 2):
        m = copy.deepcopy(models[i])
        reps = torch.arange(10).repeat_interleave(counts[i])
        ref_out = m(x[reps])
        F.cross_entropy(ref_out, y[reps]).backward()
        assert rel_err(out[i][reps], ref_out) <= 1e-10
        for name, p in m.named_parameters():
            assert p.grad is not None
            err = rel_err(params[name].grad[i], p.grad)
            assert err <= 1e-10, f"model {i} grad {name}: {err:.3g}"
        for (name, buf), ref in zip(batch.extract(i).named_buffers(), m.buffers(), strict=True):
            assert rel_err(buf.double(), ref.double()) <= 1e-10, f"model {i} {name}"
    for old, new in zip(before, batch.stacked.buffers(), strict=True):
        assert torch.equal(old[1], new[1])  # model 1 (no sample) unchanged


def test_routed_batchnorm_refusals() -> None:
    """One sample per channel ([B, C] input) and a batch dimension that is not the mask's
    are refused with errors naming the cause."""
    batch = ModelBatch([_mlp(0.1).double() for _ in range(2)])
    x, _ = _bn_data("mlp")
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, :3] = True
    mask[1, 4] = True
    with modelbatch.data.routed_batch_norm(mask), pytest.raises(ValueError, match=r"\[1\]"):
        batch(modelbatch.data.route_inputs(x[:6], mask), per_model=True)
    with modelbatch.data.routed_batch_norm(mask), pytest.raises(ValueError, match=r"\[N, B\]"):
        batch(x[:8])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("track", [True, False])
def test_routed_batchnorm3d_per_model_eps(dtype: torch.dtype, track: bool) -> None:
    """BatchNorm3d with per-model eps and momenta, with and without running statistics,
    float64 and float32: a routed step equals each model alone (outputs, gradients,
    buffers); in eval mode the routing context changes nothing."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(7, 2, 3, 2, 2, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (7,), generator=g)
    counts = torch.tensor([[1, 2, 0, 1, 1, 0, 3], [0, 1, 1, 1, 0, 1, 0], [0] * 7])
    torch.manual_seed(2)
    models = [
        nn.Sequential(
            nn.BatchNorm3d(2, eps=eps, momentum=mom, track_running_stats=track),
            nn.Flatten(),
            nn.Linear(24, 3),
        ).to(dtype)
        for eps, mom in [(1e-5, 0.1), (1e-2, None), (0.3, 0.5)]
    ]
    batch = ModelBatch(models)
    xs = modelbatch.data.route_inputs(x, counts)
    with modelbatch.data.routed_batch_norm(counts):
        out = batch(xs, per_model=True)
    batch.compute_loss(out, y, F.cross_entropy, mask=counts).backward()
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    params = dict(batch.stacked.named_parameters())
    for i in (0, 1):
        m = copy.deepcopy(models[i])
        reps = torch.arange(7).repeat_interleave(counts[i])
        ref_out = m(x[reps])
        F.cross_entropy(ref_out, y[reps]).backward()
        assert rel_err(out[i][reps], ref_out) <= tol
        for name, p in m.named_parameters():
            assert p.grad is not None
            assert rel_err(params[name].grad[i], p.grad) <= tol, (i, name)
        assert_close_models([batch.extract(i)], [m], dtype, f"model {i}")
    assert_close_models([batch.extract(2)], [models[2]], dtype, "model 2 (no sample)")
    batch.eval()
    with torch.no_grad():
        plain = batch(x)
        with modelbatch.data.routed_batch_norm(counts):
            routed = batch(x)
    assert torch.equal(plain, routed)


# Dynamo itself warns when it fakeifies a BatchNorm's non-leaf batched input after a graph
# break (a torch-internal UserWarning, not about the result).
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
def test_routed_batchnorm_under_compile() -> None:
    """``enable_compile``: routed and plain training forwards, in either order, equal the
    eager ones (the routing context is not baked into the compiled code)."""
    torch._dynamo.reset()
    torch.manual_seed(4)
    models = [_mlp(m).double() for m in (0.1, None)]
    eager, compiled = ModelBatch(copy.deepcopy(models)), ModelBatch(copy.deepcopy(models))
    compiled.enable_compile(backend="eager")
    x, _ = _bn_data("mlp")
    x = x[:6]
    mask = torch.tensor([[1, 1, 0, 1, 0, 1], [0, 1, 1, 1, 1, 0]]).bool()
    xs = modelbatch.data.route_inputs(x, mask)
    for routed in (True, False, True):
        outs = []
        for b in (eager, compiled):
            with modelbatch.data.routed_batch_norm(mask) if routed else contextlib.nullcontext():
                outs.append(b(xs, per_model=True))
        assert rel_err(outs[1], outs[0]) <= 1e-12, routed
        for a, c in zip(eager.stacked.buffers(), compiled.stacked.buffers(), strict=True):
            assert rel_err(c.double(), a.double()) <= 1e-12, routed
