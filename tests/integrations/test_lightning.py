"""BatchLightningModule with a real ``lightning.Trainer`` on CPU.

Reference: each model trained alone with ``torch.optim`` (and ``clip_grad_norm_``) on the
same batches, in float64.
"""

from __future__ import annotations

import copy
import functools
import importlib
import math
import runpy
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

from modelbatch import ModelBatch, evaluate, optim  # noqa: E402
from modelbatch.integrations.lightning import (  # noqa: E402
    BatchLightningModule,
    PerModelEarlyStopping,
)
from tests.helpers import TOL, assert_close_models, rel_err  # noqa: E402

pytestmark = [
    # Lightning's advice for real runs (worker count, logging interval, no val loader).
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\).*"),
]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
LRS = [0.05, 0.01, 0.002]
CLIP = 0.5


def _acc(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (out.argmax(-1) == target).to(out.dtype).mean()


def _models(n: int = 3, seed: int = 0) -> list[nn.Module]:
    torch.manual_seed(seed)
    return [nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double() for _ in range(n)]


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(24, 4, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 3, (24,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8)  # 3 batches, no shuffling


def _module(models: list[nn.Module]) -> BatchLightningModule:
    return BatchLightningModule(
        ModelBatch(models),
        F.cross_entropy,
        optimizer=functools.partial(optim.Adam, lr=LRS),
        scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
        scheduler_interval="step",
        metrics={"acc": _acc},
    )


def _trainer(max_epochs: int, **kwargs: Any) -> Any:
    kwargs.setdefault("enable_checkpointing", False)
    kwargs.setdefault("gradient_clip_val", CLIP)
    return pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def _train_alone(models: list[nn.Module], epochs: int) -> list[nn.Module]:
    out = []
    for i, model in enumerate(models):
        m = copy.deepcopy(model)
        opt = torch.optim.Adam(m.parameters(), lr=LRS[i])
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        for _ in range(epochs):
            for x, y in _loader():
                opt.zero_grad()
                F.cross_entropy(m(x), y).backward()
                torch.nn.utils.clip_grad_norm_(m.parameters(), CLIP)
                opt.step()
                sched.step()
        out.append(m)
    return out


def test_fit_matches_each_model_trained_alone(tmp_path: Path) -> None:
    models = _models()
    module = _module(models)
    _trainer(2, default_root_dir=tmp_path).fit(module, _loader())
    # Clipping was active for some models and not for others: a global norm would differ.
    assert module.last_grad_norms is not None
    assert (module.last_grad_norms > CLIP).any()
    assert_close_models(module.model_batch.extract_all(), _train_alone(models, 2), torch.float64)


def test_validate_logs_per_model_metrics(tmp_path: Path) -> None:
    module = _module(_models())
    trainer = _trainer(1, default_root_dir=tmp_path)
    trainer.fit(module, _loader())
    assert "train/loss/model_2" in trainer.callback_metrics
    results = trainer.validate(module, _loader(), verbose=False)[0]
    expected = evaluate(module.model_batch, _loader(), F.cross_entropy)
    for i in range(3):
        assert results[f"val/acc/model_{i}"] == pytest.approx(float(expected["accuracy"][i]))
        assert results[f"val/loss/model_{i}"] == pytest.approx(
            float(expected["loss"][i]), rel=1e-12
        )
    assert results["val/loss"] == pytest.approx(float(expected["loss"].mean()), rel=1e-6)
    assert module.per_model_logged("val", "acc") == {
        i: pytest.approx(float(expected["accuracy"][i])) for i in range(3)
    }


def test_per_model_targets_reach_loss_and_metrics_by_the_same_rule(tmp_path: Path) -> None:
    """[N, B] class targets for [N, B, C] outputs: model i's loss and metrics use targets[i]
    (the metrics used to get all N rows); N == B without per_model_targets is an error."""
    models = _models()
    module = _module(models)
    g = torch.Generator().manual_seed(3)
    items = [
        {"x": torch.randn(8, 4, generator=g, dtype=torch.float64),
         "y": torch.randint(0, 3, (3, 8), generator=g)}
        for _ in range(2)
    ]
    results = _trainer(1, default_root_dir=tmp_path).validate(
        module, DataLoader(items, batch_size=None), verbose=False
    )[0]
    for i, m in enumerate(models):
        with torch.no_grad():
            acc = [float(_acc(m(d["x"]), d["y"][i])) for d in items]
            loss = [float(F.cross_entropy(m(d["x"]), d["y"][i])) for d in items]
        assert results[f"val/acc/model_{i}"] == pytest.approx(sum(acc) / 2, rel=1e-12)
        assert results[f"val/loss/model_{i}"] == pytest.approx(sum(loss) / 2, rel=1e-12)
    square = [{"x": d["x"][:3], "y": d["y"][:, :3]} for d in items]  # N = B = 3
    with pytest.raises(ValueError, match="ambiguous targets"):
        _trainer(1, default_root_dir=tmp_path).validate(
            module, DataLoader(square, batch_size=None), verbose=False
        )


def test_checkpoint_resume_restores_every_model_and_optimizer(tmp_path: Path) -> None:
    models = _models()
    first = _module(models)
    _trainer(2, default_root_dir=tmp_path).fit(first, _loader())
    trainer = _trainer(2, default_root_dir=tmp_path)
    trainer.fit(_module(models), _loader())
    ckpt = tmp_path / "two_epochs.ckpt"
    trainer.save_checkpoint(ckpt)

    # Fresh, differently initialised models: validate(ckpt_path=...) restores every weight.
    fresh = _module(_models(seed=7))
    _trainer(1, default_root_dir=tmp_path).validate(fresh, _loader(), ckpt_path=ckpt, verbose=False)
    for name, value in trainer.lightning_module.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name

    # Resuming fit restores the optimizer and scheduler state too: 2 + 2 epochs == 4 epochs.
    resumed = _module(_models(seed=7))
    _trainer(4, default_root_dir=tmp_path).fit(resumed, _loader(), ckpt_path=ckpt)
    assert_close_models(resumed.model_batch.extract_all(), _train_alone(models, 4), torch.float64)
    assert [g["lr"] for g in resumed.trainer.optimizers[0].param_groups] == pytest.approx(
        [lr * 0.5**6 for lr in LRS]
    )


def test_checkpoint_of_other_models_is_refused(tmp_path: Path) -> None:
    trainer = _trainer(1, default_root_dir=tmp_path)
    trainer.fit(_module(_models()), _loader())
    ckpt = tmp_path / "m.ckpt"
    trainer.save_checkpoint(ckpt)
    other = BatchLightningModule(
        ModelBatch(_models(), model_ids=["a", "b", "c"]), F.cross_entropy, optim.SGD
    )
    with pytest.raises(ValueError, match=r"holds models \[0, 1, 2\].*\['a', 'b', 'c'\]"):
        _trainer(1).validate(other, _loader(), ckpt_path=ckpt, verbose=False)


def test_quarantined_model_is_frozen_and_value_clipping(tmp_path: Path) -> None:
    models = _models()
    batch = ModelBatch(models)
    batch.quarantine(1)
    module = BatchLightningModule(batch, F.cross_entropy, optimizer=torch.optim.SGD)
    trainer = _trainer(1, default_root_dir=tmp_path, gradient_clip_algorithm="value")
    trainer.fit(module, _loader())
    after = batch.extract_all()
    assert_close_models([after[1]], [models[1]], torch.float64)
    # SGD (lr 1e-3 default) with value clipping, model 0 alone:
    ref = copy.deepcopy(models[0])
    opt = torch.optim.SGD(ref.parameters(), lr=1e-3)
    for x, y in _loader():
        opt.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        torch.nn.utils.clip_grad_value_(ref.parameters(), CLIP)
        opt.step()
    assert_close_models([after[0]], [ref], torch.float64)


def test_gradient_scaler_is_refused(tmp_path: Path) -> None:
    from lightning.pytorch.plugins.precision import MixedPrecision

    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        plugins=[plugin],
        default_root_dir=tmp_path,
    )
    with pytest.raises(RuntimeError, match="gradient scaler"):
        trainer.fit(_module(_models()), _loader())


def test_bad_arguments_have_clear_errors() -> None:
    batch = ModelBatch(_models())
    with pytest.raises(ValueError, match="no optimizer"):  # only when training starts
        BatchLightningModule(batch, F.cross_entropy).configure_optimizers()
    module = BatchLightningModule(batch, F.cross_entropy, optimizer=optim.SGD)
    with pytest.raises(ValueError, match=r"\(x, y\)"):
        module.training_step(torch.zeros(2, 4), 0)
    one_liner = ModelBatch(_models(), lr=0.1)  # the batch's own optimizer is the default
    assert BatchLightningModule(one_liner, F.cross_entropy).configure_optimizers() is (
        one_liner.optimizer
    )


def test_missing_lightning_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("lightning", "lightning.pytorch", "pytorch_lightning"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "modelbatch.integrations.lightning")
    with pytest.raises(ImportError, match=r"pip install -e '\.\[lightning\]'"):
        importlib.import_module("modelbatch.integrations.lightning")


def test_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    ns = runpy.run_path(str(EXAMPLES / "lightning_example.py"), run_name="__main__")
    batch, accuracy = ns["batch"], ns["accuracy"]
    assert set(accuracy) == set(range(8))
    assert ns["results"]["val/acc/model_7"] == pytest.approx(accuracy[7])
    # The extracted best model reproduces its batch slot.
    x = torch.randn(5, 20)
    out = batch(x)[batch.index_of(ns["best"])]
    assert rel_err(ns["best_model"](x), out) <= TOL[torch.float32]


def test_several_val_loaders_and_dict_batches_in_predict(tmp_path: Path) -> None:
    module = _module(_models())
    trainer = _trainer(1, default_root_dir=tmp_path, limit_train_batches=1)
    trainer.fit(module, _loader(), [_loader(), _loader()])  # validation_step(dataloader_idx)
    results = trainer.validate(module, [_loader(), _loader()], verbose=False)
    assert (
        results[1]["val/acc/model_2/dataloader_idx_1"]
        == results[0]["val/acc/model_2/dataloader_idx_0"]
    )
    assert module.per_model_logged("val", "acc", dataloader_idx=1)[2] == pytest.approx(
        results[1]["val/acc/model_2/dataloader_idx_1"]
    )
    x, y = _loader().dataset.tensors
    dicts = DataLoader([{"x": x[i], "y": y[i]} for i in range(8)], batch_size=8)
    (pred,) = trainer.predict(module, dicts)
    assert torch.equal(pred, module.model_batch(x[:8]))


class _RecordEpochs(pl.Callback):  # type: ignore[misc,name-defined]
    """Records the epochs that ran."""

    def __init__(self) -> None:
        self.epochs: list[int] = []

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self.epochs.append(trainer.current_epoch)


def test_a_diverged_model_does_not_stop_early_stopping_of_the_others(tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import EarlyStopping

    module = BatchLightningModule(
        ModelBatch(_models()),
        F.cross_entropy,
        optimizer=functools.partial(optim.SGD, lr=[0.1, math.inf, 0.1]),
    )
    record = _RecordEpochs()
    stopping = EarlyStopping(monitor="val/loss", patience=5)
    trainer = _trainer(
        3, default_root_dir=tmp_path, gradient_clip_val=None, callbacks=[stopping, record]
    )
    trainer.fit(module, _loader(), _loader())
    assert record.epochs == [0, 1, 2]  # a nan mean would have stopped the fit after epoch 0
    per_model = module.per_model_logged("val", "loss")
    assert not math.isfinite(per_model[1])
    assert float(trainer.callback_metrics["val/loss"]) == pytest.approx(
        (per_model[0] + per_model[2]) / 2, rel=1e-6
    )


class _DropAfterFirstEpoch(pl.Callback):  # type: ignore[misc,name-defined]
    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.current_epoch == 0:
            pl_module.drop(1)


def test_drop_mid_fit_shrinks_the_schedulers_lightning_holds(tmp_path: Path) -> None:
    lrs = [0.1, 0.2, 0.3]
    module = BatchLightningModule(
        ModelBatch(_models()),
        F.cross_entropy,
        optimizer=functools.partial(optim.SGD, lr=lrs),
        scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.5**epoch),
    )
    trainer = _trainer(3, default_root_dir=tmp_path, callbacks=[_DropAfterFirstEpoch()])
    trainer.fit(module, _loader())
    assert module.model_batch.model_ids == [0, 2]
    # Model 2 keeps its own schedule (0.3 * 0.5**3), not model 1's base learning rate.
    assert [g["lr"] for g in trainer.optimizers[0].param_groups] == pytest.approx(
        [0.1 * 0.5**3, 0.3 * 0.5**3]
    )


def test_each_models_lr_is_logged(tmp_path: Path) -> None:
    module = _module(_models())
    trainer = _trainer(2, default_root_dir=tmp_path)
    trainer.fit(module, _loader())
    for i, lr in enumerate(LRS):  # StepLR(2, 0.5) per step: 6 steps -> 3 halvings
        assert float(trainer.callback_metrics[f"lr/model_{i}"]) == pytest.approx(lr * 0.5**3)


def test_torchmetrics_objects_per_model(tmp_path: Path) -> None:
    torchmetrics = pytest.importorskip("torchmetrics")
    models = _models()
    module = BatchLightningModule(
        ModelBatch(copy.deepcopy(models)), F.cross_entropy, optimizer=functools.partial(
            optim.SGD, lr=0.1),
        metrics={"acc": torchmetrics.classification.MulticlassAccuracy(num_classes=3,
                                                                       average="micro"),
                 "fn_acc": _acc},
    )
    trainer = _trainer(1, default_root_dir=tmp_path)
    trainer.fit(module, _loader(), _loader())
    results = trainer.validate(module, _loader(), verbose=False)[0]
    expected = evaluate(module.model_batch, _loader())["accuracy"]
    for i in range(3):
        assert results[f"val/acc/model_{i}"] == pytest.approx(float(expected[i]))
        assert results[f"val/acc/model_{i}"] == pytest.approx(results[f"val/fn_acc/model_{i}"])
    # One clone per model: model 0's object saw only model 0's predictions.
    objs = module.metric_objects["acc"]["val"]
    assert len({id(objs[str(i)]) for i in range(3)}) == 3


def test_per_model_early_stopping_keeps_each_models_best(tmp_path: Path) -> None:
    """Model 1 (lr 5.0) gets worse at once and is dropped; every model's best weights
    (from disk) reproduce its best validation loss."""
    models = _models()
    module = BatchLightningModule(
        ModelBatch(models), F.cross_entropy,
        optimizer=functools.partial(optim.SGD, lr=[0.05, 5.0, 0.02]),
    )
    stopper = PerModelEarlyStopping("val/loss", patience=1, action="drop",
                                    dirpath=str(tmp_path / "best"))
    history: dict[int, list[float]] = {0: [], 1: [], 2: []}

    class Record(pl.Callback):
        def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
            if not trainer.sanity_checking:
                for mid in pl_module.model_batch.model_ids:
                    history[mid].append(float(trainer.callback_metrics[f"val/loss/model_{mid}"]))

    trainer = _trainer(6, default_root_dir=tmp_path, callbacks=[Record(), stopper],
                       num_sanity_val_steps=0)
    trainer.fit(module, _loader(), _loader())
    assert 1 in stopper.stopped and 1 not in module.model_batch.model_ids
    for mid, values in history.items():
        assert stopper.best_values[mid] == pytest.approx(min(values))
        model = stopper.best_model(mid)
        with torch.no_grad():
            loss = sum(float(F.cross_entropy(model(x), y)) * len(y) for x, y in _loader()) / 24
        assert loss == pytest.approx(min(values), rel=1e-9)
        assert (tmp_path / "best" / f"{mid}.safetensors").is_file()


def test_load_from_checkpoint_without_an_optimizer(tmp_path: Path) -> None:
    module = _module(_models())
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt")
    trainer = _trainer(1, default_root_dir=tmp_path, enable_checkpointing=True, callbacks=[ckpt])
    trainer.fit(module, _loader())
    loaded = BatchLightningModule.load_from_checkpoint(
        ckpt.best_model_path, batch=ModelBatch(_models(seed=5)), loss_fn=F.cross_entropy
    )
    x = next(iter(_loader()))[0]
    with torch.no_grad():
        assert torch.equal(loaded(x), module(x))
    preds = _trainer(1, default_root_dir=tmp_path).predict(
        loaded, DataLoader(TensorDataset(x), batch_size=len(x))
    )
    assert torch.equal(preds[0], module(x).detach())


def test_per_model_early_stopping_state_survives_a_checkpoint_resume(tmp_path: Path) -> None:
    """Patience counters and best values are part of the Lightning checkpoint: a fit resumed
    after 2 epochs stops every model at the same validation as an uninterrupted fit."""

    def run(max_epochs: int, ckpt: Path | None = None) -> tuple[Any, Any]:
        # "max" on a falling loss: each model improves once, then counts to its patience.
        stopper = PerModelEarlyStopping("val/loss", mode="max", patience=3)
        trainer = _trainer(max_epochs, default_root_dir=tmp_path, callbacks=[stopper],
                           num_sanity_val_steps=0)
        trainer.fit(_module(_models()), _loader(), _loader(), ckpt_path=ckpt)
        return trainer, stopper

    whole, whole_stopper = run(8)
    assert whole.current_epoch == 4 and sorted(whole_stopper.stopped) == [0, 1, 2]
    first, _ = run(2)
    ckpt = tmp_path / "two.ckpt"
    first.save_checkpoint(ckpt)
    resumed, stopper = run(8, ckpt)
    assert resumed.current_epoch == 4
    assert stopper.stopped == whole_stopper.stopped
    assert stopper.best_values == pytest.approx(whole_stopper.best_values)
