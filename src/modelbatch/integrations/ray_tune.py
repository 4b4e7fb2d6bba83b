"""Ray Tune as the scale-out path: a sweep of K x N configs as K Tune trials of N models each.

When one device is not enough, :func:`tune_bundles` cuts the configs into K bundles of
(up to) N structurally identical models; each bundle is one Ray Tune trial that trains its
models as one :class:`~modelbatch.ModelBatch` (on one GPU when ``resources_per_trial``
asks for one). Every epoch the trial reports each config's objective to Tune
(``<metric>/config_<i>``) together with the bundle's mean and best, and the per-config
results are merged back into one dict keyed by config index. Needs ``modelbatch[ray]``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from modelbatch.integrations import require
from modelbatch.integrations.sweeping import (
    ConfigResult,
    EvalFn,
    LossFn,
    ModelId,
    optimizer_hparams,
    structure_signature,
    train_bundle,
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
        groups.setdefault(structure_signature(make_model(config)), []).append(i)
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
) -> None:
    """The Tune trainable: train bundle ``tune_config["bundle"]`` as one ModelBatch.

    Reports to Tune after every epoch: ``epoch``, ``<metric>/config_<i>`` for each config
    still training, ``mean_<metric>`` and ``best_<metric>`` over the bundle's finite values,
    and the bundle's per-config results as JSON under ``bundle_results``.
    """
    ray = require("ray", "ray")
    tune = require("ray.tune", "ray")
    indices = list(bundles[int(tune_config["bundle"])])
    bundle_configs = [dict(configs[i]) for i in indices]
    use_gpu = torch.cuda.is_available() and len(ray.get_gpu_ids()) > 0
    device = torch.device("cuda") if use_gpu else torch.device("cpu")
    models = [make_model(c) for c in bundle_configs]
    # ray.tune.report since Ray 2.41; ray.train.report before.
    report_fn = getattr(tune, "report", None) or require("ray.train", "ray").report

    def report(epoch: int, results: dict[ModelId, ConfigResult]) -> None:
        metrics: dict[str, Any] = {"epoch": epoch + 1}
        finite = []
        for mid, res in results.items():
            if len(res.history) == epoch + 1:  # trained this epoch
                metrics[f"{metric}/config_{mid}"] = res.value
                if math.isfinite(res.value):
                    finite.append(res.value)
        # Always present (nan when every model diverged): Tune checks its metric is reported.
        metrics[f"mean_{metric}"] = sum(finite) / len(finite) if finite else math.nan
        best = (min(finite) if mode == "min" else max(finite)) if finite else math.nan
        metrics[f"best_{metric}"] = best
        payload = {
            str(mid): {
                **res.to_dict(),
                "config": None,
                "value": _finite_or_none(res.value),
                "history": [_finite_or_none(v) for v in res.history],
                "train_loss": [_finite_or_none(v) for v in res.train_loss],
            }
            for mid, res in results.items()
        }
        metrics[RESULTS_KEY] = json.dumps(payload)
        report_fn(metrics)

    train_bundle(
        models,
        [optimizer_hparams(c, optimizer_cls) for c in bundle_configs],
        model_ids=indices,
        configs=bundle_configs,
        train_loader=train_loader,
        loss_fn=loss_fn,
        epochs=epochs,
        val_loader=val_loader,
        metric=metric,
        eval_fn=eval_fn,
        optimizer_cls=optimizer_cls,
        device=device,
        on_epoch_end=report,
    )


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
) -> dict[int, ConfigResult]:
    """Train K x N configs as K Ray Tune trials of N models each; merge per-config results.

    ``make_model(config)`` builds a model; the config entries the optimizer accepts
    (``lr``, ``weight_decay``, ...) become its per-model hyper-parameters, exactly as in
    :func:`modelbatch.integrations.sweeping.sweep` (which is the one-device version of this).
    ``make_model``, the loaders and ``eval_fn`` are shipped to the workers, so they must
    be picklable (module-level functions of an importable module, not lambdas in tests).

    Args:
        make_model: ``make_model(config) -> nn.Module``.
        configs: the K x N configs.
        models_per_trial: N, configs trained together in one Tune trial.
        train_loader, loss_fn, epochs, val_loader, metric, eval_fn, optimizer_cls: as for
            :func:`~modelbatch.integrations.sweeping.train_bundle`.
        mode: ``"min"`` or ``"max"`` for ``metric`` (default: ``min`` for loss, ``max`` for
            accuracy); Tune's own ``metric`` is ``best_<metric>`` of each bundle.
        resources_per_trial: Ray resources of one trial, default ``{"cpu": 1}``; use
            ``{"cpu": 4, "gpu": 1}`` to give each bundle its own GPU (see
            :func:`trial_resources`: ``num_gpus`` is read as ``gpu``, unknown keys are refused).
        max_concurrent_trials: limit on trials running at once.
        storage_path, name: where Tune writes its results (default: Tune's default).
        verbose: Tune's verbosity (0 = silent).

    Returns:
        ``{config index: ConfigResult}`` for every config, in the order of ``configs``.

    Raises:
        RuntimeError: a trial failed (the message names its configs).
    """
    require("ray", "ray")
    tune = require("ray.tune", "ray")
    mode = _default_mode(metric, mode)
    resources = trial_resources(resources_per_trial)
    cfgs = [dict(c) for c in configs]
    if not cfgs:
        raise ValueError("tune_bundles needs at least one config")
    bundles = make_bundles(cfgs, make_model, models_per_trial)
    trainable = tune.with_parameters(
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
    )
    # ray.tune.RunConfig since Ray 2.41; ray.train.RunConfig before.
    run_config_cls = getattr(tune, "RunConfig", None) or require("ray.train", "ray").RunConfig
    tuner = tune.Tuner(
        tune.with_resources(trainable, resources),
        param_space={"bundle": tune.grid_search(list(range(len(bundles))))},
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
    out: dict[int, ConfigResult] = {}
    for result in grid:
        b = int(result.config["bundle"])
        if result.error is not None:
            raise RuntimeError(
                f"the Ray Tune trial for bundle {b} (configs {bundles[b]}) failed: {result.error}"
            ) from result.error
        payload = json.loads(result.metrics[RESULTS_KEY])
        for key, data in payload.items():
            i = int(key)
            out[i] = ConfigResult(
                config=cfgs[i],
                value=_float(data["value"]),
                history=[_float(v) for v in data["history"]],
                train_loss=[_float(v) for v in data["train_loss"]],
                status=str(data["status"]),
            )
    missing = [i for i in range(len(cfgs)) if i not in out]
    if missing:
        raise RuntimeError(f"no results came back for configs {missing}")
    return {i: out[i] for i in range(len(cfgs))}
