"""Optuna studies whose trials train N at a time, as one ModelBatch.

Each round asks the study for N trials (``study.ask()`` x N: Optuna's batched ask-and-tell
interface), builds one model per trial, and trains them together. After every epoch each
trial reports its objective (``trial.report``); trials the study's pruner prunes are told
``PRUNED`` and dropped from the batch, so the rest of the round runs on fewer models.
Trials whose loss turns non-finite are told ``FAIL`` without disturbing the others; the
survivors are told their final objective. Needs ``modelbatch[optuna]``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from modelbatch.integrations import require
from modelbatch.integrations.sweeping import (
    ConfigResult,
    EvalFn,
    LossFn,
    ModelId,
    group_by_structure,
    train_bundle,
)

if TYPE_CHECKING:
    import optuna

__all__ = ["create_sqlite_study", "optimize_batched"]


def create_sqlite_study(
    path: str | os.PathLike[str],
    *,
    study_name: str = "modelbatch",
    direction: str = "minimize",
    sampler: optuna.samplers.BaseSampler | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
) -> optuna.Study:
    """Create, or resume, a study stored in the SQLite file ``path``.

    SQLite is Optuna's embedded storage: no server, and running the same script again
    continues the same study (``load_if_exists=True``), adding trials to those already
    stored.
    """
    optuna = require("optuna", "optuna")
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.create_study(
        storage=f"sqlite:///{path}",
        study_name=study_name,
        direction=direction,
        sampler=sampler,
        pruner=pruner,
        load_if_exists=True,
    )


def optimize_batched(
    study: optuna.Study,
    make_model: Callable[[optuna.Trial], nn.Module],
    *,
    n_trials: int,
    models_per_batch: int,
    train_loader: Iterable[Any],
    loss_fn: LossFn,
    epochs: int,
    make_hparams: Callable[[optuna.Trial], Mapping[str, Any]] | None = None,
    val_loader: Iterable[Any] | None = None,
    metric: str = "loss",
    eval_fn: EvalFn | None = None,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.Adam,
    device: torch.device | str | None = None,
    logger: Any | None = None,
) -> list[optuna.trial.FrozenTrial]:
    """Run ``n_trials`` trials of ``study``, ``models_per_batch`` at a time as one ModelBatch.

    Args:
        study: a single-objective study (its direction must match ``metric``: minimise a
            loss, maximise an accuracy). See :func:`create_sqlite_study`.
        make_model: ``make_model(trial) -> nn.Module``; may sample architecture settings.
            Trials whose models differ in structure are trained in separate batches.
        n_trials: number of trials to run.
        models_per_batch: trials asked and trained together per round (N).
        train_loader: yields ``(x [B, ...], y [B, ...])`` shared by all models.
        loss_fn: single-model loss, e.g. ``torch.nn.functional.cross_entropy``.
        epochs: epochs per trial; the objective is reported after each (step = epoch).
        make_hparams: ``make_hparams(trial) -> {"lr": ..., "weight_decay": ...}``, the
            trial's optimizer hyper-parameters (default: the optimizer's defaults).
        val_loader: data for the objective (default: ``train_loader``).
        metric: ``"loss"`` or ``"accuracy"`` from :func:`modelbatch.evaluate`.
        eval_fn: custom objective ``eval_fn(batch) -> [N]`` instead of ``metric``.
        optimizer_cls: a ``torch.optim`` or ``modelbatch.optim`` class.
        device: where to train.
        logger: optional BatchLogger receiving per-model metrics (model id = trial number).

    Returns:
        The finished trials (frozen), in the order they were asked.
    """
    optuna = require("optuna", "optuna")
    if len(study.directions) != 1:
        raise ValueError("optimize_batched supports single-objective studies only")
    if n_trials < 1 or models_per_batch < 1:
        raise ValueError(
            f"n_trials and models_per_batch must be at least 1, got {n_trials} and "
            f"{models_per_batch}"
        )
    if eval_fn is None:
        expected = {"loss": "minimize", "accuracy": "maximize"}.get(metric)
        if expected is not None and study.direction.name.lower() != expected:
            raise ValueError(
                f"the study's direction is {study.direction.name.lower()!r}, but metric "
                f"{metric!r} needs direction={expected!r}"
            )
    TrialState = optuna.trial.TrialState
    numbers: list[int] = []
    remaining = n_trials
    while remaining > 0:
        trials = [study.ask() for _ in range(min(models_per_batch, remaining))]
        remaining -= len(trials)
        numbers.extend(t.number for t in trials)
        finished: set[int] = set()
        try:
            models = [make_model(t) for t in trials]
            hparams = [dict(make_hparams(t)) if make_hparams else {} for t in trials]
            for group in group_by_structure(models):
                _run_group(
                    study,
                    [trials[i] for i in group],
                    [models[i] for i in group],
                    [hparams[i] for i in group],
                    finished,
                    train_loader=train_loader,
                    loss_fn=loss_fn,
                    epochs=epochs,
                    val_loader=val_loader,
                    metric=metric,
                    eval_fn=eval_fn,
                    optimizer_cls=optimizer_cls,
                    device=device,
                    logger=logger,
                )
        except BaseException:
            for t in trials:
                if t.number not in finished:
                    study.tell(t, state=TrialState.FAIL, skip_if_finished=True)
            raise
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    return [by_number[n] for n in numbers]


def _run_group(
    study: optuna.Study,
    trials: list[optuna.Trial],
    models: list[nn.Module],
    hparams: list[dict[str, Any]],
    finished: set[int],
    **train_kwargs: Any,
) -> None:
    TrialState = require("optuna", "optuna").trial.TrialState
    by_id: dict[ModelId, optuna.Trial] = {t.number: t for t in trials}

    pruned: list[ModelId] = []

    def should_stop(epoch: int, values: dict[ModelId, float]) -> list[ModelId]:
        pruned.clear()
        for mid, value in values.items():
            trial = by_id[mid]
            trial.report(value, epoch)
            if trial.should_prune():
                pruned.append(mid)
        return list(pruned)

    def tell_pruned(epoch: int, results: dict[ModelId, ConfigResult]) -> None:
        # After the epoch's results are in, so that pruned trials keep their train_loss too.
        for mid in pruned:
            trial = by_id[mid]
            trial.set_user_attr("train_loss", results[mid].train_loss)
            study.tell(trial, state=TrialState.PRUNED)
            finished.add(trial.number)
        pruned.clear()

    results: dict[ModelId, ConfigResult] = train_bundle(
        models,
        hparams,
        model_ids=list(by_id),
        configs=[dict(t.params) for t in trials],
        should_stop=should_stop,
        on_epoch_end=tell_pruned,
        **train_kwargs,
    )
    for mid, res in results.items():
        trial = by_id[mid]
        if res.status == "stopped":
            continue  # told PRUNED when the pruner stopped it
        trial.set_user_attr("train_loss", res.train_loss)
        if res.status == "completed":
            study.tell(trial, res.value)
        elif res.status == "diverged":
            study.tell(trial, state=TrialState.FAIL)
        finished.add(trial.number)
