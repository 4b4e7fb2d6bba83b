"""Callbacks: guards quarantine the right models at the right step, early stopping
quarantines or drops per model, logging reaches any MetricsLogger, and train_one_epoch
drives the hooks."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import modelbatch
from modelbatch import (
    Callback,
    CallbackPack,
    DivergenceGuard,
    EarlyStopping,
    GradClipping,
    LogMetrics,
    MetricsLogger,
    ModelBatch,
    NaNGuard,
)

N = 4


def make_batch(n: int = N, bn: bool = True) -> ModelBatch:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(3, 4, bias=False)]
    if bn:
        layers.append(nn.BatchNorm1d(4))
    layers += [nn.ReLU(), nn.Linear(4, 2)]
    return ModelBatch([nn.Sequential(*layers) for _ in range(n)])


class ListLogger:
    def __init__(self) -> None:
        self.calls: list[tuple[int, list[dict[str, Any]]]] = []

    def log(self, metrics: list[dict[str, Any]], step: int) -> None:
        self.calls.append((step, metrics))


class Recorder(Callback):
    def __init__(self) -> None:
        self.seen: list[str] = []

    def on_attach(self, pack: CallbackPack) -> None:
        self.seen.append("attach")

    def on_step_begin(self, pack: CallbackPack) -> None:
        self.seen.append("begin")

    def on_before_optimizer_step(self, pack: CallbackPack) -> None:
        self.seen.append("before_step")

    def on_step_end(self, pack: CallbackPack) -> None:
        self.seen.append(f"end{pack.global_step}")

    def on_epoch_end(self, pack: CallbackPack) -> None:
        self.seen.append(f"epoch{pack.epoch}")

    def on_validation_end(self, pack: CallbackPack, metrics: Any) -> None:
        self.seen.append("val:" + ",".join(sorted(metrics)))


def step(batch: ModelBatch, opt: torch.optim.Optimizer, pack: CallbackPack, x: Tensor,
         y: Tensor) -> None:
    pack.on_step_begin()
    loss = batch.compute_loss(batch(x, per_model=x.dim() == 3), y, F.cross_entropy)
    opt.zero_grad()
    loss.backward()
    pack.on_before_optimizer_step()
    opt.step()
    pack.on_step_end()


def test_metrics_logger_protocol_and_type_check() -> None:
    assert isinstance(ListLogger(), MetricsLogger)
    with pytest.raises(TypeError, match="log"):
        LogMetrics(object())  # type: ignore[arg-type]


def test_train_one_epoch_drives_hooks_and_nan_guard() -> None:
    batch = make_batch()
    opt = modelbatch.optim.SGD(batch, lr=0.1)
    rec = Recorder()
    logger = ListLogger()
    pack = CallbackPack(batch, [NaNGuard(), rec, LogMetrics(logger, every_n_steps=2)],
                        optimizer=opt)
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(3, N, 6, 3, generator=g)
    xs[1, 2] = float("nan")  # model 2's second batch is poisoned
    loader = [(xs[k], torch.randint(0, 2, (6,), generator=g)) for k in range(3)]
    losses = modelbatch.train_one_epoch(batch, loader, opt, F.cross_entropy, per_model=True,
                                        callbacks=pack)
    assert batch.active.tolist() == [True, True, False, True]
    assert pack.events == [{"model_id": 2, "step": 1, "epoch": 0,
                            "reason": "non-finite loss or gradient", "action": "quarantine"}]
    assert torch.isfinite(losses[[0, 1, 3]]).all()
    assert rec.seen == ["attach", "begin", "before_step", "end1", "begin", "before_step",
                        "end2", "begin", "before_step", "end3", "epoch0"]
    assert [s for s, _ in logger.calls] == [2]
    assert [row["active"] for row in logger.calls[0][1]] == [True, True, False, True]
    assert pack.epoch == 1 and pack.global_step == 3
    pack.on_validation_end({"val_acc": torch.tensor([0.1, 0.2, 0.3, 0.4])})
    assert rec.seen[-1] == "val:val_acc"
    assert [row["val_acc"] for row in batch.metrics()] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert len(logger.calls) == 2  # LogMetrics also logs after validation


def test_divergence_guard_patience_and_buffer_restore() -> None:
    batch = make_batch(n=3)
    opt = modelbatch.optim.SGD(batch, lr=0.0)  # lr 0: losses only depend on the data
    guard = DivergenceGuard([0.01, 10.0, 1e9], patience=2)  # model 0's losses are above
    pack = CallbackPack(batch, [guard], optimizer=opt)
    x = torch.randn(3, 6, 3)
    y = torch.randint(0, 2, (6,))
    step(batch, opt, pack, x, y)
    assert batch.all_active  # patience 2: one step over the threshold is tolerated
    stats = dict(batch.stacked_buffers())["1.running_mean"].clone()
    step(batch, opt, pack, x, y)
    assert batch.active.tolist() == [False, True, True]
    # Model 0's BatchNorm statistics were restored to their values before the bad step.
    after = dict(batch.stacked_buffers())["1.running_mean"]
    assert torch.equal(after[0], stats[0])
    assert not torch.equal(after[1], stats[1])
    assert pack.events[0]["model_id"] == 0 and pack.events[0]["step"] == 1


@pytest.mark.parametrize("mode", ["min", "max"])
def test_early_stopping_quarantines_per_model(mode: str) -> None:
    batch = make_batch()
    es = EarlyStopping("val", mode=mode, patience=2, min_delta=0.05)
    pack = CallbackPack(batch, [es])
    sign = 1.0 if mode == "min" else -1.0
    history = [
        [1.0, 1.0, 1.0, 1.0],
        [0.9, 1.0, 0.98, 1.2],  # 0 improves; 2 improves by less than min_delta
        [0.8, 1.0, 0.96, 1.2],
        [0.7, 0.5, 0.94, 1.2],
    ]
    active = []
    for values in history:
        pack.on_validation_end({"val": torch.tensor(values) * sign, "other": torch.zeros(N)})
        active.append(batch.active.tolist())
    assert active == [
        [True, True, True, True],
        [True, True, True, True],
        [True, False, False, False],
        [True, False, False, False],  # model 1 improved too late: it is no longer watched
    ]
    assert [e["model_id"] for e in pack.events] == [1, 2, 3]
    with pytest.raises(KeyError, match="'val'"):
        pack.on_validation_end({"loss": torch.zeros(N)})


def test_early_stopping_drop_shrinks_batch_schedulers_and_callback_state() -> None:
    batch = make_batch()
    opt = modelbatch.optim.Adam(batch, lr=[0.1, 0.2, 0.3, 0.4])
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    es = EarlyStopping("val_loss", patience=1, action="drop")
    guard = DivergenceGuard([1.0, 2.0, 3.0, 4.0])
    pack = CallbackPack(batch, [guard, es], optimizer=opt, schedulers=[sched])
    step(batch, opt, pack, torch.randn(6, 3), torch.randint(0, 2, (6,)))
    pack.on_validation_end({"val_loss": torch.tensor([1.0, 1.0, 1.0, 1.0])})
    pack.on_validation_end({"val_loss": torch.tensor([0.5, 1.0, 0.5, 1.0])})
    assert batch.model_ids == [0, 2]
    assert [e["action"] for e in pack.events] == ["drop", "drop"]
    assert sched.base_lrs == [0.1, 0.3]
    assert es.best is not None and es.best.tolist() == [0.5, 0.5]
    assert guard._threshold is not None and guard._threshold.tolist() == [1.0, 3.0]
    step(batch, opt, pack, torch.randn(6, 3), torch.randint(0, 2, (6,)))
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.05, 0.15])
    # When every remaining model stops, they are quarantined (a batch cannot be empty).
    pack.on_validation_end({"val_loss": torch.tensor([0.5, 0.5])})
    assert batch.model_ids == [0, 2] and pack.should_stop


def test_grad_clipping_callback_records_norms() -> None:
    batch = make_batch(bn=False)
    opt = modelbatch.optim.SGD(batch, lr=0.1)
    pack = CallbackPack(batch, [GradClipping(max_norm=1e-3, max_value=1.0)], optimizer=opt)
    step(batch, opt, pack, torch.randn(6, 3), torch.randint(0, 2, (6,)))
    norms = [row["grad_norm"] for row in batch.metrics()]
    assert all(v > 1e-3 for v in norms)
    assert float(modelbatch.grad_norms(batch).max()) <= 1e-3 * (1 + 1e-5)
    with pytest.raises(ValueError, match="max_norm or max_value"):
        GradClipping()


def test_pack_flag_validates_mask() -> None:
    pack = CallbackPack(make_batch())
    with pytest.raises(ValueError, match=r"\[N\] = \[4\] bool"):
        pack.flag(torch.zeros(3, dtype=torch.bool), "x")
    with pytest.raises(TypeError, match="Callback instances"):
        CallbackPack(make_batch(), [object()])  # type: ignore[list-item]


@pytest.mark.parametrize("on_disk", [False, True])
def test_early_stopping_keeps_each_models_best_weights_after_it_is_dropped(
    on_disk: bool, tmp_path: Any
) -> None:
    """Real training: every validation, each model's val loss; the dropped models' best
    weights come back by id and reproduce their best loss exactly."""
    torch.manual_seed(0)
    x, y = torch.randn(32, 3, dtype=torch.float64), torch.randint(0, 2, (32,))
    xv, yv = torch.randn(32, 3, dtype=torch.float64), torch.randint(0, 2, (32,))
    models = [nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
              for _ in range(3)]
    batch = ModelBatch(models)
    opt = modelbatch.optim.SGD(batch, lr=[0.5, 3.0, 0.05])
    es = EarlyStopping("val_loss", patience=2, action="drop",
                       directory=tmp_path if on_disk else None)
    pack = CallbackPack(batch, [es], optimizer=opt)
    history: dict[int | str, list[float]] = {i: [] for i in range(3)}
    snapshots: dict[int | str, list[dict[str, Tensor]]] = {i: [] for i in range(3)}
    for _ in range(30):
        if pack.should_stop:
            break
        step(batch, opt, pack, x, y)
        val = modelbatch.evaluate(batch, [(xv, yv)], F.cross_entropy)["loss"]
        for pos, mid in enumerate(batch.model_ids):
            history[mid].append(float(val[pos]))
            state = batch.extract(mid).state_dict()
            snapshots[mid].append({k: v.clone() for k, v in state.items()})
        pack.on_validation_end({"val_loss": val})
    dropped = [e["model_id"] for e in pack.events if e["action"] == "drop"]
    assert dropped, history
    for mid in range(3):
        best_epoch = min(range(len(history[mid])), key=history[mid].__getitem__)
        assert es.best_values[mid] == history[mid][best_epoch]
        state = es.best_state(mid)
        for k, v in snapshots[mid][best_epoch].items():
            assert torch.equal(state[k], v), (mid, k)
        model = es.best_model(mid)
        with torch.no_grad():
            assert float(F.cross_entropy(model(xv), yv)) == pytest.approx(
                history[mid][best_epoch], rel=1e-12
            )
    with pytest.raises(KeyError, match="no best weights for model 7"):
        es.best_state(7)


def test_restore_best_weights_puts_a_stopped_models_best_back() -> None:
    batch = make_batch(bn=False)
    es = EarlyStopping("val", patience=1, restore_best_weights=True)
    pack = CallbackPack(batch, [es])
    before = batch.extract(1).state_dict()
    pack.on_validation_end({"val": torch.tensor([1.0, 0.5, 1.0, 1.0])})  # model 1's best
    with torch.no_grad():
        for _, p in batch.stacked_parameters():
            p.add_(1.0)
    pack.on_validation_end({"val": torch.tensor([0.9, 0.7, 0.9, 0.9])})  # model 1 stops
    assert not bool(batch.active[1])
    for k, v in batch.extract(1).state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("directory", [False, True])
def test_a_replaced_slot_does_not_inherit_the_previous_models_best_weights(
    tmp_path, directory: bool
) -> None:
    """A slot refilled with a new model (``on_models_replaced``, as sweeps do) starts with no
    best record: until the new model has a finite metric, ``best_state`` of that id refuses,
    and ``restore_best_weights`` never writes the previous occupant's weights into it."""
    batch = make_batch(bn=False)
    es = EarlyStopping("val", patience=1, restore_best_weights=True,
                       directory=tmp_path / "best" if directory else None)
    pack = CallbackPack(batch, [es])
    pack.on_validation_end({"val": torch.tensor([1.0, 0.5, 1.0, 1.0])})
    torch.manual_seed(5)
    fresh = nn.Sequential(nn.Linear(3, 4, bias=False), nn.ReLU(), nn.Linear(4, 2))
    batch.insert(1, fresh)
    for cb in pack.callbacks:
        cb.on_models_replaced(pack, [1])
    assert 1 not in es.best_values
    with pytest.raises(KeyError, match="no best weights for model 1"):
        es.best_state(1)
    nan = float("nan")
    pack.on_validation_end({"val": torch.tensor([0.9, nan, 0.9, 0.9])})  # slot 1 stops
    assert not bool(batch.active[1])
    for k, v in batch.extract(1).state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k
