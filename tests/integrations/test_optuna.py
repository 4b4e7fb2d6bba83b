"""Optuna: batched ask/tell studies trained as ModelBatches, with the real Optuna library."""

from __future__ import annotations

import math
import runpy
import sys
from pathlib import Path

import optuna
import pytest
import torch
import torch.nn.functional as F
from optuna.trial import TrialState

import modelbatch
from modelbatch.integrations.optuna import create_sqlite_study, optimize_batched
from modelbatch.integrations.sweeping import sweep
from tests.integrations._toy import make_loader, make_mlp64

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
LOADER = make_loader(dtype=torch.float64)
EPOCHS = 3


@pytest.fixture(autouse=True)
def _quiet_optuna():
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    yield
    optuna.logging.set_verbosity(verbosity)


def model_of(trial: optuna.Trial) -> torch.nn.Module:
    return make_mlp64({"seed": trial.number})


def lr_of(trial: optuna.Trial) -> dict[str, float]:
    return {"lr": trial.suggest_float("lr", 1e-3, 1.0, log=True)}


class PruneSmallLr(optuna.pruners.BasePruner):
    """Prunes every trial with lr < 0.05 once it has reported a value (deterministic)."""

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return trial.last_step is not None and trial.params["lr"] < 0.05


class RecordingLogger:
    """A BatchLogger that records (trial number, epoch) in the order they were logged."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, int]] = []

    def log(self, metrics, step):
        self.rows.extend((row["model_id"], step) for row in metrics)

    def close(self):
        pass


def _run(study, n_trials=6, models_per_batch=3, **kwargs):
    kwargs.setdefault("make_hparams", lr_of)
    return optimize_batched(
        study,
        kwargs.pop("make_model", model_of),
        n_trials=n_trials,
        models_per_batch=models_per_batch,
        train_loader=LOADER,
        loss_fn=F.cross_entropy,
        epochs=EPOCHS,
        optimizer_cls=torch.optim.SGD,
        **kwargs,
    )


def test_pruned_trials_are_dropped_and_survivors_match_training_alone():
    sampler = optuna.samplers.RandomSampler(seed=3)
    study = optuna.create_study(sampler=sampler, pruner=PruneSmallLr())
    logger = RecordingLogger()
    trials = _run(study, logger=logger)
    assert [t.number for t in trials] == list(range(6))
    pruned = [t for t in trials if t.params["lr"] < 0.05]
    assert pruned, "the seed should sample some small learning rates"
    assert len(pruned) < len(trials)
    for t in trials:
        if t.params["lr"] < 0.05:
            assert t.state == TrialState.PRUNED
            assert list(t.intermediate_values) == [0]
            assert len(t.user_attrs["train_loss"]) == 1  # pruned trials keep theirs too
        else:
            assert t.state == TrialState.COMPLETE
            assert list(t.intermediate_values) == list(range(EPOCHS))
            assert t.value == t.intermediate_values[EPOCHS - 1]
            assert len(t.user_attrs["train_loss"]) == EPOCHS
    # A pruned trial's slot is refilled at once: trial 3 starts (is asked) right after
    # the first trial that ended, not after the whole first three.
    first_end = min(t.datetime_complete for t in trials[:3])
    assert trials[3].datetime_start >= first_end
    assert trials[3].datetime_start < max(t.datetime_complete for t in trials[:3])
    assert all(t.user_attrs["train_seconds"] > 0 for t in trials)
    assert sorted(logger.rows) == sorted(
        (t.number, e) for t in trials for e in range(len(t.user_attrs["train_loss"]))
    )
    # The survivors' objectives equal the same configs trained without the pruned ones.
    survivors = [t for t in trials if t.state == TrialState.COMPLETE]
    direct = sweep(
        [{"seed": t.number, "lr": t.params["lr"]} for t in survivors],
        make_mlp64,
        train_loader=LOADER,
        loss_fn=F.cross_entropy,
        epochs=EPOCHS,
        optimizer_cls=torch.optim.SGD,
    )
    for k, t in enumerate(survivors):
        assert t.value == pytest.approx(direct[k].value, rel=1e-10)


def test_sqlite_study_resumes_and_median_pruner_finishes_every_trial(tmp_path):
    path = tmp_path / "studies" / "mb.db"

    def study():
        return create_sqlite_study(
            path,
            study_name="resume",
            sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=2),
            pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0),
        )

    first = _run(study(), n_trials=4, models_per_batch=2)
    second = _run(study(), n_trials=4, models_per_batch=4)
    assert [t.number for t in first + second] == list(range(8))
    stored = study().get_trials()
    assert len(stored) == 8
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in stored)
    assert all(t.state == TrialState.COMPLETE for t in stored[:2])  # nothing to compare to yet
    for t in stored:
        n_values = len(t.intermediate_values)
        assert n_values == EPOCHS if t.state == TrialState.COMPLETE else 1 <= n_values < EPOCHS


def test_diverged_trial_fails_alone():
    def hparams(trial):
        lr = trial.suggest_float("lr", 0.05, 0.2)
        return {"lr": math.inf if trial.number == 1 else lr}

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trials = _run(study, n_trials=3, make_hparams=hparams)
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    direct = sweep(
        [{"seed": t.number, "lr": t.params["lr"]} for t in (trials[0], trials[2])],
        make_mlp64,
        train_loader=LOADER,
        loss_fn=F.cross_entropy,
        epochs=EPOCHS,
        optimizer_cls=torch.optim.SGD,
    )
    assert [trials[0].value, trials[2].value] == pytest.approx(
        [direct[0].value, direct[1].value], rel=1e-10
    )


def test_trials_with_different_architectures_train_in_separate_batches():
    def model(trial):
        return make_mlp64({"seed": trial.number, "hidden": trial.suggest_categorical("h", [4, 8])})

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=1))
    trials = _run(study, n_trials=5, models_per_batch=5, make_model=model, metric="accuracy")
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert all(0.0 <= t.value <= 1.0 for t in trials)
    hidden = {t.number: t.params["h"] for t in trials}
    assert len(set(hidden.values())) == 2
    assert all(len(t.user_attrs["train_loss"]) == EPOCHS for t in trials)


def test_errors_fail_the_open_trials_and_are_raised():
    def broken(trial):
        if trial.number == 1:
            raise RuntimeError("cannot build this one")
        return model_of(trial)

    study = optuna.create_study()
    with pytest.raises(RuntimeError, match="cannot build"):
        _run(study, n_trials=2, make_model=broken)
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.FAIL]
    with pytest.raises(ValueError, match="needs direction='maximize'"):
        _run(optuna.create_study(), metric="accuracy")
    with pytest.raises(ValueError, match="single-objective"):
        _run(optuna.create_study(directions=["minimize", "minimize"]))


def test_missing_optuna_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(ImportError, match=r"modelbatch\[optuna\]"):
        create_sqlite_study(tmp_path / "x.db")


def test_optuna_example_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["optuna_example.py", str(tmp_path / "ex.db")])
    runpy.run_path(str(EXAMPLES / "optuna_example.py"), run_name="__main__")
    study = optuna.load_study(study_name="modelbatch-example", storage=f"sqlite:///{tmp_path}/ex.db")
    assert len(study.trials) >= 8
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)


def test_study_optimize_semantics_timeout_callbacks_catch_stop_and_progress(capsys):
    seen = []

    def callback(study, frozen):
        seen.append((frozen.number, frozen.state))
        if frozen.number == 4:
            study.stop()

    def flaky(trial):
        if trial.number == 1:
            raise KeyError("bad architecture")
        return model_of(trial)

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trials = _run(study, n_trials=20, models_per_batch=2, make_model=flaky,
                  callbacks=[callback], catch=(KeyError,), show_progress_bar=True)
    assert trials[1].state == TrialState.FAIL
    assert "bad architecture" in trials[1].user_attrs["error"]
    assert sorted(n for n, _ in seen) == [t.number for t in trials]
    assert len(trials) < 20  # study.stop() in the callback stopped asking
    assert all(t.state == TrialState.COMPLETE for t in trials if t.number != 1)
    assert "trials" in capsys.readouterr().err  # the tqdm bar
    # timeout: no new trial is asked after it; those in flight finish.
    assert _run(optuna.create_study(), n_trials=None, timeout=0.0, models_per_batch=2) == []
    with pytest.raises(ValueError, match="n_trials or timeout"):
        _run(optuna.create_study(), n_trials=None)
    # An exception not in catch fails the open trials and is raised.
    study3 = optuna.create_study()
    with pytest.raises(KeyError):
        _run(study3, n_trials=3, make_model=flaky)
    assert [t.state for t in study3.trials] == [TrialState.FAIL, TrialState.FAIL]


def test_trials_record_their_checkpoint_and_return_models(tmp_path):
    import modelbatch

    study = create_sqlite_study(tmp_path / "s.db", pruner=PruneSmallLr(),
                                sampler=optuna.samplers.RandomSampler(seed=3))
    trials, models = _run(study, n_trials=4, models_per_batch=2, save_dir=tmp_path / "models",
                          return_models=True)
    stored = {t.number: t for t in create_sqlite_study(tmp_path / "s.db").get_trials()}
    assert any(t.state == TrialState.PRUNED for t in trials)
    for t in trials:
        path = stored[t.number].user_attrs["checkpoint"]
        loaded = modelbatch.load_model(path, t.number, make_mlp64({}))
        for a, b in zip(loaded.state_dict().values(), models[t.number].state_dict().values(),
                        strict=True):
            assert torch.equal(a, b)
    # Every trial, pruned ones included, trained exactly as alone for the epochs it ran.
    for t in trials:
        n_epochs = len(t.user_attrs["train_loss"])
        direct = sweep([{"seed": t.number, "lr": t.params["lr"]}], make_mlp64,
                       train_loader=LOADER, loss_fn=F.cross_entropy, epochs=n_epochs,
                       optimizer_cls=torch.optim.SGD, keep_models=True, progress=False)
        for a, b in zip(models[t.number].state_dict().values(),
                        direct[0].model.state_dict().values(), strict=True):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


class _PoisonFirstEpoch(modelbatch.Callback):
    """Slot 0's weights turn NaN at the end of the first epoch (after its loss)."""

    def on_epoch_end(self, pack):
        if pack.epoch == 0:
            with torch.no_grad():
                for _, p in pack.batch.stacked_parameters():
                    p[0] = float("nan")


def test_a_trial_whose_weights_went_nan_fails_even_with_a_finite_accuracy():
    """Accuracy of NaN outputs is finite (argmax picks a class): the trial still fails at
    once instead of reporting that accuracy or completing with NaN weights."""
    study = optuna.create_study(direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    trials = _run(study, n_trials=2, models_per_batch=2, metric="accuracy",
                  train_callbacks=lambda: [_PoisonFirstEpoch()])
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert trials[0].intermediate_values == {}


def test_callbacks_that_act_on_validation_are_refused_before_any_trial():
    """EarlyStopping in train_callbacks would never see a validation metric (the objective
    goes to the study's pruner): refused up front, naming it and the way out."""
    study = optuna.create_study()
    with pytest.raises(ValueError, match=r"EarlyStopping acts on validation.*pruner"):
        _run(study, n_trials=2,
             train_callbacks=lambda: [modelbatch.EarlyStopping("loss", patience=1)])
    assert study.trials == []
    trials = _run(study, n_trials=1, train_callbacks=lambda: [modelbatch.NaNGuard()])
    assert trials[0].state == TrialState.COMPLETE
