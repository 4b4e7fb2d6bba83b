"""Per-model metric loggers: CSV, JSON Lines, TensorBoard and Weights & Biases.

A logger is anything with ``log(metrics, step)`` and ``close()`` (:class:`BatchLogger`), where
``metrics`` is what :meth:`ModelBatch.metrics` returns: one dict per model with its
``model_id``, ``index``, ``active`` flag, ``loss`` and every metric recorded with
:meth:`ModelBatch.log_metric`. Loggers key everything by the stable ``model_id``, never by
position, so models can be dropped from the batch mid-run.

CSV and JSONL need nothing beyond the standard library; TensorBoard needs
``modelbatch[tensorboard]`` and W&B ``modelbatch[wandb]``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from modelbatch.integrations import require
from modelbatch.integrations._common import per_model_key

if TYPE_CHECKING:
    from modelbatch.core import ModelBatch

__all__ = [
    "BatchLogger",
    "CSVLogger",
    "JSONLLogger",
    "TensorBoardLogger",
    "WandbLogger",
    "log_batch_metrics",
    "per_model_lrs",
    "scalar_metrics",
]

# The W&B key holding the caller's step (the x-axis of every chart of a WandbLogger run).
STEP_KEY = "step"

# Keys of a ModelBatch.metrics() row that identify the model rather than measure it.
_ID_KEYS = ("model_id", "index")


@runtime_checkable
class BatchLogger(Protocol):
    """What ModelBatch expects of a logger."""

    def log(self, metrics: list[dict[str, Any]], step: int) -> None:
        """Record one row per model (``ModelBatch.metrics()``) at ``step``."""

    def close(self) -> None:
        """Flush and release files or runs."""


def scalar_metrics(row: Mapping[str, Any]) -> dict[str, float]:
    """The numeric metrics of one ``ModelBatch.metrics()`` row, as floats.

    ``model_id`` and ``index`` are left out (the id names the series; the position is not
    stable); ``active`` becomes 1.0 / 0.0; non-numeric values are skipped.
    """
    out: dict[str, float] = {}
    for key, value in row.items():
        if key in _ID_KEYS:
            continue
        if isinstance(value, (bool, int, float)):
            out[key] = float(value)
    return out


def log_batch_metrics(
    logger: BatchLogger, batch: ModelBatch, step: int, optimizer: Any | None = None
) -> None:
    """Log ``batch.metrics()`` (one row per model) to ``logger`` at ``step``; with the
    batch's ``optimizer``, each row also gets that model's learning rate as ``lr``."""
    rows = batch.metrics()
    if optimizer is not None:
        lrs = per_model_lrs(optimizer)
        for row in rows:
            if row["model_id"] in lrs:
                row["lr"] = lrs[row["model_id"]]
    logger.log(rows, step)


def per_model_lrs(optimizer: Any) -> dict[int | str, float]:
    """``{model id: learning rate}`` from a batch optimizer's param groups (each carries
    its ``model_id``; the first group of a model wins)."""
    out: dict[int | str, float] = {}
    for group in optimizer.param_groups:
        mid = group.get("model_id")
        if mid is not None and mid not in out and "lr" in group:
            out[mid] = float(group["lr"])
    return out


def _check_rows(metrics: Sequence[Mapping[str, Any]]) -> None:
    for i, row in enumerate(metrics):
        if "model_id" not in row:
            raise ValueError(
                f"metrics row {i} has no 'model_id'; pass ModelBatch.metrics() "
                f"(one dict per model), got keys {sorted(row)}"
            )


class _FileLogger:
    """Shared open/close/context-manager logic of the file loggers."""

    def __init__(self, path: str | os.PathLike[str], append: bool) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        existed = self.path.exists() and self.path.stat().st_size > 0
        self._file = open(self.path, "a" if append else "w", newline="", encoding="utf-8")  # noqa: SIM115
        self._resumed = append and existed

    def close(self) -> None:
        """Flush and close the file (idempotent)."""
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> _FileLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CSVLogger(_FileLogger):
    """Write metrics to a CSV file in long format: ``step,model_id,metric,value``.

    One line per (step, model, metric). The long format needs no fixed set of columns, so
    models can be dropped or metrics added mid-run; load it with e.g.
    ``pandas.read_csv(path).pivot_table(index="step", columns=["metric", "model_id"])``.

    Args:
        path: the file to write (parent folders are created).
        append: add to an existing file instead of overwriting it (the header is written
            only when the file is new or empty).
    """

    columns = ("step", "model_id", "metric", "value")

    def __init__(self, path: str | os.PathLike[str], *, append: bool = False) -> None:
        super().__init__(path, append)
        self._writer = csv.writer(self._file)
        if not self._resumed:
            self._writer.writerow(self.columns)

    def log(self, metrics: list[dict[str, Any]], step: int) -> None:
        """Append one line per model and metric, then flush."""
        _check_rows(metrics)
        for row in metrics:
            for name, value in scalar_metrics(row).items():
                self._writer.writerow((int(step), row["model_id"], name, repr(value)))
        self._file.flush()


class JSONLLogger(_FileLogger):
    """Write metrics as JSON Lines: one object per model and step.

    Each line is ``{"step": 3, "model_id": 7, "active": true, "loss": 0.41, ...}``.
    Non-finite floats (a diverged model's ``nan`` loss) are written as ``null`` so every
    line is strict JSON.

    Args:
        path: the file to write (parent folders are created).
        append: add to an existing file instead of overwriting it.
    """

    def __init__(self, path: str | os.PathLike[str], *, append: bool = False) -> None:
        super().__init__(path, append)

    def log(self, metrics: list[dict[str, Any]], step: int) -> None:
        """Append one line per model, then flush."""
        _check_rows(metrics)
        for row in metrics:
            record: dict[str, Any] = {"step": int(step), "model_id": row["model_id"]}
            for key, value in row.items():
                if key in _ID_KEYS:
                    continue
                if isinstance(value, float) and not math.isfinite(value):
                    value = None
                record[key] = value
            self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()


def _tag(metric: str, model_id: int | str) -> str:
    return per_model_key(metric, model_id)


class TensorBoardLogger:
    """Per-model scalars in ONE TensorBoard run, tagged ``<metric>/model_<id>``.

    TensorBoard groups tags by their prefix, so each metric gets one section holding a
    curve per model (e.g. ``loss/model_0`` ... ``loss/model_31``). Needs
    ``modelbatch[tensorboard]``.

    Args:
        log_dir: the run's folder (what ``tensorboard --logdir`` points at or below).
        metrics: only log these metric names (default: every numeric metric).
        **writer_kwargs: passed to :class:`torch.utils.tensorboard.SummaryWriter`.
    """

    def __init__(
        self,
        log_dir: str | os.PathLike[str],
        *,
        metrics: Sequence[str] | None = None,
        **writer_kwargs: Any,
    ) -> None:
        require("tensorboard", "tensorboard")
        tb = require("torch.utils.tensorboard", "tensorboard")
        self.log_dir = str(log_dir)
        self.metrics = None if metrics is None else set(metrics)
        self.writer = tb.SummaryWriter(log_dir=self.log_dir, **writer_kwargs)

    def log(self, metrics: list[dict[str, Any]], step: int) -> None:
        """Add one scalar per model and metric at ``step``."""
        _check_rows(metrics)
        for row in metrics:
            for name, value in scalar_metrics(row).items():
                if self.metrics is None or name in self.metrics:
                    self.writer.add_scalar(_tag(name, row["model_id"]), value, global_step=step)

    def log_hparams(
        self,
        hparams: Mapping[int | str, Mapping[str, Any]],
        metrics: Mapping[int | str, Mapping[str, float]],
    ) -> None:
        """Fill TensorBoard's HParams dashboard: one entry per model (a sub-run
        ``model_<id>`` of this run) with its hyper-parameters and final metrics, so the
        sweep can be sorted, filtered and plotted there.

        Args:
            hparams: ``{model id: {name: value}}`` (numbers, strings, bools; others as
                their ``repr``).
            metrics: ``{model id: {name: value}}``, e.g. the final and best objective.
        """
        for mid, hp in hparams.items():
            clean = {
                k: v if isinstance(v, (int, float, str, bool)) else repr(v) for k, v in hp.items()
            }
            values = {f"hparam/{k}": float(v) for k, v in metrics.get(mid, {}).items()}
            self.writer.add_hparams(clean, values, run_name=f"model_{mid}")

    def flush(self) -> None:
        """Write pending events to disk."""
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()

    def __enter__(self) -> TensorBoardLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class WandbLogger:
    """Log per-model metrics to Weights & Biases: one run, or one run per model in a group.

    With ``per_model_runs=False`` (default) a single run receives keys
    ``<metric>/model_<id>``, so the W&B workspace shows one panel per metric with a line per
    model. With ``per_model_runs=True`` each model gets its own run (named
    ``<name>-model_<id>``, plain ``<metric>`` keys) in the W&B group ``group``, so runs can
    be filtered, compared and grouped in the UI like ordinary sweep runs; a run is started
    the first time its model is logged and finished by :meth:`close`. The ``step`` passed to
    :meth:`log` is logged as the key ``step``, the x-axis of every chart (W&B's own ``_step``
    counts the calls), so steps may repeat or go back without W&B dropping the data. Needs
    ``modelbatch[wandb]``; per-model runs need wandb >= 0.19.10 (several live runs in one
    process).

    Args:
        project: W&B project.
        name: run name (prefix of the per-model run names).
        group: W&B group (default for per-model runs: ``name`` or a generated name).
        mode: ``"online"``, ``"offline"`` or ``"disabled"`` (default: W&B's own setting).
        dir: folder for W&B's local files (default: W&B's own setting, e.g. ``WANDB_DIR``).
        config: run config; with per-model runs, shared by all runs.
        model_configs: per-model run configs keyed by model id (merged over ``config``), e.g.
            each model's hyper-parameters.
        per_model_runs: one run per model instead of one run for the batch.
        **init_kwargs: further keyword arguments of :func:`wandb.init`.
    """

    def __init__(
        self,
        project: str | None = None,
        *,
        name: str | None = None,
        group: str | None = None,
        mode: str | None = None,
        dir: str | os.PathLike[str] | None = None,
        config: Mapping[str, Any] | None = None,
        model_configs: Mapping[int | str, Mapping[str, Any]] | None = None,
        per_model_runs: bool = False,
        **init_kwargs: Any,
    ) -> None:
        self._wandb = require("wandb", "wandb")
        self.per_model_runs = per_model_runs
        self.name = name
        if per_model_runs and group is None:
            group = name or f"modelbatch-{uuid.uuid4().hex[:8]}"
        self.group = group
        self._model_configs = {k: dict(v) for k, v in (model_configs or {}).items()}
        self._init_kwargs: dict[str, Any] = dict(init_kwargs)
        for key, value in (
            ("project", project),
            ("group", group),
            ("mode", mode),
            ("dir", None if dir is None else str(dir)),
        ):
            if value is not None:
                self._init_kwargs[key] = value
        self._config = dict(config or {})
        self.run: Any = None
        self.runs: dict[int | str, Any] = {}
        if not per_model_runs:
            self.run = self._init_run(name=name, config=self._config)

    def _init_run(self, *, name: str | None, config: Mapping[str, Any]) -> Any:
        kwargs = dict(self._init_kwargs)
        if self.per_model_runs:
            kwargs.setdefault("reinit", "create_new")
        run = self._wandb.init(name=name, config=dict(config), **kwargs)
        # W&B's own step must increase: a log at an earlier step is silently dropped. The
        # caller's step goes into a "step" key that every chart uses as its x-axis instead, so
        # steps may repeat or go back (sweep() and optimize_batched() log each batch of models
        # from epoch 0 again).
        run.define_metric(STEP_KEY)
        run.define_metric("*", step_metric=STEP_KEY)
        return run

    def _model_run(self, model_id: int | str) -> Any:
        run = self.runs.get(model_id)
        if run is None:
            config = {**self._config, **self._model_configs.get(model_id, {}), "model_id": model_id}
            prefix = self.name or self.group
            run = self._init_run(name=f"{prefix}-model_{model_id}", config=config)
            self.runs[model_id] = run
        return run

    def log(self, metrics: list[dict[str, Any]], step: int) -> None:
        """Log every model's numeric metrics at ``step`` (one ``run.log`` call per run)."""
        _check_rows(metrics)
        if self.per_model_runs:
            for row in metrics:
                self._model_run(row["model_id"]).log({**scalar_metrics(row), STEP_KEY: step})
            return
        data: dict[str, float] = {}
        for row in metrics:
            for name, value in scalar_metrics(row).items():
                data[_tag(name, row["model_id"])] = value
        self.run.log({**data, STEP_KEY: step})

    def close(self) -> None:
        """Finish the run(s)."""
        if self.run is not None:
            self.run.finish()
            self.run = None
        for run in self.runs.values():
            run.finish()
        self.runs.clear()

    def __enter__(self) -> WandbLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
