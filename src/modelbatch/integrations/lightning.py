"""PyTorch Lightning integration: a ready ``LightningModule`` that trains a whole ModelBatch.

``BatchLightningModule(batch, loss_fn, optimizer=...)`` runs the N models' forward and backward
passes as one vectorised step, logs every model's metrics under its own name
(``train/loss/model_7``, ``val/acc/model_7``), returns the vectorised optimizer and stock LR
schedulers from ``configure_optimizers`` and clips gradients per model. The ModelBatch is a
submodule, so Lightning checkpoints hold every model and the optimizer state of all of them.

Needs ``lightning`` (or the older ``pytorch_lightning``): ``pip install -e '.[lightning]'``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from types import ModuleType
from typing import Any, cast

import torch
from torch import Tensor

from modelbatch.core import ModelBatch
from modelbatch.integrations import require
from modelbatch.integrations._common import (
    MetricFn,
    clip_grad_norm_per_model,
    clip_grad_value_per_model,
    per_model_key,
    per_model_metrics,
)
from modelbatch.loss import resolve_per_model_targets
from modelbatch.optim.factory import OptimizerFactory

__all__ = ["BatchLightningModule", "PerModelEarlyStopping"]


def _import_lightning() -> ModuleType:
    try:
        return require("lightning.pytorch", "lightning")
    except ImportError as err:
        try:
            return importlib.import_module("pytorch_lightning")
        except ImportError:
            raise err from None


pl = _import_lightning()

OptimizerSpec = (
    torch.optim.Optimizer
    | OptimizerFactory
    | type[torch.optim.Optimizer]
    | Callable[[ModelBatch], torch.optim.Optimizer]
)
SchedulerSpec = Callable[[torch.optim.Optimizer], Any]


def _infer_per_model_targets(
    outputs: Tensor, targets: Tensor, per_model_targets: bool | None = None
) -> bool:
    """The targets rule of :meth:`ModelBatch.compute_loss`, for the per-model metrics too:
    ``[B, ...]`` shared, ``[N, B, ...]`` per model, an error when ambiguous (see
    :func:`modelbatch.loss.resolve_per_model_targets`)."""
    return resolve_per_model_targets(outputs, targets, per_model_targets)


def _is_torchmetric(obj: Any) -> bool:
    """Whether ``obj`` is a ``torchmetrics.Metric`` (without importing torchmetrics)."""
    return any(
        c.__name__ == "Metric" and c.__module__.startswith("torchmetrics")
        for c in type(obj).__mro__
    )


def _mean_of_healthy(values: Tensor, active: Tensor) -> Tensor:
    """Mean of ``values [N]`` over the active models whose value is finite (nan if none)."""
    values = values.detach().float()
    keep = torch.isfinite(values) & active.to(values.device)
    return torch.where(keep, values, 0.0).sum() / keep.sum()


class BatchLightningModule(pl.LightningModule):  # type: ignore[misc,name-defined]
    """A ``LightningModule`` that trains every model of a :class:`~modelbatch.ModelBatch` at once.

    Each data batch ``(x, y)`` or ``(x, y, mask)`` is shared by all N models (``x`` is
    ``[B, ...]``; with ``per_model=True`` it is ``[N, B, ...]``). The training step returns the
    sum of the per-model losses, so every model gets exactly the gradient it would get training
    alone; Lightning's automatic optimization then steps the vectorised optimizer.

    Logged per model (``<id>`` is the model id, stable when models are dropped):
    ``train/loss/model_<id>`` (epoch mean; also per step with ``log_per_model_on_step``),
    ``val/loss/model_<id>``, ``val/<metric>/model_<id>`` (and ``test/...``), plus the mean over
    models as ``train/loss``, ``val/loss``, ``val/<metric>`` (over the active models with a
    finite value, so a diverged or quarantined model does not stop ``EarlyStopping``). To
    remove models mid-fit (from a callback), call :meth:`drop`; for per-model early stopping
    with each model's best weights kept, add :class:`PerModelEarlyStopping` to the trainer.
    Each model's learning rate is logged as ``lr/model_<id>`` after every training epoch.
    ``optimizer`` may be left out for inference, e.g. with ``load_from_checkpoint(path,
    batch=ModelBatch(models), loss_fn=...)``.

    Args:
        batch: the ModelBatch to train.
        loss_fn: a single-model loss ``loss_fn(output [B, ...], target [B, ...]) -> scalar``,
            e.g. ``torch.nn.functional.cross_entropy``.
        optimizer: a ``modelbatch.optim`` optimizer built on ``batch``, an
            :class:`~modelbatch.OptimizerFactory`, an optimizer class (``torch.optim.Adam`` maps
            to the vectorised :class:`modelbatch.optim.Adam` with default hyper-parameters), or a
            callable ``batch -> optimizer`` such as
            ``functools.partial(modelbatch.optim.SGD, lr=[0.1, 0.01])``. Default: the optimizer
            the batch was built with (``ModelBatch(models, lr=..., optimizer_cls=...)``).
        scheduler: optional callable ``optimizer -> scheduler`` returning a stock
            ``torch.optim.lr_scheduler`` scheduler (it drives each model's own learning rate,
            since ``param_groups[i]`` is model i) or a full Lightning ``lr_scheduler`` dict.
        metrics: name -> single-model metric ``fn(output [B, ...], target [B, ...]) -> scalar``,
            computed for every model in validation and test; or a ``torchmetrics.Metric``
            object, cloned once per model (each accumulates its own model's state over the
            epoch; logged as ``<stage>/<name>/model_<id>``).
        per_model: whether inputs carry a leading model dimension ``[N, B, ...]``.
        per_model_targets: whether targets carry a leading model dimension; ``None`` infers it
            as :meth:`ModelBatch.compute_loss` does.
        scheduler_interval: ``"epoch"`` or ``"step"``: when Lightning steps the scheduler.
        log_per_model_on_step: also log every model's training loss at every step (N scalars
            per step; off by default, the per-model epoch means are always logged).

    Gradient clipping (``Trainer(gradient_clip_val=...)``) is applied per model: each model's
    gradients are clipped by its own norm, as if it were trained alone. ``precision="16-mixed"``
    on a GPU is refused: its ``GradScaler`` cannot see the stacked parameters and would skip the
    step of all N models when one overflows; use ``"bf16-mixed"`` or ``"32-true"``.
    """

    def __init__(
        self,
        batch: ModelBatch,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        optimizer: OptimizerSpec | None = None,
        scheduler: SchedulerSpec | None = None,
        *,
        metrics: Mapping[str, MetricFn] | None = None,
        per_model: bool = False,
        per_model_targets: bool | None = None,
        scheduler_interval: str = "epoch",
        log_per_model_on_step: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(batch, ModelBatch):
            raise TypeError(f"batch must be a ModelBatch, got {type(batch).__name__}")
        if scheduler_interval not in ("epoch", "step"):
            raise ValueError(
                f"scheduler_interval must be 'epoch' or 'step', got {scheduler_interval!r}"
            )
        self.model_batch = batch
        self.loss_fn = loss_fn
        self.optimizer_spec = optimizer
        self.scheduler_spec = scheduler
        self.metric_fns: dict[str, MetricFn] = {}
        # torchmetrics Metric objects: one clone per model and stage, keyed by model id.
        self.metric_objects = torch.nn.ModuleDict()
        for name, metric in dict(metrics or {}).items():
            if _is_torchmetric(metric):
                self.metric_objects[name] = torch.nn.ModuleDict(
                    {
                        stage: torch.nn.ModuleDict(
                            {str(mid): cast(Any, metric).clone() for mid in batch.model_ids}
                        )
                        for stage in ("val", "test")
                    }
                )
            else:
                self.metric_fns[name] = metric
        self.per_model = per_model
        self.per_model_targets = per_model_targets
        self.scheduler_interval = scheduler_interval
        self.log_per_model_on_step = log_per_model_on_step
        self.last_grad_norms: Tensor | None = None

    # ------------------------------------------------------------------ forward & steps
    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        """Run all N models: ``[B, ...] -> [N, B, ...]`` (see :meth:`ModelBatch.forward`)."""
        kwargs.setdefault("per_model", self.per_model)
        return self.model_batch(*inputs, **kwargs)

    @staticmethod
    def _inputs(x: Any) -> tuple[Any, ...]:
        return tuple(x) if isinstance(x, (tuple, list)) else (x,)

    def _unpack(self, data: Any) -> tuple[tuple[Any, ...], Tensor, Tensor | None]:
        if isinstance(data, Mapping):
            x, y, mask = data["x"], data["y"], data.get("mask")
        elif isinstance(data, (tuple, list)) and len(data) in (2, 3):
            x, y = data[0], data[1]
            mask = data[2] if len(data) == 3 else None
        else:
            raise ValueError(
                "BatchLightningModule expects each data batch to be (x, y), (x, y, mask) or a "
                f"dict with keys 'x', 'y' (and 'mask'), got {type(data).__name__}"
            )
        return self._inputs(x), y, mask

    def _losses(self, outputs: Tensor, y: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        total = self.model_batch.compute_loss(
            outputs, y, self.loss_fn, mask, per_model_targets=self.per_model_targets
        )
        assert self.model_batch.latest_losses is not None
        return total, self.model_batch.latest_losses

    def _log_per_model(
        self, stage: str, values: Mapping[str, Tensor], batch_size: int, on_step: bool
    ) -> None:
        ids = self.model_batch.model_ids
        logs: dict[str, Tensor] = {}
        for name, per_model in values.items():
            for i, mid in enumerate(ids):
                logs[per_model_key(f"{stage}/{name}", mid)] = per_model[i]
        self.log_dict(logs, on_step=on_step, on_epoch=True, batch_size=batch_size)
        # The means skip quarantined models and non-finite values: one diverged model must not
        # turn ``val/loss`` into nan (EarlyStopping and ModelCheckpoint monitor these means).
        active = self.model_batch.active
        means = {f"{stage}/{name}": _mean_of_healthy(v, active) for name, v in values.items()}
        self.log_dict(
            means, on_step=stage == "train", on_epoch=True, prog_bar=True, batch_size=batch_size
        )

    def training_step(self, data: Any, batch_idx: int) -> Tensor:
        """Forward all models, return the summed per-model loss, log each model's loss."""
        inputs, y, mask = self._unpack(data)
        outputs = self.model_batch(*inputs, per_model=self.per_model)
        total, losses = self._losses(outputs, y, mask)
        self._log_per_model("train", {"loss": losses}, outputs.shape[1], self.log_per_model_on_step)
        return total

    def _eval_step(self, stage: str, data: Any) -> Tensor:
        inputs, y, mask = self._unpack(data)
        outputs = self.model_batch(*inputs, per_model=self.per_model)
        previous = self.model_batch.latest_losses  # keep the training losses for metrics()
        total, losses = self._losses(outputs, y, mask)
        self.model_batch.latest_losses = previous
        values = {"loss": losses}
        if self.metric_fns:
            pmt = _infer_per_model_targets(outputs, y, self.per_model_targets)
            values.update(per_model_metrics(outputs, y, self.metric_fns, per_model_targets=pmt))
        self._log_per_model(stage, values, outputs.shape[1], on_step=False)
        if len(self.metric_objects):
            self._update_metric_objects(stage, outputs, y)
        return total

    def _update_metric_objects(self, stage: str, outputs: Tensor, y: Tensor) -> None:
        """Update each model's own torchmetrics object and log it as
        ``<stage>/<name>/model_<id>`` (Lightning computes and resets it each epoch)."""
        pmt = self.per_model_targets
        if pmt is None:
            pmt = _infer_per_model_targets(outputs, y)
        for name, per_stage in self.metric_objects.items():
            objects = cast(Any, per_stage)[stage]
            for i, mid in enumerate(self.model_batch.model_ids):
                metric = objects[str(mid)]
                metric.update(outputs[i].detach(), y[i] if pmt else y)
                self.log(per_model_key(f"{stage}/{name}", mid), metric, on_step=False,
                         on_epoch=True, batch_size=outputs.shape[1])

    def validation_step(self, data: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Per-model loss and metrics on a validation batch (logged as epoch means; with
        several validation loaders Lightning appends ``/dataloader_idx_<k>`` to the keys)."""
        return self._eval_step("val", data)

    def test_step(self, data: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Per-model loss and metrics on a test batch (logged as epoch means)."""
        return self._eval_step("test", data)

    def predict_step(self, data: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """``[N, B, ...]`` outputs of all models; ``data`` is ``x``, ``(x, ...)`` or a dict
        with key ``"x"`` (a tuple ``x`` holds several inputs), as in :meth:`training_step`."""
        if isinstance(data, Mapping):
            x = data["x"]
        elif isinstance(data, (tuple, list)):
            x = data[0]
        else:
            x = data
        return self.model_batch(*self._inputs(x), per_model=self.per_model)

    # ------------------------------------------------------------------ models
    def drop(self, ids: int | str | Sequence[int | str]) -> None:
        """Remove models (by id) mid-fit, e.g. from a callback, so later steps cost less.

        Calls :meth:`ModelBatch.drop` with the LR schedulers the trainer holds, so their
        per-model lists (``base_lrs``, ...) shrink with the optimizer's param groups. Calling
        ``module.model_batch.drop(ids)`` directly would leave them at the old length and give
        the remaining models other models' schedules.
        """
        trainer = self._trainer
        configs = trainer.lr_scheduler_configs if trainer is not None else []
        self.model_batch.drop(ids, schedulers=[c.scheduler for c in configs])

    # ------------------------------------------------------------------ optimization
    def _build_optimizer(self) -> torch.optim.Optimizer:
        spec = self.optimizer_spec
        if spec is None:
            if self.model_batch.optimizer is None:
                raise ValueError(
                    "no optimizer to train with: pass optimizer= (e.g. functools.partial("
                    "modelbatch.optim.Adam, lr=1e-3)) or build the batch with ModelBatch(models, "
                    "lr=..., optimizer_cls=...). (Without one the module still validates, tests "
                    "and predicts, e.g. after load_from_checkpoint.)"
                )
            return self.model_batch.optimizer
        if isinstance(spec, torch.optim.Optimizer):
            return spec
        if isinstance(spec, OptimizerFactory):
            return spec.build(self.model_batch)
        if isinstance(spec, type) and issubclass(spec, torch.optim.Optimizer):
            return OptimizerFactory(spec).build(self.model_batch)
        if callable(spec):
            opt = cast(Callable[[ModelBatch], Any], spec)(self.model_batch)
            if not isinstance(opt, torch.optim.Optimizer):
                raise TypeError(
                    f"the optimizer callable returned {type(opt).__name__}, not an optimizer"
                )
            return opt
        raise TypeError(f"cannot build an optimizer from {spec!r}")

    def configure_optimizers(self) -> Any:
        """The vectorised optimizer and, if given, the LR scheduler built on it."""
        optimizer = self._build_optimizer()
        if self.scheduler_spec is None:
            return optimizer
        scheduler = self.scheduler_spec(optimizer)
        config = (
            dict(scheduler)
            if isinstance(scheduler, Mapping)
            else {"scheduler": scheduler, "interval": self.scheduler_interval}
        )
        return {"optimizer": optimizer, "lr_scheduler": config}

    def clip_gradients(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip each model's gradients by its own norm (or value), never by a global norm.

        Called by Lightning for ``Trainer(gradient_clip_val=..., gradient_clip_algorithm=...)``;
        may also be called by hand. The pre-clip ``[N]`` norms are kept in
        :attr:`last_grad_norms`.
        """
        trainer = self._trainer
        if gradient_clip_val is None:
            gradient_clip_val = (trainer.gradient_clip_val if trainer is not None else None) or 0.0
        algo: Any = gradient_clip_algorithm
        if algo is None:
            algo = (trainer.gradient_clip_algorithm if trainer is not None else None) or "norm"
        algo = str(getattr(algo, "value", algo)).lower()
        if algo not in ("norm", "value"):
            raise ValueError(f"gradient_clip_algorithm must be 'norm' or 'value', got {algo!r}")
        if gradient_clip_val <= 0:
            return
        if algo == "norm":
            norms = clip_grad_norm_per_model(self.model_batch, float(gradient_clip_val))
            self.last_grad_norms = norms
        else:
            clip_grad_value_per_model(self.model_batch, float(gradient_clip_val))

    def on_train_epoch_end(self) -> None:
        """Log each model's current learning rate as ``lr/model_<id>``."""
        trainer = self._trainer
        if trainer is None or not trainer.optimizers:
            return
        seen: dict[Any, float] = {}
        for group in trainer.optimizers[0].param_groups:
            mid = group.get("model_id")
            if mid is not None and mid not in seen and "lr" in group:
                seen[mid] = float(group["lr"])
        if seen:
            self.log_dict({per_model_key("lr", mid): v for mid, v in seen.items()},
                          on_step=False, on_epoch=True)

    def on_fit_start(self) -> None:
        """Refuse set-ups that would silently couple the models."""
        plugin = getattr(self.trainer, "precision_plugin", None)
        if getattr(plugin, "scaler", None) is not None:
            raise RuntimeError(
                "BatchLightningModule cannot train with a gradient scaler (precision='16-mixed' "
                "on a GPU): torch's GradScaler finds no parameters in the vectorised optimizer's "
                "per-model param_groups, and would skip the step of all N models whenever one "
                "model's gradients overflow. Use precision='bf16-mixed' or '32-true'."
            )
        if self.automatic_optimization and len(self.trainer.optimizers) > 1:
            raise RuntimeError("BatchLightningModule supports exactly one optimizer")

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the model ids next to the weights (the stacked order of the models)."""
        checkpoint["modelbatch"] = {"model_ids": list(self.model_batch.model_ids)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check that the checkpoint holds the same models, in the same order."""
        saved = checkpoint.get("modelbatch", {}).get("model_ids")
        if saved is not None and list(saved) != self.model_batch.model_ids:
            raise ValueError(
                f"the checkpoint holds models {list(saved)}, but this module's batch holds "
                f"{self.model_batch.model_ids}"
            )

    def per_model_logged(
        self, stage: str, name: str, dataloader_idx: int | None = None
    ) -> dict[int | str, float]:
        """``{model_id: value}`` of ``<stage>/<name>/model_<id>`` from the trainer's latest
        logged metrics (e.g. ``per_model_logged("val", "acc")`` after ``trainer.validate``);
        ``dataloader_idx`` picks one of several validation or test loaders."""
        metrics = self.trainer.callback_metrics
        suffix = "" if dataloader_idx is None else f"/dataloader_idx_{dataloader_idx}"
        out: dict[int | str, float] = {}
        for mid in self.model_batch.model_ids:
            key = f"{stage}/{name}/model_{mid}{suffix}"
            if key not in metrics:
                raise KeyError(f"{key!r} was not logged; logged keys: {sorted(metrics)}")
            out[mid] = float(metrics[key])
        return out


class PerModelEarlyStopping(pl.Callback):  # type: ignore[misc,name-defined]
    """Per-model early stopping and best-weight checkpointing for :class:`BatchLightningModule`.

    After every validation it reads each model's own ``<monitor>/model_<id>`` (e.g.
    ``val/loss/model_3``), keeps each model's best weights (in host memory, or with
    ``dirpath`` as ``<dirpath>/<id>.safetensors``, the model's plain state dict) and stops a
    model that has not improved for ``patience`` validations: quarantined (frozen, still in
    the batch) or dropped from the batch (later steps cost less). When every model has
    stopped, the trainer stops. A :class:`modelbatch.EarlyStopping` does the work.

    Args:
        monitor: the logged metric without its ``/model_<id>`` suffix, e.g. ``"val/loss"``.
        mode: ``"min"`` or ``"max"``.
        patience: validations without improvement before a model stops.
        min_delta: smallest change that counts as an improvement.
        action: ``"quarantine"`` or ``"drop"``.
        dirpath: write each model's best weights there instead of keeping them in memory.

    Attributes:
        best_values: ``{model id: best value}``.
        stopped: the model ids stopped so far, in order.
    """

    def __init__(
        self,
        monitor: str = "val/loss",
        mode: str = "min",
        patience: int = 3,
        min_delta: float = 0.0,
        *,
        action: str = "quarantine",
        dirpath: str | None = None,
    ) -> None:
        from modelbatch.callbacks import EarlyStopping

        self.monitor = monitor
        self.early_stopping = EarlyStopping(
            monitor, mode, patience, min_delta, action=action, directory=dirpath
        )
        self.pack: Any = None
        self.stopped: list[int | str] = []
        self._restored: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        """Each model's best value, patience counter and (in memory) best weights, and the
        stopped ids: saved in Lightning checkpoints, so a resumed fit stops the same models
        at the same validations."""
        if self.pack is None:
            return dict(self._restored or {})
        return {"early_stopping": self.early_stopping.state_dict(), "stopped": list(self.stopped)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (applied at the first validation of the resumed fit)."""
        self._restored = dict(state_dict) if state_dict else None
        self.pack = None

    @property
    def best_values(self) -> dict[int | str, float]:
        """``{model id: best value of the monitored metric}``."""
        return dict(self.early_stopping.best_values)

    def best_state(self, model_id: int | str) -> dict[str, Tensor]:
        """Model ``model_id``'s state dict at its best validation (CPU)."""
        return self.early_stopping.best_state(model_id)

    def best_model(self, model_id: int | str) -> torch.nn.Module:
        """Model ``model_id`` as a plain ``nn.Module`` with its best weights."""
        return self.early_stopping.best_model(model_id)

    def _pack(self, pl_module: BatchLightningModule, trainer: Any) -> Any:
        from modelbatch.callbacks import CallbackPack

        if self.pack is None or self.pack.batch is not pl_module.model_batch:
            self.pack = CallbackPack(pl_module.model_batch, [self.early_stopping])
            if self._restored is not None:
                self.early_stopping.load_state_dict(self._restored["early_stopping"])
                self.stopped = list(self._restored["stopped"])
                self._restored = None
        self.pack.schedulers = [c.scheduler for c in trainer.lr_scheduler_configs]
        return self.pack

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        """Feed each model's monitored value to the early stopping; stop the trainer when
        every model has stopped."""
        if trainer.sanity_checking:
            return
        if not isinstance(pl_module, BatchLightningModule):
            raise TypeError("PerModelEarlyStopping needs a BatchLightningModule")
        pack = self._pack(pl_module, trainer)
        metrics = trainer.callback_metrics
        values = []
        for mid in pl_module.model_batch.model_ids:
            key = per_model_key(self.monitor, mid)
            if key not in metrics:
                raise KeyError(f"PerModelEarlyStopping monitors {key!r}, which was not logged; "
                               f"logged: {sorted(metrics)}")
            values.append(float(metrics[key]))
        before = len(pack.events)
        pack.on_validation_end({self.monitor: torch.tensor(values, dtype=torch.float64)})
        self.stopped.extend(e["model_id"] for e in pack.events[before:])
        if pack.should_stop:
            trainer.should_stop = True
