"""Ray Tune as the scale-out path: a sweep of K x N configs as K Tune trials of N models each.

When one device is not enough, :func:`tune_bundles` cuts the configs into K bundles of
(up to) N structurally identical models; each bundle is one Ray Tune trial that runs
:func:`~modelbatch.integrations.sweeping.sweep` on its configs (one ModelBatch, on one GPU
when ``resources_per_trial`` asks for one; a bad config fails alone). Each trial's
``param_space`` holds its configs' hyper-parameters (``model_<i>/<name>``), every epoch it
reports each config's objective as ``<metric>/model_<i>`` (the naming scheme of every
modelbatch integration) with the bundle's mean and best, and it saves a Tune checkpoint (the
sweep folder), so ``Tuner.restore`` (``tune_bundles(..., resume=True)``) resumes a killed
run. The per-config results come back as one :class:`~modelbatch.integrations.SweepResults`
table, one row per config with its hyper-parameters; a failed bundle marks its own configs
``"failed"`` and leaves the others. Needs ``modelbatch[ray]``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modelbatch.integrations import require
from modelbatch.integrations.sweeping import (
    ConfigResult,
    EvalFn,
    LossFn,
    SweepResults,
    _resolve_pruner,
    _SweepRun,
    structure_signature,
)

__all__ = ["make_bundles", "run_bundle", "trial_resources", "tune_bundles"]

# Tune metric holding the bundle's per-config results as JSON (merged by tune_bundles).
RESULTS_KEY = "bundle_results"


def make_bundles(
    configs: Sequence[Mapping[str, Any]],
    make_model: Callable[[Mapping[str, Any]], nn.Module],
    models_per_trial: int,
) -> list[list[int]]:
    """Config indices cut into bundles of at most ``models_per_trial`` configs whose models
    share one structure (each model is built once, then discarded)."""
    if models_per_trial < 1:
        raise ValueError(f"models_per_trial must be at least 1, got {models_per_trial}")
    groups: dict[Any, list[int]] = {}
    for i, config in enumerate(configs):
        try:
            key = structure_signature(make_model(config))
        except Exception:  # a config whose model cannot be built fails alone, in a bundle
            key = ("unbuildable", i)  # of its own, where the sweep records why
        groups.setdefault(key, []).append(i)
    return [
        idx[k : k + models_per_trial]
        for idx in groups.values()
        for k in range(0, len(idx), models_per_trial)
    ]


def _default_mode(metric: str, mode: str | None) -> str:
    if mode is None:
        mode = {"loss": "min", "accuracy": "max"}.get(metric)
        if mode is None:
            raise ValueError(f"pass mode='min' or 'max' for metric {metric!r}")
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    return mode


# Ray's remote-function spellings, which Tune would take for custom resources (that no node has).
_RESOURCE_ALIASES = {"num_cpus": "cpu", "num_gpus": "gpu", "CPU": "cpu", "GPU": "gpu"}
_RESOURCE_KEYS = ("cpu", "gpu", "memory", "custom_resources")


def trial_resources(resources: Mapping[str, Any] | None) -> dict[str, Any]:
    """The Tune resource dict of one trial: ``num_cpus``/``num_gpus`` (``ray.remote``'s names)
    become ``cpu``/``gpu``; other unknown keys are refused, since Tune would wait forever for
    a custom resource of that name (custom resources go under ``custom_resources``)."""
    out: dict[str, Any] = {}
    for key, value in dict(resources or {"cpu": 1}).items():
        name = _RESOURCE_ALIASES.get(key, key)
        if name not in _RESOURCE_KEYS:
            raise ValueError(
                f"resources_per_trial has an unknown key {key!r}: use {list(_RESOURCE_KEYS)} "
                "(e.g. {'cpu': 4, 'gpu': 1}; custom resources as custom_resources={'name': 1})"
            )
        if name in out:
            raise ValueError(f"resources_per_trial sets {name!r} twice (as {key!r} too)")
        out[name] = value
    return out


def _finite_or_none(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _flat_hparams(configs: Sequence[Mapping[str, Any]], indices: Sequence[int]) -> dict[str, Any]:
    """``{"model_<i>/<name>": value}`` for the bundle's configs: Tune shows them as the
    trial's hyper-parameters (one column per config and key in progress.csv / the
    ResultGrid)."""
    out: dict[str, Any] = {}
    for i in indices:
        for k, v in configs[i].items():
            out[f"model_{i}/{k}"] = v if isinstance(v, (int, float, str, bool)) else repr(v)
    return out


def run_bundle(
    tune_config: Mapping[str, Any],
    *,
    configs: Sequence[Mapping[str, Any]],
    bundles: Sequence[Sequence[int]],
    make_model: Callable[[Mapping[str, Any]], nn.Module],
    train_loader: Iterable[Any],
    loss_fn: LossFn,
    epochs: int,
    val_loader: Iterable[Any] | None = None,
    metric: str = "loss",
    mode: str = "min",
    eval_fn: EvalFn | None = None,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.Adam,
    sweep_kwargs: Mapping[str, Any] | None = None,
) -> None:
    """The Tune trainable: :func:`~modelbatch.integrations.sweeping.sweep` over bundle
    ``tune_config["trial"]["bundle"]``'s configs, as one ModelBatch.

    After every epoch it reports ``epoch``, ``<metric>/model_<i>`` for each config that
    trained this epoch, ``lr/model_<i>``, ``mean_<metric>`` and ``best_<metric>`` over the
    bundle's finite values, and the per-config results as JSON under ``bundle_results``,
    with a Tune checkpoint of the sweep folder; a restored trial resumes from it.
    """
    ray = require("ray", "ray")
    tune = require("ray.tune", "ray")
    indices = list(bundles[int(tune_config["trial"]["bundle"])])
    use_gpu = torch.cuda.is_available() and len(ray.get_gpu_ids()) > 0
    device = torch.device("cuda") if use_gpu else torch.device("cpu")
    report_fn = getattr(tune, "report", None) or require("ray.train", "ray").report
    checkpoint_cls = getattr(tune, "Checkpoint", None) or require("ray.train", "ray").Checkpoint
    get_checkpoint = getattr(tune, "get_checkpoint", None) or require(
        "ray.train", "ray"
    ).get_checkpoint
    folder = Path(tempfile.mkdtemp(prefix="modelbatch-bundle-"))
    restored = get_checkpoint()
    if restored is not None:
        with restored.as_directory() as d:
            shutil.copytree(d, folder, dirs_exist_ok=True)

    def report(run: _SweepRun) -> None:
        metrics: dict[str, Any] = {}
        finite = []
        epoch = max((res.epochs for res in run.results.values()), default=0)
        for j, res in run.results.items():
            if res.history and len(res.history) == epoch:
                metrics[f"{metric}/model_{indices[j]}"] = res.value
                if math.isfinite(res.value):
                    finite.append(res.value)
        if run.optimizer is not None and run.batch is not None:
            for g, slot in zip(run.optimizer.param_groups, run.batch.model_ids, strict=True):
                i = indices[run.slot_cfg[slot]]  # type: ignore[index]
                metrics[f"lr/model_{i}"] = float(g["lr"])
        metrics["epoch"] = epoch
        metrics["node_id"] = ray.get_runtime_context().get_node_id()
        metrics[f"mean_{metric}"] = sum(finite) / len(finite) if finite else math.nan
        best = (min(finite) if mode == "min" else max(finite)) if finite else math.nan
        metrics[f"best_{metric}"] = best
        metrics[RESULTS_KEY] = json.dumps({str(indices[j]): _jsonable(r)
                                           for j, r in run.results.items()})
        report_fn(metrics, checkpoint=checkpoint_cls.from_directory(str(folder)))

    opts = _sweep_opts(
        make_model=make_model, train_loader=train_loader, loss_fn=loss_fn, epochs=epochs,
        val_loader=val_loader, metric=metric, mode=mode, eval_fn=eval_fn,
        optimizer_cls=optimizer_cls, device=device, folder=folder, n=len(indices),
        extra=dict(sweep_kwargs or {}),
    )
    opts["on_round"] = report
    run = _SweepRun([dict(configs[i]) for i in indices], list(range(len(indices))), opts)
    run.run()
    if not any(r.history for r in run.results.values()):  # nothing trained: report anyway
        report(run)


def _sweep_opts(*, make_model: Any, train_loader: Any, loss_fn: Any, epochs: int,
                val_loader: Any, metric: str, mode: str, eval_fn: Any, optimizer_cls: Any,
                device: Any, folder: Path, n: int, extra: dict[str, Any]) -> dict[str, Any]:
    prefix = "val_" if val_loader is not None and eval_fn is None else ""
    opts: dict[str, Any] = {
        "make_model": make_model, "train_loader": train_loader, "loss_fn": loss_fn,
        "epochs": epochs, "models_per_batch": n, "val_loader": val_loader, "metric": metric,
        "metric_name": prefix + metric, "mode": mode, "eval_fn": eval_fn,
        "optimizer_cls": optimizer_cls, "scheduler_fn": None, "scheduler_interval": "step",
        "callbacks": None, "grad_clip": None, "patience": None, "pruner": None,
        "refill": True, "device": device, "logger": None, "keep_models": False,
        "folder": folder, "top_k": 0, "progress": False, "allowed_keys": set(),
    }
    unknown = set(extra) - set(opts)
    if unknown:
        raise TypeError(f"sweep_kwargs has unknown keys {sorted(unknown)}")
    opts.update(extra)
    opts["pruner"] = _resolve_pruner(opts["pruner"], mode, metric)
    return opts


def _jsonable(res: ConfigResult) -> dict[str, Any]:
    return {
        **res.to_dict(),
        "config": None,
        "value": _finite_or_none(res.value),
        "best_value": _finite_or_none(res.best_value),
        "history": [_finite_or_none(v) for v in res.history],
        "train_loss": [_finite_or_none(v) for v in res.train_loss],
        "checkpoint": None,
    }


def _float(v: Any) -> float:
    return math.nan if v is None else float(v)


def tune_bundles(
    make_model: Callable[[Mapping[str, Any]], nn.Module],
    configs: Sequence[Mapping[str, Any]],
    *,
    models_per_trial: int,
    train_loader: Iterable[Any],
    loss_fn: LossFn,
    epochs: int,
    val_loader: Iterable[Any] | None = None,
    metric: str = "loss",
    mode: str | None = None,
    eval_fn: EvalFn | None = None,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.Adam,
    resources_per_trial: Mapping[str, float] | None = None,
    max_concurrent_trials: int | None = None,
    storage_path: str | os.PathLike[str] | None = None,
    name: str | None = None,
    verbose: int = 0,
    resume: bool = False,
    sweep_kwargs: Mapping[str, Any] | None = None,
) -> SweepResults:
    """Train K x N configs as K Ray Tune trials of N models each; one row per config back.

    ``make_model(config)`` builds a model; the config entries the optimizer accepts
    (``lr``, ``weight_decay``, ...) become its per-model hyper-parameters, exactly as in
    :func:`modelbatch.integrations.sweeping.sweep` (the one-device version of this, which
    each trial runs). ``make_model``, the loaders and ``eval_fn`` are shipped to the
    workers, so they must be picklable (module-level functions of an importable module).

    Args:
        make_model: ``make_model(config) -> nn.Module``.
        configs: the K x N configs.
        models_per_trial: N, configs trained together in one Tune trial.
        train_loader, loss_fn, epochs, val_loader, metric, eval_fn, optimizer_cls: as for
            :func:`~modelbatch.integrations.sweeping.sweep`.
        mode: ``"min"`` or ``"max"`` for ``metric`` (default: ``min`` for loss, ``max`` for
            accuracy); Tune's own ``metric`` is ``best_<metric>`` of each bundle.
        resources_per_trial: Ray resources of one trial, default ``{"cpu": 1}``; use
            ``{"cpu": 4, "gpu": 1}`` to give each bundle its own GPU (see
            :func:`trial_resources`).
        max_concurrent_trials: limit on trials running at once.
        storage_path, name: where Tune writes its results and checkpoints.
        verbose: Tune's verbosity (0 = silent).
        resume: when ``storage_path/name`` holds an earlier run of this sweep, continue it
            with ``Tuner.restore`` (errored and unfinished trials resume from their last
            checkpoint; finished ones are kept).
        sweep_kwargs: further :func:`~modelbatch.integrations.sweeping.sweep` options for
            every trial (``scheduler_fn``, ``patience``, ``grad_clip``, ``pruner``, ...).

    Returns:
        :class:`~modelbatch.integrations.SweepResults`: ``{config index: ConfigResult}``
        for every config, in the order of ``configs``. A config of a trial that failed has
        status ``"failed"`` and the trial's error (its epochs so far are kept).
    """
    require("ray", "ray")
    tune = require("ray.tune", "ray")
    mode = _default_mode(metric, mode)
    resources = trial_resources(resources_per_trial)
    cfgs = [dict(c) for c in configs]
    if not cfgs:
        raise ValueError("tune_bundles needs at least one config")
    bundles = make_bundles(cfgs, make_model, models_per_trial)
    trainable = tune.with_resources(
        tune.with_parameters(
            run_bundle,
            configs=cfgs,
            bundles=bundles,
            make_model=make_model,
            train_loader=train_loader,
            loss_fn=loss_fn,
            epochs=epochs,
            val_loader=val_loader,
            metric=metric,
            mode=mode,
            eval_fn=eval_fn,
            optimizer_cls=optimizer_cls,
            sweep_kwargs=dict(sweep_kwargs or {}),
        ),
        resources,
    )
    run_config_cls = getattr(tune, "RunConfig", None) or require("ray.train", "ray").RunConfig
    path = None
    if storage_path is not None and name is not None:
        path = os.path.join(os.fspath(storage_path), name)
    if resume and path is not None and tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={
                "trial": tune.grid_search(
                    [{"bundle": b, **_flat_hparams(cfgs, idx)} for b, idx in enumerate(bundles)]
                )
            },
            tune_config=tune.TuneConfig(
                metric=f"best_{metric}", mode=mode, max_concurrent_trials=max_concurrent_trials
            ),
            run_config=run_config_cls(
                name=name,
                storage_path=None if storage_path is None else os.fspath(storage_path),
                verbose=verbose,
            ),
        )
    grid = tuner.fit()
    prefix = "val_" if val_loader is not None and eval_fn is None else ""
    out = SweepResults({i: ConfigResult(config=cfgs[i], status="pending")
                        for i in range(len(cfgs))},
                       metric=prefix + metric, mode=mode, folder=None)
    for result in grid:
        b = int(result.config["trial"]["bundle"])
        payload = json.loads((result.metrics or {}).get(RESULTS_KEY, "{}"))
        for key, data in payload.items():
            i = int(key)
            out[i] = ConfigResult.from_dict({
                **data, "config": cfgs[i], "value": _float(data["value"]),
                "best_value": _float(data.get("best_value")),
                "history": [_float(v) for v in data["history"]],
                "train_loss": [_float(v) for v in data["train_loss"]],
            })
        if result.error is not None:
            for i in bundles[b]:
                if out[i].status in ("pending", "running"):
                    out[i].status = "failed"
                    out[i].error = f"Ray Tune trial of bundle {b} failed: {result.error}"
    return out
