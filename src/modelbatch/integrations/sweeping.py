"""Hyper-parameter sweeps as ModelBatches: a list of configs in, a table of results out.

:func:`sweep` is the one-call form (no extra needed): every config trains as its own model,
configs whose models share a structure train together as one
:class:`~modelbatch.ModelBatch`, and a slot freed by a finished, pruned, early-stopped or
diverged model is refilled with the next config at once (each refilled model starts fresh:
own initialisation, optimizer state, step count and LR schedule), so ``models_per_batch``
models stay in flight until the queue is empty. :func:`train_bundle` is the fixed-batch
engine behind the Optuna and Ray Tune integrations. See ``docs/sweeps.md``.
"""

from __future__ import annotations

import copy
import csv
import difflib
import hashlib
import inspect
import math
import os
import random
import sys
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from modelbatch._structure import model_settings, structure_key
from modelbatch.core import ModelBatch
from modelbatch.optim.factory import OptimizerFactory
from modelbatch.train import evaluate, train_one_epoch

__all__ = [
    "ConfigResult",
    "SuccessiveHalving",
    "SweepResults",
    "group_by_structure",
    "optimizer_hparams",
    "reset_slot",
    "structure_signature",
    "sweep",
    "train_bundle",
]

ModelId = int | str
LossFn = Callable[[Tensor, Tensor], Tensor]
EvalFn = Callable[[ModelBatch], Tensor]


@dataclass
class ConfigResult:
    """The outcome of training one config (one model).

    Attributes:
        config: the config (or, for Optuna, the trial's parameters).
        value: the objective after the last epoch the model trained (``nan`` if diverged).
        history: the objective after each epoch trained.
        train_loss: the mean training loss of each epoch trained.
        status: ``"completed"`` (all epochs), ``"stopped"`` (removed early by a pruner),
            ``"pruned"`` / ``"early_stopped"`` (:func:`sweep`), ``"diverged"`` (non-finite
            loss or objective; removed from the batch) or ``"failed"`` (the config could not
            be built or trained; see ``error``).
        model: the trained model (standalone copy), when requested.
        best_value: the best objective over the epochs trained (:func:`sweep`).
        best_epoch: the epoch (0-based) of ``best_value``; -1 before any finite objective.
        checkpoint: where the model's best weights were saved (:func:`sweep` with a folder):
            a checkpoint folder that :func:`modelbatch.load_model` reads.
        error: why a ``"failed"`` config failed.
    """

    config: dict[str, Any]
    value: float = math.nan
    history: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    status: str = "running"
    model: nn.Module | None = None
    best_value: float = math.nan
    best_epoch: int = -1
    checkpoint: str | None = None
    error: str | None = None

    @property
    def epochs(self) -> int:
        """Number of epochs the model trained."""
        return len(self.history)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (without the model)."""
        return {
            "config": self.config,
            "value": self.value,
            "history": list(self.history),
            "train_loss": list(self.train_loss),
            "status": self.status,
            "best_value": self.best_value,
            "best_epoch": self.best_epoch,
            "checkpoint": self.checkpoint,
            "error": self.error,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ConfigResult:
        """Inverse of :meth:`to_dict`."""
        return cls(
            config=dict(data["config"]),
            value=float(data["value"]),
            history=[float(v) for v in data["history"]],
            train_loss=[float(v) for v in data["train_loss"]],
            status=str(data["status"]),
            best_value=float(data.get("best_value", math.nan)),
            best_epoch=int(data.get("best_epoch", -1)),
            checkpoint=data.get("checkpoint"),
            error=data.get("error"),
        )


# ---------------------------------------------------------------------- hyper-parameters
def _accepted_hparams(optimizer_cls: type[torch.optim.Optimizer]) -> dict[str, Any]:
    """Hyper-parameter names of ``optimizer_cls`` with their defaults."""
    params = inspect.signature(optimizer_cls.__init__).parameters
    out: dict[str, Any] = {}
    for i, (name, p) in enumerate(params.items()):
        if i == 0 or name in ("params", "batch"):
            continue
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        out[name] = p.default
    return out


def optimizer_hparams(
    config: Mapping[str, Any], optimizer_cls: type[torch.optim.Optimizer]
) -> dict[str, Any]:
    """The entries of ``config`` that ``optimizer_cls`` takes as keyword arguments.

    ``{"hidden": 32, "lr": 0.01, "weight_decay": 0.0}`` with ``torch.optim.AdamW`` gives
    ``{"lr": 0.01, "weight_decay": 0.0}``.
    """
    accepted = _accepted_hparams(optimizer_cls)
    return {k: v for k, v in config.items() if k in accepted}


def _per_model_hparams(
    hparams: Sequence[Mapping[str, Any]],
    optimizer_cls: type[torch.optim.Optimizer],
    model_ids: Sequence[ModelId],
) -> dict[str, list[Any]]:
    """Turn N per-model dicts into one length-N list per hyper-parameter.

    A hyper-parameter set by some models only takes the optimizer's default for the others.
    """
    accepted = _accepted_hparams(optimizer_cls)
    names: list[str] = []
    for i, hp in enumerate(hparams):
        for k in hp:
            if k not in accepted:
                raise ValueError(
                    f"model {i} (id {model_ids[i]!r}): {optimizer_cls.__name__} has no "
                    f"hyper-parameter {k!r}; it accepts {sorted(accepted)}"
                )
            if k not in names:
                names.append(k)
    out: dict[str, list[Any]] = {}
    for k in names:
        default = accepted[k]
        values = []
        for i, hp in enumerate(hparams):
            if k in hp:
                values.append(hp[k])
            elif default is inspect.Parameter.empty:
                raise ValueError(
                    f"model {i} (id {model_ids[i]!r}) sets no {k!r}, which "
                    f"{optimizer_cls.__name__} requires"
                )
            else:
                values.append(default)
        out[k] = values
    return out


# ---------------------------------------------------------------------- structure
def structure_signature(model: nn.Module) -> Hashable:
    """A hashable description of a model's full signature
    (:func:`modelbatch._structure.structure_key`): two models share a ModelBatch only when
    their signatures are equal (module tree with each submodule's ``extra_repr``, parameter
    and buffer names, shapes, dtypes, devices, ``requires_grad``)."""
    return structure_key(model)


def group_by_structure(
    models: Sequence[nn.Module], max_size: int | None = None
) -> list[list[int]]:
    """Indices of ``models`` grouped by structure (first-seen order), each group cut into
    chunks of at most ``max_size``."""
    groups: dict[Hashable, list[int]] = {}
    for i, m in enumerate(models):
        groups.setdefault(structure_signature(m), []).append(i)
    out: list[list[int]] = []
    for idx in groups.values():
        size = max_size or len(idx)
        out.extend(idx[k : k + size] for k in range(0, len(idx), size))
    return out


# ---------------------------------------------------------------------- training
def _objective(
    batch: ModelBatch,
    train_loader: Iterable[Any],
    val_loader: Iterable[Any] | None,
    loss_fn: LossFn,
    metric: str,
    eval_fn: EvalFn | None,
) -> Tensor:
    if eval_fn is not None:
        values = torch.as_tensor(eval_fn(batch)).detach().double().cpu()
        if values.shape != (len(batch),):
            raise ValueError(
                f"eval_fn must return one value per model, shape [{len(batch)}], "
                f"got {tuple(values.shape)}"
            )
        return values
    if metric not in ("loss", "accuracy"):
        raise ValueError(f"metric must be 'loss' or 'accuracy' (or pass eval_fn), got {metric!r}")
    loader = val_loader if val_loader is not None else train_loader
    return evaluate(batch, loader, loss_fn)[metric]


def train_bundle(
    models: Sequence[nn.Module],
    hparams: Sequence[Mapping[str, Any]],
    *,
    train_loader: Iterable[Any],
    loss_fn: LossFn,
    epochs: int,
    model_ids: Sequence[ModelId] | None = None,
    configs: Sequence[Mapping[str, Any]] | None = None,
    val_loader: Iterable[Any] | None = None,
    metric: str = "loss",
    eval_fn: EvalFn | None = None,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.Adam,
    device: torch.device | str | None = None,
    should_stop: Callable[[int, dict[ModelId, float]], Iterable[ModelId]] | None = None,
    on_epoch_end: Callable[[int, dict[ModelId, ConfigResult]], None] | None = None,
    logger: Any | None = None,
    keep_models: bool = False,
) -> dict[ModelId, ConfigResult]:
    """Train N structurally identical models as one ModelBatch, with per-model stopping.

    Every epoch: one pass of :func:`modelbatch.train_one_epoch` over ``train_loader``, then
    the objective of every model (``metric`` from :func:`modelbatch.evaluate` on
    ``val_loader``, or on ``train_loader`` without one; or ``eval_fn(batch) -> [N]``).
    Models with a non-finite training loss or objective are marked ``"diverged"``, models
    named by ``should_stop`` are marked ``"stopped"``; both are dropped from the batch so
    the later epochs cost less.

    Args:
        models: the N models.
        hparams: per-model optimizer hyper-parameters (``{"lr": ..., ...}``), N dicts.
        train_loader: yields ``(x [B, ...], y [B, ...])`` batches shared by all models.
        loss_fn: single-model loss, e.g. ``torch.nn.functional.cross_entropy``.
        epochs: number of epochs.
        model_ids: ids of the models (default ``0..N-1``); results are keyed by them.
        configs: per-model configs stored in the results (default: ``hparams``).
        val_loader: data for the objective (default: ``train_loader``).
        metric: ``"loss"`` or ``"accuracy"`` (the name of the objective when ``eval_fn`` is
            given).
        eval_fn: custom objective, ``eval_fn(batch) -> [N]`` tensor.
        optimizer_cls: a ``torch.optim`` or ``modelbatch.optim`` class
            (see :class:`~modelbatch.OptimizerFactory`).
        device: where to train (default: where the models are).
        should_stop: ``should_stop(epoch, {id: objective})`` returns ids to stop now, e.g.
            the trials an Optuna pruner prunes. Only finite objectives are passed.
        on_epoch_end: ``on_epoch_end(epoch, results)`` after each epoch, once statuses are
            updated (results of all models, including those stopped earlier).
        logger: a :class:`~modelbatch.integrations.logging.BatchLogger`; receives
            ``batch.metrics()`` (with ``train_loss`` and the objective) after each epoch.
        keep_models: store a standalone copy of each trained model in its result
            (taken when it leaves the batch or at the end).

    Returns:
        ``{model_id: ConfigResult}``, in the order of ``models``.
    """
    n = len(models)
    if len(hparams) != n:
        raise ValueError(f"got {len(hparams)} hyper-parameter dicts for {n} models")
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    ids = list(model_ids) if model_ids is not None else list(range(n))
    cfgs = list(configs) if configs is not None else [dict(h) for h in hparams]
    if len(cfgs) != n or len(ids) != n:
        raise ValueError(f"got {len(cfgs)} configs and {len(ids)} model ids for {n} models")
    results = {mid: ConfigResult(config=dict(c)) for mid, c in zip(ids, cfgs, strict=True)}

    batch = ModelBatch(models, model_ids=ids)
    if device is not None:
        batch.to(device)
    per_model = _per_model_hparams(hparams, optimizer_cls, ids)
    optimizer = OptimizerFactory(optimizer_cls, **per_model).build(batch)
    name = metric if eval_fn is not None else ("val_" if val_loader is not None else "") + metric

    for epoch in range(epochs):
        train_losses = train_one_epoch(batch, train_loader, optimizer, loss_fn)
        values = _objective(batch, train_loader, val_loader, loss_fn, metric, eval_fn)
        batch.log_metric("train_loss", train_losses)
        batch.log_metric(name, values)
        if logger is not None:
            logger.log(batch.metrics(), epoch)

        current = batch.model_ids
        objective: dict[ModelId, float] = {}
        diverged: list[ModelId] = []
        weights_ok = _finite_weights(batch)
        for i, mid in enumerate(current):
            tl, v = float(train_losses[i]), float(values[i])
            if not weights_ok[i]:  # e.g. accuracy of NaN outputs is finite: not a value
                v = math.nan
            res = results[mid]
            res.train_loss.append(tl)
            res.history.append(v)
            res.value = v
            if math.isfinite(tl) and math.isfinite(v):
                objective[mid] = v
            else:
                diverged.append(mid)
        stopped = [] if should_stop is None else list(should_stop(epoch, objective))
        for mid in stopped:
            if mid not in objective:
                raise ValueError(f"should_stop returned {mid!r}, which is not a running model id")
        last_epoch = epoch == epochs - 1
        leaving = set(diverged) | set(stopped)
        for mid in current:
            if mid in diverged:
                results[mid].status = "diverged"
            elif mid in stopped:
                results[mid].status = "stopped"
            elif last_epoch:
                results[mid].status = "completed"
            if keep_models and (mid in leaving or last_epoch):
                results[mid].model = batch.extract(mid)
        if on_epoch_end is not None:
            on_epoch_end(epoch, results)
        if last_epoch or len(leaving) == len(current):
            break
        if leaving:
            batch.drop([mid for mid in current if mid in leaving])
    return results




# ====================================================================== the one-call sweep
class _ReadTracker(dict[str, Any]):
    """A copy of a config (a real ``dict``: ``isinstance``, ``.copy()``, ``|`` work) that
    records which keys were read (``[]``, ``get``, ``in``, ``pop``, ``setdefault``,
    ``dict(...)``, ``**``, also through its copies): keys nothing reads are reported as
    unknown. Edits stay in the copy."""

    def __init__(self, data: Mapping[str, Any], read: set[str]) -> None:
        super().__init__(data)
        self._read = read

    def __getitem__(self, k: str) -> Any:
        self._read.add(k)
        return super().__getitem__(k)

    def __contains__(self, k: object) -> bool:
        if isinstance(k, str):
            self._read.add(k)
        return super().__contains__(k)

    def get(self, k: str, default: Any = None) -> Any:  # type: ignore[override]
        self._read.add(k)
        return super().get(k, default)

    def pop(self, k: str, *default: Any) -> Any:  # type: ignore[override]
        self._read.add(k)
        return super().pop(k, *default)

    def setdefault(self, k: str, default: Any = None) -> Any:
        self._read.add(k)
        return super().setdefault(k, default)

    def __iter__(self) -> Any:  # overriding it makes dict(...) and ** go through [] above
        return super().__iter__()

    def items(self) -> Any:  # reading every value reads every key
        self._read.update(dict.keys(self))
        return super().items()

    def values(self) -> Any:
        self._read.update(dict.keys(self))
        return super().values()

    def _raw(self) -> dict[str, Any]:
        return dict(dict.items(self))

    def copy(self) -> _ReadTracker:  # type: ignore[override]
        return _ReadTracker(self._raw(), self._read)

    def __or__(self, other: Any) -> _ReadTracker:  # type: ignore[override]
        out = self.copy()
        dict.update(out, other)
        return out

    def __ror__(self, other: Any) -> _ReadTracker:  # type: ignore[override]
        out = _ReadTracker(dict(other), self._read)
        dict.update(out, self._raw())
        return out


def _check_config_keys(
    index: int,
    config: Mapping[str, Any],
    read: set[str],
    accepted: Iterable[str],
    optimizer_cls: type,
    allowed: Iterable[str],
) -> None:
    """Raise a ValueError naming the config keys that nothing uses, and the valid ones."""
    accepted = set(accepted)
    valid = accepted | read | set(allowed)
    unknown = [k for k in config if k not in valid]
    if not unknown:
        return
    hints = []
    for k in unknown:
        close = difflib.get_close_matches(k, sorted(valid), n=1)
        if close:
            hints.append(f"{k!r}: did you mean {close[0]!r}?")
    raise ValueError(
        f"config {index} has key(s) {unknown} that nothing uses: "
        f"{optimizer_cls.__name__} takes {sorted(accepted)}, make_model/scheduler_fn read "
        f"{sorted(read & set(config)) or 'none of its keys'}"
        + (f"; {' '.join(hints)}" if hints else "")
        + "; fix the key, or pass extra_keys=[...] for keys kept only for the record"
    )


class _ShadowOptimizer(torch.optim.Optimizer):
    """A one-model stand-in that a user's LR scheduler drives: its single param group
    holds one model's hyper-parameters; :class:`_SlotSchedulers` copies them into that
    model's ``param_groups[i]`` after every scheduler step."""

    def __init__(self, hparams: Mapping[str, Any]) -> None:
        super().__init__([torch.zeros(1)], dict(hparams))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Nothing to update: the batch optimizer updates the model."""
        return None


def _call_scheduler_fn(fn: Callable[..., Any], optimizer: Any, config: Mapping[str, Any]) -> Any:
    try:
        n_args = len(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        n_args = 2
    return fn(optimizer, config) if n_args >= 2 else fn(optimizer)


_NOT_HPARAMS = ("params", "model_id", "initial_lr")


class _SlotSchedulers:
    """One LR scheduler per slot, each over its own :class:`_ShadowOptimizer`, so every
    model follows its own schedule from its own step 0 (also a model refilled mid-sweep).
    ``step()`` is what :func:`modelbatch.train_one_epoch` calls after each optimizer step."""

    def __init__(self, optimizer: torch.optim.Optimizer, interval: str) -> None:
        self.optimizer = optimizer
        self.interval = interval
        self.slots: dict[ModelId, tuple[_ShadowOptimizer, Any]] = {}

    def attach(
        self,
        slot: ModelId,
        fn: Callable[..., Any],
        config: Mapping[str, Any],
        group: dict[str, Any],
    ) -> None:
        """Build slot's scheduler over a shadow of its param group ``group``."""
        shadow = _ShadowOptimizer({k: v for k, v in group.items() if k not in _NOT_HPARAMS})
        sched = _call_scheduler_fn(fn, shadow, config)
        self.slots[slot] = (shadow, sched)
        self._copy(shadow, group)

    @staticmethod
    def _copy(shadow: _ShadowOptimizer, group: dict[str, Any]) -> None:
        for k, v in shadow.param_groups[0].items():
            if k in group and k not in _NOT_HPARAMS:
                group[k] = v

    def _groups(self) -> dict[ModelId, dict[str, Any]]:
        return {g["model_id"]: g for g in self.optimizer.param_groups}

    def step(self) -> None:
        """Step every slot's scheduler (per optimizer step, with ``interval="step"``)."""
        if self.interval == "step":
            self._step_all(None)

    def epoch_end(self, values: Mapping[ModelId, float]) -> None:
        """Step per epoch (``interval="epoch"``); ``ReduceLROnPlateau`` gets the slot's
        monitored value."""
        self._step_all(values)

    def _step_all(self, values: Mapping[ModelId, float] | None) -> None:
        groups = self._groups()
        for slot, (shadow, sched) in self.slots.items():
            plateau = isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau)
            if values is None and plateau:
                continue
            if values is not None and not plateau and self.interval == "step":
                continue
            if slot not in groups:
                continue
            shadow.step()
            if plateau:
                if slot in values:  # type: ignore[operator]
                    sched.step(values[slot])  # type: ignore[index]
            else:
                sched.step()
            self._copy(shadow, groups[slot])

    def state(self, slot: ModelId) -> dict[str, Any]:
        shadow, sched = self.slots[slot]
        group = {k: v for k, v in shadow.param_groups[0].items() if k != "params"}
        return {"group": group, "scheduler": sched.state_dict()}

    def load(self, slot: ModelId, state: Mapping[str, Any]) -> None:
        shadow, sched = self.slots[slot]
        shadow.param_groups[0].update(state["group"])
        sched.load_state_dict(state["scheduler"])
        self._copy(shadow, self._groups()[slot])


def _hparam_value(optimizer: torch.optim.Optimizer, name: str, value: Any) -> Any:
    """The form ``optimizer`` keeps hyper-parameter ``name`` in its param groups."""
    from modelbatch.optim.base import _PAIR_HPARAMS, BatchOptimizer

    if not isinstance(optimizer, BatchOptimizer):
        return value
    if name in optimizer._bool_hparams:
        return bool(value)
    if name in _PAIR_HPARAMS:
        return tuple(float(v) for v in value)
    return float(value)


def train_and_score(
    o: Mapping[str, Any], batch: ModelBatch, optimizer: Any, scheds: Any, pack: Any
) -> tuple[Tensor, Tensor]:
    """One epoch of every model in flight, then the objective: ``([N] train losses,
    [N] objective values)``, with the sweep options ``o`` (loaders, loss, metric, ...)."""
    losses = train_one_epoch(
        batch, o["train_loader"], optimizer, o["loss_fn"],
        scheduler=scheds if o["scheduler_fn"] is not None else None,
        callbacks=pack,
    )
    values = _objective(batch, o["train_loader"], o["val_loader"], o["loss_fn"],
                        o["metric"], o["eval_fn"])
    return losses, values


def release_slots(
    batch: ModelBatch, pack: Any, scheds: _SlotSchedulers | None, empty: list[int]
) -> bool:
    """Drop the models at positions ``empty`` (no config left to refill them), through the
    callback ``pack`` when there is one, and forget their slots' schedulers. Returns False
    when that would empty the batch: the caller then discards the batch instead."""
    if len(empty) == len(batch):
        return False
    if empty:
        gone = [batch.model_ids[p] for p in empty]
        if pack is not None:
            pack.drop(gone, "finished")
        else:
            batch.drop(gone)
        if scheds is not None:
            for slot in gone:
                scheds.slots.pop(slot, None)  # type: ignore[arg-type]
    return True


@torch.no_grad()
def reset_slot(
    batch: ModelBatch,
    optimizer: torch.optim.Optimizer,
    position: int,
    model: nn.Module,
    hparams: Mapping[str, Any],
    seed: int | None = None,
) -> None:
    """Put a fresh model in slot ``position`` of a running batch: its weights and buffers,
    a zero optimizer state and step count, and its own hyper-parameters.

    After this call the slot trains exactly as ``model`` would alone with a new optimizer
    (``optimizer_cls(model.parameters(), **hparams)``) on the batches it sees from now on.
    Only ``optimizer.state`` and ``optimizer.param_groups[position]`` are touched (the one
    place to adapt if the optimizers' storage changes). In a batch built with ``seeds=``,
    the slot's seeded dropout starts over (call counters at 0) from ``seed`` (default: the
    slot's current seed), as ``modelbatch.use_seeded_dropout(model, seed)`` alone would.

    Args:
        batch: the ModelBatch; the slot keeps its model id.
        optimizer: the batch's optimizer (vectorised, or a PerModelOptimizer).
        position: the slot's current position.
        model: the new model (same architecture), copied in.
        hparams: the new model's hyper-parameters; those not given take the optimizer
            class's defaults.
        seed: the new model's dropout seed (only for a batch built with ``seeds=``).
    """
    if seed is not None and batch.seeds is None:
        raise ValueError(
            "reset_slot got a seed, but the batch was built without seeds=: its dropout "
            "masks do not come from per-model seeds. Build the batch with seeds=[...]"
        )
    batch.insert(batch.model_ids[position], model)
    batch.unquarantine(batch.model_ids[position])
    if batch.seeds is not None:
        _reseed_slot(batch, position, batch.seeds[position] if seed is None else seed)
    group = optimizer.param_groups[position]
    n = len(batch)
    views = group.get("params") or []
    if views:  # PerModelOptimizer: each model's views hold their own torch.optim state
        for v in views:
            optimizer.state.pop(v, None)
    else:  # vectorised: one [N, ...] tensor per state entry; model i is row i
        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == n:
                    value[position] = 0
    cls = getattr(optimizer, "optimizer_cls", type(optimizer))
    for name, default in _accepted_hparams(cls).items():
        if name in hparams:
            group[name] = _hparam_value(optimizer, name, hparams[name])
        elif name in group and default is not inspect.Parameter.empty:
            group[name] = _hparam_value(optimizer, name, default)
    group.pop("initial_lr", None)
    validate = getattr(optimizer, "_validate", None)
    if validate is not None:
        validate(group, position)


def _reseed_slot(batch: ModelBatch, position: int, seed: int) -> None:
    """Slot ``position``'s seeded dropout layers (``[N]`` seed and counter buffers) start
    over from ``seed``; ``batch.seeds`` records it."""
    from modelbatch.layers.dropout import SeededDropout
    from modelbatch.seeding import check_seeds

    (seed,) = check_seeds([seed], 1)
    assert batch.seeds is not None
    batch.seeds[position] = seed
    for module in batch.stacked.modules():
        if isinstance(module, SeededDropout) and module.seed.dim() == 1:
            module.seed[position] = seed
            module.counter[position] = 0


class SuccessiveHalving:
    """An asynchronous successive-halving (ASHA-like) pruner for :func:`sweep`.

    When a config has trained ``r`` epochs for ``r`` in ``rungs``, it continues only if its
    objective is among the best ``max(1, k // reduction_factor)`` of the ``k`` configs that
    have reached that rung so far (itself included); otherwise it is pruned. The decision
    reads only the results, so a resumed sweep decides the same.

    Args:
        rungs: epoch counts at which configs are compared, e.g. ``(1, 3, 9)``.
        reduction_factor: keep about one in ``reduction_factor`` at each rung.
        mode: ``"min"`` or ``"max"``; default: the mode of the :func:`sweep` it is given to
            (``"max"`` for accuracy). Needed when called outside a sweep.
    """

    def __init__(
        self, rungs: Sequence[int], reduction_factor: float = 3, mode: str | None = None
    ) -> None:
        if mode not in ("min", "max", None):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if reduction_factor <= 1:
            raise ValueError(f"reduction_factor must be > 1, got {reduction_factor}")
        self.rungs = sorted(int(r) for r in rungs)
        self.reduction_factor = reduction_factor
        self.mode = mode

    def __call__(self, key: Any, epoch: int, results: Mapping[Any, ConfigResult]) -> bool:
        """Whether config ``key``, which just finished epoch ``epoch`` (0-based), stops."""
        if self.mode is None:
            raise ValueError(
                "SuccessiveHalving needs mode='min' or 'max' when it is not given to sweep "
                "(which passes its own)"
            )
        r = epoch + 1
        if r not in self.rungs:
            return False
        mine = results[key].history[epoch]
        values = sorted(
            (res.history[epoch] for res in results.values()
             if len(res.history) > epoch and math.isfinite(res.history[epoch])),
            reverse=self.mode == "max",
        )
        keep = max(1, int(len(values) // self.reduction_factor))
        return not (values and _better_or_equal(mine, values[keep - 1], self.mode))


@torch.no_grad()
def _finite_weights(batch: ModelBatch) -> list[bool]:
    """Per model, whether all its parameters and floating buffers are finite (one sync)."""
    n = len(batch)
    ok = torch.ones(n, dtype=torch.bool, device=batch.active.device)
    for _, t in [*batch.stacked_parameters(), *batch.stacked_buffers()]:
        if (t.is_floating_point() or t.is_complex()) and t.dim() > 0 and t.shape[0] == n:
            ok &= t.detach().reshape(n, -1).isfinite().all(dim=1).to(ok.device)
    return ok.tolist()


def _resolve_pruner(pruner: Any, mode: str, metric: str) -> Any:
    """A :class:`SuccessiveHalving` without a mode takes the sweep's; an opposite mode is
    refused (it would prune the best configs). Other pruners pass through."""
    if not isinstance(pruner, SuccessiveHalving):
        return pruner
    if pruner.mode is None:
        return SuccessiveHalving(pruner.rungs, pruner.reduction_factor, mode)
    if pruner.mode != mode:
        raise ValueError(
            f"the pruner's mode {pruner.mode!r} does not match: the sweep's mode is {mode!r} "
            f"(metric {metric!r}): it would prune the best configs; build "
            f"SuccessiveHalving(..., mode={mode!r}) or leave mode out"
        )
    return pruner


def _better_or_equal(a: float, b: float, mode: str) -> bool:
    return a <= b if mode == "min" else a >= b


def _improves(v: float, best: float, mode: str, min_delta: float) -> bool:
    if not math.isfinite(v):
        return False
    if not math.isfinite(best):
        return True
    return v < best - min_delta if mode == "min" else v > best + min_delta


class _Progress:
    """A progress bar over configs with the best-so-far: tqdm when installed, otherwise
    one plain line per finished config on stderr; nothing when quiet."""

    def __init__(self, total: int, done: int, enabled: bool, metric: str) -> None:
        self.metric = metric
        self.total = total
        self.done = done
        self.bar: Any = None
        self.enabled = enabled
        if not enabled:
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return
        self.bar = tqdm(total=total, initial=done, desc="sweep", unit="config", file=sys.stderr)

    def update(self, best: tuple[Any, float] | None) -> None:
        self.done += 1
        if not self.enabled:
            return
        text = f"best {self.metric}={best[1]:.4g} (config {best[0]!r})" if best else "best -"
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
        else:
            print(f"sweep: {self.done}/{self.total} configs done, {text}", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class SweepResults(dict[Any, ConfigResult]):
    """The results of :func:`sweep`: ``{index or config[key]: ConfigResult}`` in config
    order, plus the table, the best models and the plot.

    Attributes:
        metric: the objective's name (``"val_loss"``, ``"accuracy"``, ...).
        mode: ``"min"`` or ``"max"``.
        folder: the sweep folder (``None`` without one).
        best_models: the best ``top_k`` models (plain ``nn.Module`` with their best
            weights), best first.
        best_keys: their keys.
    """

    def __init__(self, items: Mapping[Any, ConfigResult], *, metric: str, mode: str,
                 folder: Path | None) -> None:
        super().__init__(items)
        self.metric = metric
        self.mode = mode
        self.folder = folder
        self.best_models: list[nn.Module] = []
        self.best_keys: list[Any] = []
        self._best_states: dict[Any, dict[str, Tensor]] = {}
        self._templates: dict[Any, nn.Module] = {}

    # ------------------------------------------------------------ ranking and models
    def ranked(self) -> list[Any]:
        """Keys of the configs with a finite best objective, best first (ties: config
        order)."""
        keys = [k for k, r in self.items() if math.isfinite(r.best_value)]
        sign = 1.0 if self.mode == "min" else -1.0
        order = {k: i for i, k in enumerate(self)}
        return sorted(keys, key=lambda k: (sign * self[k].best_value, order[k]))

    def best_weights(self, key: Any) -> dict[str, Tensor]:
        """Config ``key``'s best weights (its state dict at its best epoch, on the CPU),
        also for models dropped, pruned or early-stopped long ago."""
        if key not in self:
            raise KeyError(f"no config {key!r} in this sweep; keys are {list(self)}")
        state = self._best_states.get(key)
        if state is not None:
            return state
        ckpt = self[key].checkpoint
        if ckpt is None:
            raise KeyError(
                f"config {key!r} ({self[key].status}) never reached a finite {self.metric}: "
                "it has no best weights"
            )
        from modelbatch.checkpoint import load_weights

        return load_weights(ckpt, _model_id_of(key))

    def best_model(self, key: Any) -> nn.Module:
        """Config ``key``'s model (a plain ``nn.Module``) with its best weights."""
        template = self._templates.get(key)
        if template is None:
            raise KeyError(f"config {key!r} has no model (it failed: {self[key].error})")
        module = copy.deepcopy(template)
        module.load_state_dict(self.best_weights(key))
        return module

    # ------------------------------------------------------------ table
    def records(self) -> list[dict[str, Any]]:
        """One row per config: ``key``, its hyper-parameters, the final and best objective,
        ``best_epoch``, ``status``, ``epochs``, final ``train_loss``, ``checkpoint``,
        ``error``. A config entry named like one of these columns is ``config.<name>``."""
        reserved = {"key", self.metric, f"best_{self.metric}", "best_epoch", "status",
                    "epochs", "train_loss", "checkpoint", "error"}
        rows = []
        for k, r in self.items():
            row: dict[str, Any] = {"key": k}
            for name, v in r.config.items():  # a config entry named like a result column
                row[f"config.{name}" if name in reserved else name] = v
            row[self.metric] = r.value
            row[f"best_{self.metric}"] = r.best_value
            row["best_epoch"] = r.best_epoch
            row["status"] = r.status
            row["epochs"] = r.epochs
            row["train_loss"] = r.train_loss[-1] if r.train_loss else math.nan
            row["checkpoint"] = r.checkpoint
            row["error"] = r.error
            rows.append(row)
        return rows

    def to_pandas(self) -> Any:
        """The table as a ``pandas.DataFrame`` (needs pandas)."""
        import pandas as pd

        return pd.DataFrame.from_records(self.records())

    def write_csv(self, path: str | os.PathLike[str]) -> Path:
        """Write the table to ``path`` (atomically) and return it."""
        rows = self.records()
        columns: list[str] = []
        for row in rows:
            columns.extend(c for c in row if c not in columns)
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            for row in rows:
                writer.writerow({c: ("" if row.get(c) is None else row.get(c)) for c in columns})
        os.replace(tmp, path)
        return path

    # ------------------------------------------------------------ plot
    def plot(self, path: str | os.PathLike[str] | None = None) -> Any:
        """The best objective of every config against each numeric hyper-parameter (one
        panel each, log scale when all values are positive and span more than 10x), the
        best config marked with a red star. Needs matplotlib; saved to ``path`` if given.

        Returns:
            The matplotlib ``Figure``.
        """
        import matplotlib

        if path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        finite = [k for k in self if math.isfinite(self[k].best_value)]
        names = []
        for k in self:
            for name, v in self[k].config.items():
                if (
                    name not in names
                    and isinstance(v, (int, float))
                    and not isinstance(v, bool)
                    and len({repr(self[j].config.get(name)) for j in self}) > 1
                ):
                    names.append(name)
        if not names:
            names = ["config"]
        fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), squeeze=False)
        best = self.ranked()[0] if finite else None
        for ax, name in zip(axes[0], names, strict=True):
            def x_of(k: Any, name: str = name) -> float:
                return float(list(self).index(k) if name == "config" else self[k].config[name])

            ks = [k for k in finite if name == "config" or name in self[k].config]
            xs = [x_of(k) for k in ks]
            ax.scatter(xs, [self[k].best_value for k in ks], s=18, alpha=0.8)
            if best is not None and best in ks:
                ax.scatter([x_of(best)], [self[best].best_value], marker="*", s=220,
                           color="red", label=f"best: {best!r}", zorder=3)
                ax.legend(fontsize=8)
            if xs and min(xs) > 0 and max(xs) / min(xs) > 10:
                ax.set_xscale("log")
            ax.set_xlabel(name)
            ax.set_ylabel(f"best {self.metric}")
        fig.tight_layout()
        if path is not None:
            fig.savefig(path)
            plt.close(fig)
        return fig


def _model_id_of(key: Any) -> int | str:
    """The model id a config's key is saved under (a checkpoint id is an int or a str)."""
    if isinstance(key, (int, str)) and not isinstance(key, bool):
        return key
    return repr(key)


def _folder_of(key: Any) -> str:
    from modelbatch.checkpoint import model_folder_name

    return model_folder_name(_model_id_of(key))


def _save_model(module: nn.Module, directory: Path, model_id: int | str) -> str:
    """Save one model as a one-model ModelBatch checkpoint (:func:`modelbatch.load_model`
    reads it, :func:`modelbatch.checkpoint.load_weights` gives its state dict)."""
    ModelBatch([module], model_ids=[model_id]).save_all(directory)
    return str(directory)


def _rng_get() -> dict[str, Any]:
    np_state: Any = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
    }


def _rng_set(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["numpy"]
    np.random.set_state((npst[0], npst[1].numpy(), *npst[2:]))


def _loader_generators(loaders: Sequence[Any]) -> list[torch.Generator]:
    """The torch generators the loaders shuffle or sample from (a DataLoader's
    ``generator``, its sampler's and batch sampler's), each once, in a fixed order."""
    out: list[torch.Generator] = []
    for loader in loaders:
        sampler = getattr(loader, "sampler", None)
        batch_sampler = getattr(loader, "batch_sampler", None)
        for owner in (loader, sampler, batch_sampler, getattr(batch_sampler, "sampler", None)):
            g = getattr(owner, "generator", None)
            if isinstance(g, torch.Generator) and not any(g is h for h in out):
                out.append(g)
    return out


_STATE_FILE = "sweep_state.pt"
_STATE_VERSION = 1


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _SweepRun:
    """The state machine behind :func:`sweep`: one structure group at a time, a round is
    one epoch of every model in flight; between rounds finished models leave and their
    slots are refilled. The whole state is written at every round boundary, so a killed
    sweep resumes from its folder and ends with the same results."""

    def __init__(self, configs: list[dict[str, Any]], keys: list[Any], opts: dict[str, Any]):
        self.configs = configs
        self.keys = keys
        self.o = opts
        self.epochs: int = opts["epochs"]
        self.mode: str = opts["mode"]
        self.metric_name: str = opts["metric_name"]
        self.folder: Path | None = opts["folder"]
        self.results = {i: ConfigResult(config=c, status="pending") for i, c in enumerate(configs)}
        self.by_key = {keys[i]: r for i, r in self.results.items()}
        self.best_states: dict[int, dict[str, Tensor]] = {}
        self.models: list[nn.Module | None] = []
        # Per-model settings (dropout rate, eps, ...) are fixed per slot when a batch is
        # built: a freed slot only takes a config with the same settings.
        self.settings: dict[int, str] = {}
        self.groups: list[list[int]] = []
        self.g = 0
        self.queue: list[int] = []
        self.slot_cfg: dict[int, int] = {}
        self.slot_cfg_gone: dict[int, int] = {}  # slot -> the config that just left it
        self.next_slot = 0
        self.batch: ModelBatch | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.pack: Any = None
        self.scheds: _SlotSchedulers | None = None
        self.state_keys: list[str] = []

    # ------------------------------------------------------------------ setup
    def build_models(self) -> None:
        """``make_model`` for every config (a config whose model cannot be built fails
        alone), then the unknown-key check and the grouping by structure."""
        o = self.o
        accepted = _accepted_hparams(o["optimizer_cls"])
        groups: dict[Hashable, list[int]] = {}
        for i, cfg in enumerate(self.configs):
            read: set[str] = set()
            try:
                model = self._make_model(i, _ReadTracker(cfg, read))
                if not isinstance(model, nn.Module):
                    raise TypeError(
                        f"make_model returned a {type(model).__name__}, not an nn.Module"
                    )
            except Exception as e:  # a bad config fails alone
                self.models.append(None)
                self.results[i].status = "failed"
                self.results[i].error = f"make_model: {type(e).__name__}: {e}"
                continue
            if o["scheduler_fn"] is not None:
                shadow = _ShadowOptimizer(
                    {"lr": 1e-3, **optimizer_hparams(cfg, o["optimizer_cls"])}
                )
                _call_scheduler_fn(o["scheduler_fn"], shadow, _ReadTracker(cfg, read))
            _check_config_keys(i, cfg, read, accepted, o["optimizer_cls"], o["allowed_keys"])
            self.models.append(model)
            self.settings[i] = repr(sorted(model_settings(model).items()))
            groups.setdefault(structure_key(model), []).append(i)
        self.groups = list(groups.values())

    def _make_model(self, i: int, config: Mapping[str, Any]) -> Any:
        """``make_model(config)``; with ``seeds=``, under torch's global RNG seeded by
        config i's seed (the caller's RNG state is kept), as
        :func:`modelbatch.seeded_models` builds a model."""
        seeds = self.o.get("seeds")
        if seeds is None:
            return self.o["make_model"](config)
        from modelbatch.seeding import seeded_models

        return seeded_models(lambda: self.o["make_model"](config), [seeds[i]])[0]

    def _seeds(self, cfgs: Sequence[int]) -> list[int] | None:
        """The dropout seeds of configs ``cfgs`` (``None`` without ``seeds=``)."""
        seeds = self.o.get("seeds")
        return None if seeds is None else [seeds[i] for i in cfgs]

    def hparams(self, i: int) -> dict[str, Any]:
        return optimizer_hparams(self.configs[i], self.o["optimizer_cls"])

    def _check_hparams(self, i: int) -> None:
        """Build the optimizer for config i alone: a bad value (``lr=-1``) fails here,
        for that config only."""
        model = self.models[i]
        assert model is not None
        probe = ModelBatch([copy.deepcopy(model)])
        OptimizerFactory(self.o["optimizer_cls"], **self.hparams(i)).build(probe)

    def _take_valid(self, probe: bool, settings: str | None = None) -> int | None:
        """The next config of the queue (with ``settings``: the next with those per-model
        settings); with ``probe``, the next whose optimizer builds (others fail alone)."""
        while True:
            fits = [i for i in self.queue if settings is None or self.settings[i] == settings]
            if not fits:
                return None
            i = fits[0]
            self.queue.remove(i)
            if probe:
                try:
                    self._check_hparams(i)
                except (ValueError, TypeError) as e:
                    self._fail(i, f"optimizer: {type(e).__name__}: {e}")
                    continue
            return i
        return None

    def _fail(self, i: int, message: str) -> None:
        self.results[i].status = "failed"
        self.results[i].error = message
        self.progress.update(self.best_so_far())

    # ------------------------------------------------------------------ groups
    def start_group(self) -> bool:
        """Fill a new batch with up to N configs of the current group's queue; False when
        the group has nothing left. If the optimizer refuses the N configs together, each
        is probed alone and the bad ones fail alone."""
        n_max = self.o["models_per_batch"] or len(self.groups[self.g])
        queue_before = list(self.queue)
        for probe in (False, True):
            self.queue = list(queue_before)
            chosen: list[int] = []
            while len(chosen) < n_max:
                i = self._take_valid(probe)
                if i is None:
                    break
                chosen.append(i)
            if not chosen:
                return False
            slots = list(range(self.next_slot, self.next_slot + len(chosen)))
            try:
                self._build_batch([self.models[i] for i in chosen], slots,
                                  [self.hparams(i) for i in chosen], self._seeds(chosen))
            except (ValueError, TypeError):
                if probe:
                    raise
                continue
            break
        self.next_slot += len(chosen)
        self.slot_cfg = dict(zip(slots, chosen, strict=True))
        for slot, i in self.slot_cfg.items():
            self.results[i].status = "running"
            self._attach_scheduler(slot, i)
        return True

    def _build_batch(
        self,
        models: Sequence[nn.Module | None],
        slots: list[int],
        hps: list[dict[str, Any]],
        seeds: list[int] | None,
    ) -> None:
        o = self.o
        self.batch = ModelBatch([m for m in models if m is not None], model_ids=slots,
                                seeds=seeds)
        if o["device"] is not None:
            self.batch.to(o["device"])
        per_model = _per_model_hparams(hps, o["optimizer_cls"], slots)
        self.optimizer = OptimizerFactory(o["optimizer_cls"], **per_model).build(self.batch)
        self.scheds = _SlotSchedulers(self.optimizer, o["scheduler_interval"])
        from modelbatch.callbacks import CallbackPack, GradClipping

        cbs = list(o["callbacks"]() if o["callbacks"] is not None else [])
        if o["grad_clip"] is not None:
            cbs.append(GradClipping(o["grad_clip"]))
        self.pack = CallbackPack(self.batch, cbs, optimizer=self.optimizer) if cbs else None

    def _attach_scheduler(self, slot: int, i: int) -> None:
        if self.o["scheduler_fn"] is None:
            return
        assert self.scheds is not None and self.optimizer is not None
        group = next(g for g in self.optimizer.param_groups if g["model_id"] == slot)
        self.scheds.attach(slot, self.o["scheduler_fn"], self.configs[i], group)

    # ------------------------------------------------------------------ one round
    def train_round(self) -> None:
        batch, optimizer = self.batch, self.optimizer
        assert batch is not None and optimizer is not None
        self.end_round(*train_and_score(self.o, batch, optimizer, self.scheds, self.pack))

    def end_round(self, losses: Tensor, values: Tensor) -> None:
        """Record the round of every model in flight, let the callbacks see the objective,
        then decide who leaves (diverged, completed, pruned, early-stopped, stopped by a
        callback) and refill their slots."""
        batch = self.batch
        assert batch is not None
        finite: dict[int, bool] = {}
        weights_ok = _finite_weights(batch)
        for pos, slot in enumerate(batch.model_ids):
            i = self.slot_cfg[slot]  # type: ignore[index]
            res = self.results[i]
            tl, v = float(losses[pos]), float(values[pos])
            res.train_loss.append(tl)
            if not weights_ok[pos]:  # e.g. accuracy of NaN outputs is finite: not a value
                v = math.nan
            res.history.append(v)
            res.value = v
            finite[slot] = math.isfinite(tl) and math.isfinite(v)  # type: ignore[index]
            if finite[slot] and _improves(v, res.best_value, self.mode, 0.0):  # type: ignore[index]
                res.best_value = v
                res.best_epoch = len(res.history) - 1
                self.best_states[i] = self._snapshot(pos)
            if self.o["logger"] is not None:
                self.o["logger"].log(
                    [{"model_id": self.keys[i], "train_loss": tl, self.metric_name: v,
                      "lr": self._lr(pos)}], len(res.history) - 1)
        if self.pack is not None:  # e.g. EarlyStopping: may quarantine or drop models
            self.pack.on_validation_end({self.metric_name: values})
        ids = batch.model_ids
        for slot in [s for s in self.slot_cfg if s not in ids]:  # dropped by a callback
            self._finish_gone(slot)
        active = batch.active.tolist()
        leaving: dict[int, str] = {}
        for pos, slot in enumerate(ids):
            i = self.slot_cfg[slot]  # type: ignore[index]
            res = self.results[i]
            epoch = len(res.history) - 1
            if not finite[slot]:  # type: ignore[index]
                leaving[pos] = "diverged"
            elif not active[pos]:  # quarantined by a callback
                leaving[pos] = "stopped"
            elif len(res.history) >= self.epochs:
                leaving[pos] = "completed"
            elif self.o["pruner"] is not None and self.o["pruner"](
                self.keys[i], epoch, self.by_key
            ):
                leaving[pos] = "pruned"
            elif (
                self.o["patience"] is not None
                and epoch - res.best_epoch >= self.o["patience"]
            ):
                leaving[pos] = "early_stopped"
        if self.scheds is not None and self.o["scheduler_fn"] is not None:
            self.scheds.epoch_end(
                {slot: self.results[self.slot_cfg[slot]].value  # type: ignore[index]
                 for p, slot in enumerate(ids) if p not in leaving}
            )
        for pos, status in leaving.items():
            self._finish(pos, status)
        self._refill_or_shrink(sorted(leaving))

    def _lr(self, pos: int) -> float:
        assert self.optimizer is not None
        return float(self.optimizer.param_groups[pos].get("lr", math.nan))

    @torch.no_grad()
    def _snapshot(self, pos: int) -> dict[str, Tensor]:
        """Slot ``pos``'s state dict (names as in the plain model), copied to the CPU."""
        assert self.batch is not None
        if not self.state_keys:
            self.state_keys = list(self.batch.extract(self.batch.model_ids[0]).state_dict())
        stacked: dict[str, Tensor] = dict(
            self.batch.stacked.named_parameters(remove_duplicate=False)
        )
        stacked.update(dict(self.batch.stacked.named_buffers(remove_duplicate=False)))
        return {k: stacked[k][pos].detach().to("cpu", copy=True) for k in self.state_keys}

    def _finish(self, pos: int, status: str) -> None:
        assert self.batch is not None
        slot = self.batch.model_ids[pos]
        i = self.slot_cfg.pop(slot)  # type: ignore[arg-type]
        self.slot_cfg_gone[slot] = i  # type: ignore[index]
        res = self.results[i]
        res.status = status
        if self.o["keep_models"]:
            res.model = self.batch.extract(self.batch.model_ids[pos])
        if self.folder is not None and i in self.best_states:
            res.checkpoint = self._save_best(i)
        self.progress.update(self.best_so_far())

    def _finish_gone(self, slot: int) -> None:
        """A model a callback dropped from the batch (e.g. ``EarlyStopping(action="drop")``):
        status ``"stopped"``, its best weights kept; its slot is gone."""
        i = self.slot_cfg.pop(slot)
        res = self.results[i]
        res.status = "stopped"
        if self.folder is not None and i in self.best_states:
            res.checkpoint = self._save_best(i)
        self.progress.update(self.best_so_far())
        if self.scheds is not None:
            self.scheds.slots.pop(slot, None)

    def _save_best(self, i: int) -> str:
        assert self.folder is not None
        model = copy.deepcopy(self.models[i])
        assert model is not None
        model.load_state_dict(self.best_states.pop(i))
        key = self.keys[i]
        return _save_model(model, self.folder / "models" / _folder_of(key), _model_id_of(key))

    def _refill_or_shrink(self, free: list[int]) -> None:
        batch, optimizer = self.batch, self.optimizer
        assert batch is not None and optimizer is not None
        empty: list[int] = []
        for pos in free:
            from modelbatch.optim.base import BatchOptimizer

            generic = not isinstance(optimizer, BatchOptimizer)
            slot_settings = self.settings[self.slot_cfg_gone[batch.model_ids[pos]]]  # type: ignore[index]
            i = self._take_valid(generic, slot_settings) if self.o["refill"] else None
            if i is None:
                empty.append(pos)
                continue
            model = self.models[i]
            assert model is not None
            slot = batch.model_ids[pos]
            try:
                seeds = self._seeds([i])
                reset_slot(batch, optimizer, pos, model, self.hparams(i),
                           seed=None if seeds is None else seeds[0])
            except (ValueError, TypeError) as e:
                self._fail(i, f"optimizer: {type(e).__name__}: {e}")
                empty.append(pos)
                continue
            if self.pack is not None:
                for cb in self.pack.callbacks:
                    cb.on_models_replaced(self.pack, [pos])
            self.slot_cfg[slot] = i  # type: ignore[index]
            self.results[i].status = "running"
            if self.scheds is not None:
                self.scheds.slots.pop(slot, None)  # type: ignore[arg-type]
            self._attach_scheduler(slot, i)  # type: ignore[arg-type]
        if not release_slots(batch, self.pack, self.scheds, empty):
            self.batch = self.optimizer = self.pack = self.scheds = None
            self.state_keys = []

    def best_so_far(self) -> tuple[Any, float] | None:
        best: tuple[Any, float] | None = None
        for i, r in self.results.items():
            if math.isfinite(r.best_value) and (
                best is None or _improves(r.best_value, best[1], self.mode, 0.0)
            ):
                best = (self.keys[i], r.best_value)
        return best

    # ------------------------------------------------------------------ state
    def fingerprint(self) -> str:
        o = self.o
        text = repr((self.configs, self.keys, self.epochs, o["models_per_batch"], o["refill"],
                     o["metric"], self.mode, o["patience"], o["optimizer_cls"].__qualname__))
        if o.get("seeds") is not None:
            text += repr(o.get("seeds"))
        text += repr((o["grad_clip"], o["scheduler_interval"], o["metric_name"]))
        return hashlib.sha256(text.encode()).hexdigest()

    def spec(self) -> dict[str, Any]:
        """What the fingerprint covers, in readable form (reprs), to name a difference."""
        o = self.o
        return {
            "config_dicts": [{str(k): repr(v) for k, v in c.items()} for c in self.configs],
            "keys": repr(self.keys), "epochs": repr(self.epochs),
            "models_per_batch": repr(o["models_per_batch"]), "refill": repr(o["refill"]),
            "metric": repr(o["metric"]), "mode": repr(self.mode),
            "patience": repr(o["patience"]), "optimizer_cls": o["optimizer_cls"].__qualname__,
            "seeds": repr(o.get("seeds")), "grad_clip": repr(o["grad_clip"]),
            "scheduler_interval": repr(o["scheduler_interval"]),
            "objective": repr(o["metric_name"]),
        }

    def _difference(self, old: Mapping[str, Any] | None) -> str:
        """The first difference between the saved sweep's spec ``old`` and this one."""
        if old is None:
            return "(saved by an older version, which did not record its arguments)"
        new = self.spec()
        before, now = old["config_dicts"], new["config_dicts"]
        if len(before) != len(now):
            return f"{len(before)} configs before, {len(now)} now"
        for i, (a, b) in enumerate(zip(before, now, strict=True)):
            for name in [*a, *(k for k in b if k not in a)]:
                if a.get(name) != b.get(name):
                    was = a.get(name, "absent")
                    return f"config {i}: {name!r} was {was}, now {b.get(name, 'absent')}"
        for name in ("keys", "epochs", "models_per_batch", "refill", "metric", "mode",
                     "patience", "optimizer_cls", "seeds", "grad_clip", "scheduler_interval",
                     "objective"):
            if old.get(name) != new[name]:
                return f"{name} was {old.get(name)}, now {new[name]}"
        return "(a difference in the configs' order or types)"

    def _generators(self) -> list[torch.Generator]:
        loaders = [self.o["train_loader"]]
        if self.o["val_loader"] is not None:
            loaders.append(self.o["val_loader"])
        return _loader_generators(loaders)

    def save_state(self, done: bool = False) -> None:
        assert self.folder is not None
        state: dict[str, Any] = {
            "version": _STATE_VERSION,
            "fingerprint": self.fingerprint(),
            "spec": self.spec(),
            "done": done,
            "init_rng": self.init_rng,
            "rng": _rng_get(),
            "loader_rng": [g.get_state() for g in self._generators()],
            "results": [
                {k: v for k, v in r.to_dict().items() if k != "config"}
                for r in self.results.values()
            ],
            "g": self.g,
            "queue": list(self.queue),
            "slot_cfg": dict(self.slot_cfg),
            "next_slot": self.next_slot,
            "best_states": self.best_states,
            "batch": None,
        }
        if self.batch is not None:
            assert self.optimizer is not None
            state["batch"] = {
                "slots": self.batch.model_ids,
                "state": self.batch.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "schedulers": {s: self.scheds.state(s) for s in self.scheds.slots}
                if self.scheds is not None else {},
                "callbacks": self.pack.state_dict() if self.pack is not None else None,
            }
        state["final_models"] = {
            i: r.model.state_dict() for i, r in self.results.items() if r.model is not None
        }
        _atomic_torch_save(state, self.folder / _STATE_FILE)

    def load_state(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != _STATE_VERSION or state["fingerprint"] != self.fingerprint():
            raise ValueError(
                f"{self.folder} holds the state of a different sweep: "
                f"{self._difference(state.get('spec'))}; call sweep with the same configs "
                f"and arguments to resume, or use a new folder (or delete {_STATE_FILE}) to "
                "start over"
            )
        for i, data in enumerate(state["results"]):
            r = ConfigResult.from_dict({**data, "config": self.configs[i]})
            res = self.results[i]
            for f in ("value", "history", "train_loss", "status", "best_value", "best_epoch",
                      "checkpoint", "error"):
                setattr(res, f, getattr(r, f))
        for i, sd in state["final_models"].items():
            m = copy.deepcopy(self.models[i])
            assert m is not None
            m.load_state_dict(sd)
            self.results[i].model = m
        self.g = state["g"]
        self.queue = list(state["queue"])
        self.slot_cfg = {int(k): int(v) for k, v in state["slot_cfg"].items()}
        self.next_slot = state["next_slot"]
        self.best_states = dict(state["best_states"])
        b = state["batch"]
        if b is not None:
            slots = list(b["slots"])
            cfgs = [self.slot_cfg[s] for s in slots]
            self._build_batch([self.models[i] for i in cfgs], slots,
                              [self.hparams(i) for i in cfgs], self._seeds(cfgs))
            assert self.batch is not None and self.optimizer is not None
            self.batch.load_state_dict(b["state"])
            for slot, i in zip(slots, cfgs, strict=True):
                self._attach_scheduler(slot, i)
            self.optimizer.load_state_dict(b["optimizer"])
            if self.scheds is not None:
                for slot, st in b["schedulers"].items():
                    self.scheds.load(slot, st)
            if self.pack is not None and b.get("callbacks") is not None:
                self.pack.load_state_dict(b["callbacks"])

    # ------------------------------------------------------------------ main loop
    def run(self) -> SweepResults:
        state = None
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            path = self.folder / _STATE_FILE
            if path.is_file():
                state = torch.load(path, weights_only=True)
        self.init_rng = state["init_rng"] if state is not None else _rng_get()
        if state is not None:
            _rng_set(self.init_rng)  # make_model draws what it drew the first time
        self.build_models()
        if state is not None:
            self.load_state(state)
        done_before = sum(r.status not in ("pending", "running") for r in self.results.values())
        self.progress = _Progress(len(self.configs), done_before, self.o["progress"],
                                  self.metric_name)
        try:
            if state is None:
                self.queue = list(self.groups[0]) if self.groups else []
            else:
                _rng_set(state["rng"])
                gens, saved = self._generators(), state.get("loader_rng")
                if saved is None:  # written before loader generators were saved
                    saved = [g.get_state() for g in gens]
                if len(saved) != len(gens):
                    raise ValueError(
                        f"{self.folder} was saved with loaders drawing from {len(saved)} "
                        f"torch generator(s), these draw from {len(gens)}: build the loaders "
                        "as the first run did to resume"
                    )
                for g, st in zip(gens, saved, strict=True):
                    g.set_state(st)
            finished = state is not None and state["done"]
            saved = False
            while not finished:
                if self.batch is None:
                    if self.g >= len(self.groups):
                        break
                    if not self.start_group():
                        self.g += 1
                        self.queue = list(self.groups[self.g]) if self.g < len(self.groups) else []
                        continue
                if self.folder is not None and not saved:
                    self.save_state()
                self.train_round()
                saved = False
                on_round = self.o.get("on_round")
                if on_round is not None:
                    if self.folder is not None:
                        self.save_state()
                        saved = True
                    on_round(self)
            if self.folder is not None and not finished:
                self.save_state(done=True)
        finally:
            self.progress.close()
        return self.outputs()

    def outputs(self) -> SweepResults:
        out = SweepResults({self.keys[i]: self.results[i] for i in self.results},
                           metric=self.metric_name, mode=self.mode, folder=self.folder)
        out._best_states = {self.keys[i]: s for i, s in self.best_states.items()}
        out._templates = {self.keys[i]: m for i, m in enumerate(self.models) if m is not None}
        top = out.ranked()[: self.o["top_k"]]
        out.best_keys = top
        out.best_models = [out.best_model(k) for k in top]
        log_hparams = getattr(self.o["logger"], "log_hparams", None)
        if log_hparams is not None:
            log_hparams(
                {k: r.config for k, r in out.items()},
                {k: {self.metric_name: r.value, f"best_{self.metric_name}": r.best_value,
                     "epochs": float(r.epochs)} for k, r in out.items()},
            )
        if self.folder is not None:
            out.write_csv(self.folder / "results.csv")
            for rank, (k, m) in enumerate(zip(top, out.best_models, strict=True)):
                _save_model(m, self.folder / "best" / str(rank), _model_id_of(k))
        return out


def sweep(
    configs: Sequence[Mapping[str, Any]],
    make_model: Callable[[Mapping[str, Any]], nn.Module],
    *,
    train_loader: Iterable[Any],
    loss_fn: LossFn,
    epochs: int,
    models_per_batch: int | None = None,
    val_loader: Iterable[Any] | None = None,
    metric: str = "loss",
    mode: str | None = None,
    eval_fn: EvalFn | None = None,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.Adam,
    scheduler_fn: Callable[..., Any] | None = None,
    scheduler_interval: str = "step",
    callbacks: Callable[[], Sequence[Any]] | None = None,
    grad_clip: float | None = None,
    patience: int | None = None,
    pruner: Callable[[Any, int, Mapping[Any, ConfigResult]], bool] | None = None,
    refill: bool = True,
    device: torch.device | str | None = None,
    key: str | None = None,
    extra_keys: Iterable[str] = (),
    logger: Any | None = None,
    keep_models: bool = False,
    folder: str | os.PathLike[str] | None = None,
    top_k: int = 1,
    progress: bool = True,
    seeds: int | Sequence[int] | None = None,
) -> SweepResults:
    """Train every config as its own model, N at a time in one ModelBatch, and tabulate.

    ``make_model(config)`` builds each config's model (once, at the start; seed inside it
    for a chosen initialisation); the config entries the optimizer accepts (``lr``,
    ``weight_decay``, ``momentum``, ``betas``, ...) become that model's own
    hyper-parameters. A config key that neither the optimizer takes nor ``make_model`` /
    ``scheduler_fn`` reads is an error naming the valid keys (a typo ``weight_decy``, or
    ``momentum`` with Adam). Configs whose models have the same full signature
    (:func:`modelbatch._structure.structure_key`) train together, ``models_per_batch`` in
    flight (default: the whole group). When a model finishes (``epochs`` reached), is
    pruned, early-stopped or diverges, the next config takes its slot, fresh (own weights,
    optimizer state, step count and LR schedule from step 0): it trains exactly as it would
    alone on the batches it sees.

    Args:
        configs: the configs (dicts).
        make_model: ``make_model(config) -> nn.Module``.
        train_loader: yields ``(x [B, ...], y [B, ...])``, shared by all models.
        loss_fn: single-model loss, e.g. ``torch.nn.functional.cross_entropy``.
        epochs: the most epochs a config trains.
        models_per_batch: N, the models in flight at once per structure group.
        val_loader: data for the objective (default: ``train_loader``).
        metric: ``"loss"`` or ``"accuracy"`` from :func:`modelbatch.evaluate`, or the name
            of ``eval_fn``'s objective.
        mode: ``"min"`` or ``"max"`` (default: ``"max"`` for ``"accuracy"``, else ``"min"``).
        eval_fn: custom objective, ``eval_fn(batch) -> [N]`` tensor.
        optimizer_cls: a ``torch.optim`` or ``modelbatch.optim`` class.
        scheduler_fn: ``scheduler_fn(optimizer[, config]) -> LR scheduler``, written as for
            one model; each model gets its own. ``ReduceLROnPlateau`` steps per epoch on the
            model's objective.
        scheduler_interval: ``"step"`` (after every optimizer step) or ``"epoch"``.
        callbacks: ``callbacks() -> [modelbatch.Callback, ...]``, built for every batch
            (e.g. ``lambda: [modelbatch.NaNGuard()]``); a quarantined model counts as diverged.
            A sweep folder saves each callback's ``state_dict()`` (EarlyStopping's patience
            and best values, DivergenceGuard's counters): a callback of your own that keeps
            state between epochs implements ``state_dict``/``load_state_dict`` to resume.
        grad_clip: clip each model's gradient to this total norm.
        patience: early stopping: a config stops after ``patience`` epochs without beating
            its best objective. Its best weights are kept in any case.
        pruner: ``pruner(key, epoch, results) -> bool``, asked after each epoch of each
            config (e.g. :class:`SuccessiveHalving`); True prunes it.
        refill: refill freed slots with the next configs (else drop them and start the next
            N configs when the batch is empty).
        device: where to train.
        key: key the results by ``config[key]`` instead of the config's index.
        extra_keys: config keys kept only for the record (not an error when unused).
        logger: receives ``log([{"model_id", "train_loss", metric, "lr"}], epoch)`` per
            config and epoch (the :mod:`modelbatch.integrations.logging` loggers fit).
        keep_models: store each config's final model in ``result.model``.
        folder: the sweep folder: ``results.csv``, ``models/<key>/`` (each config's best
            weights, a checkpoint :func:`modelbatch.load_model` reads), ``best/<rank>/``
            (the ``top_k`` best) and ``sweep_state.pt``, written at every epoch boundary: a
            sweep killed at any moment and called again with the same arguments resumes
            there and ends with the same results.
        top_k: how many best models to return in ``results.best_models`` (and save).
        progress: show a progress bar with the best-so-far (tqdm, else one line per config).
        seeds: one seed per config (a list), or a base seed (an int: config ``k`` gets
            ``modelbatch.derive_seeds(seeds, len(configs))[k]``). Config k's model is then
            built under its seed (``make_model`` runs with torch's RNG seeded by it, as
            :func:`modelbatch.seeded_models`) and its dropout masks come from it, wherever
            and whenever it runs (batch built with ``seeds=``; a refilled slot takes its
            new config's seed): config k trains exactly as
            ``modelbatch.use_seeded_dropout(seeded_models(lambda: make_model(config),
            [seed])[0], seed)`` alone.

    Returns:
        :class:`SweepResults`: ``{index or config[key]: ConfigResult}`` in config order, with
        ``records()``, ``to_pandas()``, ``write_csv()``, ``plot()``, ``best_models``,
        ``best_weights(key)`` and ``best_model(key)``.
    """
    config_list = [dict(c) for c in configs]
    if not config_list:
        raise ValueError("sweep needs at least one config")
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    if models_per_batch is not None and models_per_batch < 1:
        raise ValueError(f"models_per_batch must be at least 1, got {models_per_batch}")
    if scheduler_interval not in ("step", "epoch"):
        raise ValueError(
            f"scheduler_interval must be 'step' or 'epoch', got {scheduler_interval!r}"
        )
    if patience is not None and patience < 1:
        raise ValueError(f"patience must be at least 1, got {patience}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if eval_fn is None and metric not in ("loss", "accuracy"):
        raise ValueError(f"metric must be 'loss' or 'accuracy' (or pass eval_fn), got {metric!r}")
    if mode is None:
        mode = "max" if metric == "accuracy" else "min"
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    keys: list[Any] = list(range(len(config_list)))
    if key is not None:
        missing = [i for i, c in enumerate(config_list) if key not in c]
        if missing:
            raise ValueError(f"configs {missing} have no {key!r} entry to key the results by")
        keys = [c[key] for c in config_list]
        if len(set(keys)) != len(keys):
            raise ValueError(f"config[{key!r}] values must be unique, got {keys}")
        ids: dict[Any, Any] = {}
        for k in keys:
            other = ids.setdefault(_model_id_of(k), k)
            if other is not k:
                raise ValueError(
                    f"keys {other!r} and {k!r} would share the checkpoint id "
                    f"{_model_id_of(k)!r}: make config[{key!r}] values of one type"
                )
    seed_list: list[int] | None = None
    if seeds is not None:
        from modelbatch.seeding import check_seeds, derive_seeds

        if isinstance(seeds, (int, np.integer)) and not isinstance(seeds, bool):
            seed_list = derive_seeds(int(seeds), len(config_list))
        elif isinstance(seeds, Sequence) and not isinstance(seeds, str):
            seed_list = check_seeds(seeds, len(config_list))
        else:
            raise TypeError(
                f"seeds must be an int (a base seed) or a list of one int per config, got "
                f"{type(seeds).__name__}"
            )
    pruner = _resolve_pruner(pruner, mode, metric)
    prefix = "val_" if val_loader is not None and eval_fn is None else ""
    metric_name = prefix + metric
    opts = {
        "make_model": make_model, "train_loader": train_loader, "loss_fn": loss_fn,
        "epochs": epochs, "models_per_batch": models_per_batch, "val_loader": val_loader,
        "metric": metric, "metric_name": metric_name, "mode": mode, "eval_fn": eval_fn,
        "optimizer_cls": optimizer_cls, "scheduler_fn": scheduler_fn,
        "scheduler_interval": scheduler_interval, "callbacks": callbacks,
        "grad_clip": grad_clip, "patience": patience, "pruner": pruner, "refill": refill,
        "device": device, "logger": logger, "keep_models": keep_models,
        "folder": Path(folder) if folder is not None else None, "top_k": top_k,
        "progress": progress, "seeds": seed_list,
        "allowed_keys": {*extra_keys, *([key] if key is not None else [])},
    }
    return _SweepRun(config_list, keys, opts).run()
