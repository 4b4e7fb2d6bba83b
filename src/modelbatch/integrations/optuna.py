"""Optuna studies whose trials train N at a time, as one ModelBatch that stays full.

:func:`optimize_batched` follows :meth:`optuna.Study.optimize` (``n_trials``, ``timeout``,
``callbacks``, ``catch``, ``show_progress_bar``) with Optuna's ask-and-tell interface: a
trial is asked when a slot of the batch is free, trains there, reports its objective after
every epoch (``trial.report``), and is told its outcome as soon as it ends: completed,
``PRUNED`` by the study's pruner (that model alone), or ``FAIL`` (non-finite loss, without
disturbing the others). Its slot then takes the next trial, fresh (own initialisation,
optimizer state, step count, LR schedule), so each trial's duration is its own and the batch
keeps N models in flight. Needs ``modelbatch[optuna]``.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from modelbatch._structure import model_settings, structure_key
from modelbatch.core import ModelBatch
from modelbatch.integrations import require
from modelbatch.integrations.sweeping import (
    EvalFn,
    LossFn,
    _call_scheduler_fn,
    _finite_weights,
    _per_model_hparams,
    _save_model,
    _SlotSchedulers,
    release_slots,
    reset_slot,
    train_and_score,
)
from modelbatch.optim.factory import OptimizerFactory

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


@dataclass
class _Running:
    trial: Any
    model: nn.Module
    hparams: dict[str, Any]
    train_loss: list[float] = field(default_factory=list)
    started: float = 0.0


def optimize_batched(
    study: optuna.Study,
    make_model: Callable[[optuna.Trial], nn.Module],
    *,
    models_per_batch: int,
    train_loader: Iterable[Any],
    loss_fn: LossFn,
    epochs: int,
    n_trials: int | None = None,
    timeout: float | None = None,
    callbacks: Iterable[Callable[[optuna.Study, optuna.trial.FrozenTrial], None]] | None = None,
    catch: Iterable[type[Exception]] | type[Exception] = (),
    show_progress_bar: bool = False,
    make_hparams: Callable[[optuna.Trial], Mapping[str, Any]] | None = None,
    val_loader: Iterable[Any] | None = None,
    metric: str = "loss",
    eval_fn: EvalFn | None = None,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.Adam,
    scheduler_fn: Callable[..., Any] | None = None,
    train_callbacks: Callable[[], list[Any]] | None = None,
    grad_clip: float | None = None,
    device: torch.device | str | None = None,
    logger: Any | None = None,
    save_dir: str | os.PathLike[str] | None = None,
    return_models: bool = False,
) -> Any:
    """Optimise ``study`` with ``models_per_batch`` trials in flight as one ModelBatch.

    Args:
        study: a single-objective study (its direction must match ``metric``: minimise a
            loss, maximise an accuracy). See :func:`create_sqlite_study`.
        make_model: ``make_model(trial) -> nn.Module``; may sample architecture settings.
            A trial whose model has another structure than the batch in flight waits until
            that batch is done, then starts a batch of its own structure.
        models_per_batch: N, the trials in flight.
        train_loader: yields ``(x [B, ...], y [B, ...])`` shared by all models.
        loss_fn: single-model loss, e.g. ``torch.nn.functional.cross_entropy``.
        epochs: epochs per trial; the objective is reported after each (step = epoch).
        n_trials: the most trials to ask (as :meth:`optuna.Study.optimize`).
        timeout: stop asking new trials after this many seconds; trials in flight finish.
        callbacks: ``callback(study, frozen_trial)`` after each trial ends (any state);
            ``study.stop()`` inside one stops asking new trials.
        catch: exception types that fail only the trial whose ``make_model`` /
            ``make_hparams`` / optimizer raised them; other exceptions fail every open
            trial and are raised.
        show_progress_bar: a tqdm bar over the trials (or the timeout).
        make_hparams: ``make_hparams(trial) -> {"lr": ..., "weight_decay": ...}``, the
            trial's optimizer hyper-parameters (default: the optimizer's defaults).
        val_loader: data for the objective (default: ``train_loader``).
        metric: ``"loss"`` or ``"accuracy"`` from :func:`modelbatch.evaluate`.
        eval_fn: custom objective ``eval_fn(batch) -> [N]`` instead of ``metric``.
        optimizer_cls: a ``torch.optim`` or ``modelbatch.optim`` class.
        scheduler_fn: ``scheduler_fn(optimizer[, trial]) -> LR scheduler``, one per trial,
            stepped after every optimizer step, from the trial's own step 0.
        train_callbacks: ``train_callbacks() -> [modelbatch.Callback, ...]`` for each batch.
        grad_clip: clip each model's gradient to this total norm.
        device: where to train.
        logger: receives ``log([{"model_id": trial number, "train_loss", metric, "lr"}],
            epoch)`` per trial and epoch.
        save_dir: save each finished trial's model under ``save_dir/trial_<number>`` (a
            checkpoint :func:`modelbatch.load_model` reads, model id = the trial number)
            and record that path in the trial's user attribute ``"checkpoint"``.
        return_models: also return ``{trial number: trained model}``.

    Every trial gets the user attributes ``train_loss`` (per epoch) and ``train_seconds``
    (the time it was in flight).

    Returns:
        The trials this call ran (frozen), in the order they were asked; with
        ``return_models``, ``(trials, {number: nn.Module})``.
    """
    optuna = require("optuna", "optuna")
    if len(study.directions) != 1:
        raise ValueError("optimize_batched supports single-objective studies only")
    if models_per_batch < 1 or epochs < 1:
        raise ValueError(
            f"models_per_batch and epochs must be at least 1, got {models_per_batch} and {epochs}"
        )
    if n_trials is None and timeout is None:
        raise ValueError("give n_trials or timeout (or both)")
    if n_trials is not None and n_trials < 1:
        raise ValueError(f"n_trials must be at least 1, got {n_trials}")
    if eval_fn is None:
        expected = {"loss": "minimize", "accuracy": "maximize"}.get(metric)
        if expected is None:
            raise ValueError(
                f"metric must be 'loss' or 'accuracy' (or pass eval_fn), got {metric!r}"
            )
        if study.direction.name.lower() != expected:
            raise ValueError(
                f"the study's direction is {study.direction.name.lower()!r}, but metric "
                f"{metric!r} needs direction={expected!r}"
            )
    if train_callbacks is not None:
        _check_train_callbacks(train_callbacks())
    run = _OptunaRun(
        study, optuna, make_model, make_hparams, models_per_batch, epochs, n_trials, timeout,
        list(callbacks or []), tuple(catch) if isinstance(catch, Iterable) else (catch,),
        dict(train_loader=train_loader, loss_fn=loss_fn, val_loader=val_loader, metric=metric,
             eval_fn=eval_fn, optimizer_cls=optimizer_cls, scheduler_fn=scheduler_fn,
             train_callbacks=train_callbacks, grad_clip=grad_clip, device=device,
             logger=logger, return_models=return_models),
        Path(save_dir) if save_dir is not None else None,
    )
    thread_local = getattr(study, "_thread_local", None)
    in_loop = getattr(thread_local, "in_optimize_loop", False)
    if thread_local is not None:  # so that study.stop() works inside a callback
        thread_local.in_optimize_loop = True
        study._stop_flag = False
    bar = None
    if show_progress_bar:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_trials, desc="trials", file=sys.stderr)
    run.bar = bar
    try:
        run.loop()
    except BaseException:
        run.fail_open()
        raise
    finally:
        if thread_local is not None:
            thread_local.in_optimize_loop = in_loop
            study._stop_flag = False
        if bar is not None:
            bar.close()
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    trials = [by_number[n] for n in run.numbers]
    return (trials, run.models) if return_models else trials


class _OptunaRun:
    """The trial loop of :func:`optimize_batched`: one batch at a time, refilled from
    trials asked on demand."""

    def __init__(self, study: Any, optuna: Any, make_model: Any, make_hparams: Any, n: int,
                 epochs: int, n_trials: int | None, timeout: float | None,
                 callbacks: list[Any], catch: tuple[type[Exception], ...],
                 o: dict[str, Any], save_dir: Path | None) -> None:
        self.study, self.optuna = study, optuna
        self.make_model, self.make_hparams = make_model, make_hparams
        self.n, self.epochs, self.n_trials, self.timeout = n, epochs, n_trials, timeout
        self.callbacks, self.catch, self.o, self.save_dir = callbacks, catch, o, save_dir
        self.numbers: list[int] = []
        self.models: dict[int, nn.Module] = {}
        self.t0 = time.monotonic()
        self.parked: list[tuple[Hashable, _Running]] = []
        self.running: dict[int, _Running] = {}  # slot id -> trial in it
        self.batch: ModelBatch | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheds: _SlotSchedulers | None = None
        self.pack: Any = None
        self.key: Hashable | None = None
        self.next_slot = 0
        self.bar: Any = None
        self.unfinished: dict[int, _Running] = {}  # asked, not yet told

    # -------------------------------------------------------------- trials
    def can_ask(self) -> bool:
        if self.n_trials is not None and len(self.numbers) >= self.n_trials:
            return False
        if self.timeout is not None and time.monotonic() - self.t0 >= self.timeout:
            return False
        return not getattr(self.study, "_stop_flag", False)

    def ask(self) -> tuple[Hashable, _Running] | None:
        """A new trial with its model and hyper-parameters; None when no more may be asked.
        Errors listed in ``catch`` fail that trial only."""
        while self.can_ask():
            trial = self.study.ask()
            self.numbers.append(trial.number)
            run = _Running(trial, nn.Module(), {})
            self.unfinished[trial.number] = run
            try:
                run.model = self.make_model(trial)
                run.hparams = dict(self.make_hparams(trial)) if self.make_hparams else {}
                OptimizerFactory(self.o["optimizer_cls"], **run.hparams).build(
                    ModelBatch([_cpu_copy(run.model)])
                )  # a bad value (lr=-1) fails this trial only
            except self.catch as e:
                self.finish(run, "fail", error=f"{type(e).__name__}: {e}")
                continue
            # Per-model settings (dropout rate, eps, ...) are fixed per slot: a trial only
            # refills a slot of a batch with the same structure and settings.
            return (structure_key(run.model), repr(sorted(model_settings(run.model).items()))), run
        return None

    def fail_open(self) -> None:
        TrialState = self.optuna.trial.TrialState
        for run in list(self.unfinished.values()):
            self.study.tell(run.trial, state=TrialState.FAIL, skip_if_finished=True)

    def finish(self, run: _Running, how: str, value: float = math.nan,
               position: int | None = None, error: str | None = None) -> None:
        TrialState = self.optuna.trial.TrialState
        trial = run.trial
        self.unfinished.pop(trial.number, None)
        trial.set_user_attr("train_loss", run.train_loss)
        trial.set_user_attr("train_seconds", time.monotonic() - run.started if run.started else 0.0)
        if error is not None:
            trial.set_user_attr("error", error)
        if position is not None and self.batch is not None and (
            self.save_dir is not None or self.o["return_models"]
        ):
            model = self.batch.extract(self.batch.model_ids[position])
            if self.o["return_models"]:
                self.models[trial.number] = model
            if self.save_dir is not None:
                path = _save_model(model, self.save_dir / f"trial_{trial.number}", trial.number)
                trial.set_user_attr("checkpoint", path)
        if how == "complete":
            frozen = self.study.tell(trial, value)
        elif how == "pruned":
            frozen = self.study.tell(trial, state=TrialState.PRUNED)
        else:
            frozen = self.study.tell(trial, state=TrialState.FAIL)
        if self.bar is not None:
            self.bar.update(1)
        for cb in self.callbacks:
            cb(self.study, frozen)

    # -------------------------------------------------------------- batches
    def start_batch(self) -> bool:
        chosen: list[_Running] = []
        key = None
        if self.parked:
            key = self.parked[0][0]
            chosen = [r for k, r in self.parked if k == key][: self.n]
            self.parked = [(k, r) for k, r in self.parked if not any(r is c for c in chosen)]
        while len(chosen) < self.n and not self.parked:
            got = self.ask()
            if got is None:
                break
            k, run = got
            if key is None or k == key:
                key = k
                chosen.append(run)
            else:
                self.parked.append((k, run))
        if not chosen:
            return False
        self.key = key
        slots = list(range(self.next_slot, self.next_slot + len(chosen)))
        self.next_slot += len(chosen)
        o = self.o
        self.batch = ModelBatch([r.model for r in chosen], model_ids=slots)
        if o["device"] is not None:
            self.batch.to(o["device"])
        per_model = _per_model_hparams([r.hparams for r in chosen], o["optimizer_cls"], slots)
        self.optimizer = OptimizerFactory(o["optimizer_cls"], **per_model).build(self.batch)
        self.scheds = _SlotSchedulers(self.optimizer, "step")
        from modelbatch.callbacks import CallbackPack, GradClipping

        cbs = list(o["train_callbacks"]() if o["train_callbacks"] is not None else [])
        if o["grad_clip"] is not None:
            cbs.append(GradClipping(o["grad_clip"]))
        self.pack = CallbackPack(self.batch, cbs, optimizer=self.optimizer) if cbs else None
        now = time.monotonic()
        for slot, run in zip(slots, chosen, strict=True):
            run.started = now
            self.running[slot] = run
            self._attach(slot, run)
        return True

    def _attach(self, slot: int, run: _Running) -> None:
        fn = self.o["scheduler_fn"]
        if fn is None or self.scheds is None or self.optimizer is None:
            return
        group = next(g for g in self.optimizer.param_groups if g["model_id"] == slot)
        self.scheds.slots.pop(slot, None)
        self.scheds.attach(slot, lambda opt: _call_scheduler_fn(fn, opt, run.trial), {}, group)

    def loop(self) -> None:
        while True:
            if self.batch is None and not self.start_batch():
                return
            self.round()

    def round(self) -> None:
        o = self.o
        batch, optimizer = self.batch, self.optimizer
        assert batch is not None and optimizer is not None
        losses, values = train_and_score(o, batch, optimizer, self.scheds, self.pack)
        active = batch.active.tolist()
        weights_ok = _finite_weights(batch)  # accuracy of NaN outputs is finite
        free: list[int] = []
        for pos, slot in enumerate(batch.model_ids):
            run = self.running[slot]  # type: ignore[index]
            tl, v = float(losses[pos]), float(values[pos])
            run.train_loss.append(tl)
            epoch = len(run.train_loss) - 1
            if o["logger"] is not None:
                o["logger"].log([{"model_id": run.trial.number, "train_loss": tl,
                                  o["metric"]: v, "lr": optimizer.param_groups[pos].get("lr")}],
                                epoch)
            if not (math.isfinite(tl) and math.isfinite(v) and active[pos] and weights_ok[pos]):
                self.finish(run, "fail", position=pos, error="non-finite loss or objective")
            else:
                run.trial.report(v, epoch)
                if epoch + 1 >= self.epochs:
                    self.finish(run, "complete", v, position=pos)
                elif run.trial.should_prune():
                    self.finish(run, "pruned", position=pos)
                else:
                    continue
            free.append(pos)
        self.refill(free)

    def refill(self, free: list[int]) -> None:
        batch, optimizer = self.batch, self.optimizer
        assert batch is not None and optimizer is not None
        empty: list[int] = []
        for pos in free:
            slot = batch.model_ids[pos]
            del self.running[slot]  # type: ignore[arg-type]
            got = None
            while got is None and not self.parked:
                got = self.ask()
                if got is None:
                    break
                if got[0] != self.key:
                    self.parked.append(got)
                    got = None
            if got is None:
                empty.append(pos)
                continue
            run = got[1]
            reset_slot(batch, optimizer, pos, run.model, run.hparams)
            if self.pack is not None:
                for cb in self.pack.callbacks:
                    cb.on_models_replaced(self.pack, [pos])
            run.started = time.monotonic()
            self.running[slot] = run  # type: ignore[index]
            self._attach(slot, run)  # type: ignore[arg-type]
        if not release_slots(batch, self.pack, self.scheds, empty):
            self.batch = self.optimizer = self.scheds = self.pack = None


def _check_train_callbacks(callbacks: Iterable[Any]) -> None:
    """Refuse callbacks that act on validation: optimize_batched reports each epoch's
    objective to the study (its pruner decides), not to the callbacks, so such a callback
    would silently never act."""
    from modelbatch.callbacks import Callback, LogMetrics

    for cb in callbacks:
        if not isinstance(cb, LogMetrics) and (  # LogMetrics also logs per step
            type(cb).on_validation_end is not Callback.on_validation_end
        ):
            raise ValueError(
                f"train_callbacks: {type(cb).__name__} acts on validation metrics, which "
                "optimize_batched reports to the study, not to callbacks, so it would never "
                "act; stop trials early with the study's pruner (e.g. "
                "optuna.pruners.MedianPruner), or use modelbatch.integrations.sweep(..., "
                "callbacks=...) or patience=, which do run it"
            )


def _cpu_copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)
