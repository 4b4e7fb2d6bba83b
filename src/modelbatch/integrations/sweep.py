"""Hyper-parameter sweeps as ModelBatches: a list of configs in, a dict of results out.

This is the engine behind the Optuna and Ray Tune integrations, and usable alone (no extra
needed). Each config is a dict holding the model's settings and its optimizer
hyper-parameters (``lr``, ``weight_decay``, ...: every key the optimizer accepts is passed
to it, per model). Configs whose models have the same structure train together as one
:class:`~modelbatch.ModelBatch`; models whose loss or metric turns non-finite are dropped
from the batch (status ``"diverged"``) without disturbing the others.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from modelbatch.core import ModelBatch
from modelbatch.optim.factory import OptimizerFactory
from modelbatch.train import evaluate, train_one_epoch

__all__ = [
    "ConfigResult",
    "group_by_structure",
    "optimizer_hparams",
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
        status: ``"completed"`` (all epochs), ``"stopped"`` (removed early by a pruner) or
            ``"diverged"`` (non-finite loss or objective; removed from the batch).
        model: the trained model (standalone copy), when requested.
    """

    config: dict[str, Any]
    value: float = math.nan
    history: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    status: str = "running"
    model: nn.Module | None = None

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
    """A hashable description of a model's structure: two models can share a ModelBatch
    when their signatures are equal (module tree, parameter and buffer names, shapes,
    dtypes, devices, ``requires_grad``)."""
    modules = tuple((n, type(m).__qualname__) for n, m in model.named_modules())
    tensors = tuple(
        (kind, n, tuple(t.shape), str(t.dtype), str(t.device), t.requires_grad)
        for kind, named in (("p", model.named_parameters()), ("b", model.named_buffers()))
        for n, t in named
    )
    return (modules, tensors)


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
        for i, mid in enumerate(current):
            tl, v = float(train_losses[i]), float(values[i])
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
    eval_fn: EvalFn | None = None,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.Adam,
    device: torch.device | str | None = None,
    key: str | None = None,
    logger: Any | None = None,
    keep_models: bool = False,
) -> dict[Any, ConfigResult]:
    """Train every config and return its result: the design doc's "list of configs in, dict
    of results out".

    ``make_model(config)`` builds each model (seed inside it for reproducible
    initialisation); the config entries the optimizer accepts (``lr``, ``weight_decay``,
    ``momentum``, ``betas``, ...) become that model's hyper-parameters. Configs with
    structurally identical models train together, ``models_per_batch`` at a time (default:
    all of them), each group as one ModelBatch.

    Args:
        configs: the configs (dicts).
        make_model: ``make_model(config) -> nn.Module``.
        train_loader, loss_fn, epochs, val_loader, metric: as for :func:`train_bundle`.
        eval_fn, optimizer_cls, device, logger, keep_models: as for :func:`train_bundle`.
        models_per_batch: largest ModelBatch to build (split larger groups).
        key: key the results by ``config[key]`` (e.g. ``"name"``) instead of the config's
            index in ``configs``.

    With a ``logger``, each ModelBatch logs its epochs as steps ``0..epochs-1`` under the
    config indices as model ids (so several batches reuse the same steps).

    Returns:
        ``{index or config[key]: ConfigResult}`` in the order of ``configs``.

    Example:
        >>> configs = [{"lr": lr, "hidden": 16} for lr in (1e-3, 1e-2, 1e-1)]
        >>> results = sweep(configs, lambda c: make_mlp(c["hidden"]), train_loader=loader,
        ...                 loss_fn=F.cross_entropy, epochs=3, metric="accuracy")
        >>> best = max(results, key=lambda i: results[i].value)
    """
    configs = [dict(c) for c in configs]
    if not configs:
        raise ValueError("sweep needs at least one config")
    if models_per_batch is not None and models_per_batch < 1:
        raise ValueError(f"models_per_batch must be at least 1, got {models_per_batch}")
    keys: list[Any] = list(range(len(configs)))
    if key is not None:
        missing = [i for i, c in enumerate(configs) if key not in c]
        if missing:
            raise ValueError(f"configs {missing} have no {key!r} entry to key the results by")
        keys = [c[key] for c in configs]
        if len(set(keys)) != len(keys):
            raise ValueError(f"config[{key!r}] values must be unique, got {keys}")
    models = [make_model(c) for c in configs]
    out: dict[int, ConfigResult] = {}
    for group in group_by_structure(models, models_per_batch):
        results = train_bundle(
            [models[i] for i in group],
            [optimizer_hparams(configs[i], optimizer_cls) for i in group],
            model_ids=group,
            configs=[configs[i] for i in group],
            train_loader=train_loader,
            loss_fn=loss_fn,
            epochs=epochs,
            val_loader=val_loader,
            metric=metric,
            eval_fn=eval_fn,
            optimizer_cls=optimizer_cls,
            device=device,
            logger=logger,
            keep_models=keep_models,
        )
        out.update({int(i): r for i, r in results.items()})
    return {keys[i]: out[i] for i in range(len(configs))}
