"""HuggingFace ``transformers.Trainer`` integration: one ``trainer.train()`` trains N models.

:class:`BundledTrainer` is a ``transformers.Trainer`` whose ``model`` is a
:class:`~modelbatch.ModelBatch` of N structurally identical HF models (or any models that take
keyword inputs). :class:`HFTrainerMixin` holds the overrides, so they can be mixed into another
``Trainer`` subclass: ``class MyTrainer(HFTrainerMixin, SomeTrainer)``.

What changes compared with a plain ``Trainer``:

* ``create_optimizer`` builds a vectorised ``modelbatch.optim`` optimizer from the
  ``TrainingArguments`` (learning rate, weight decay, Adam betas and epsilon; weight decay is
  skipped for biases and norm weights, as the Trainer does), with optional per-model values.
  The Trainer's LR schedulers work unchanged: ``param_groups[i]`` is model i.
* ``compute_loss`` returns the sum of the N per-model losses (each model gets exactly the
  gradient it would get alone) and records each model's loss; logs gain ``loss/model_<id>``
  and ``loss`` becomes the mean over models.
* Gradient clipping (``max_grad_norm``) clips each model by its own norm, never by one
  global norm over all N models; the logged ``grad_norm`` is the mean of the per-model norms.
* ``evaluate`` (and ``predict``) returns ``eval_loss/model_<id>``, ``eval_accuracy/model_<id>`` (for
  classification labels of shape ``[B]``), every ``compute_metrics`` value per model, and
  their means over models (``eval_loss``, ...).
* ``save_model`` writes the stacked weights as ``model.safetensors`` (what a checkpoint
  resume reads), ``modelbatch.json`` (model ids) and, by default, one ``save_pretrained``
  folder per model: ``model_<id>/``.

Needs ``transformers`` and ``accelerate``: ``pip install -e '.[huggingface]'``.
"""

from __future__ import annotations

import inspect
import json
import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor

from modelbatch.core import ModelBatch
from modelbatch.integrations import require
from modelbatch.integrations._common import (
    clip_grad_norm_per_model,
    per_model_grad_norms,
    per_model_key,
)
from modelbatch.optim.adam import Adam, AdamW
from modelbatch.optim.factory import OptimizerFactory
from modelbatch.optim.sgd import SGD

transformers = require("transformers", "huggingface")
require("accelerate", "huggingface")  # the Trainer needs it as soon as it picks a device
_safetensors_torch = require("safetensors.torch", "huggingface")

__all__ = ["BundledTrainer", "HFTrainerMixin"]

# transformers.Trainer implementation-only optimizer keywords (no effect on the maths).
_IMPLEMENTATION_KWARGS = ("fused", "foreach", "capturable", "differentiable")


class _SkipDecayForSome:
    """Mix-in for a vectorised optimizer: no weight decay for the parameters named in
    ``_no_decay`` (the Trainer's exclusion of biases and norm weights)."""

    _no_decay: frozenset[str] = frozenset()
    _skip_decay = False

    def _update_param(self, name: str, p: Tensor, grad: Tensor, state: dict[str, Any]) -> None:
        self._skip_decay = name in self._no_decay
        try:
            super()._update_param(name, p, grad, state)  # type: ignore[misc]
        finally:
            self._skip_decay = False

    def any_hparam(self, name: str, predicate: Any = bool) -> bool:
        if name == "weight_decay" and self._skip_decay:
            return False
        return super().any_hparam(name, predicate)  # type: ignore[misc]


class _AdamW(_SkipDecayForSome, AdamW):
    pass


class _Adam(_SkipDecayForSome, Adam):
    pass


class _SGD(_SkipDecayForSome, SGD):
    pass


_VECTORISED = {torch.optim.AdamW: _AdamW, torch.optim.Adam: _Adam, torch.optim.SGD: _SGD}


def _first_output(outputs: Any, key: str, index: int) -> Any:
    if isinstance(outputs, Mapping):
        return outputs.get(key)
    if isinstance(outputs, (tuple, list)):
        return outputs[index] if len(outputs) > index else None
    return outputs if index == 0 else None


class HFTrainerMixin:
    """The overrides that make a ``transformers.Trainer`` train a whole ModelBatch.

    Put it first in the bases: ``class MyTrainer(HFTrainerMixin, transformers.Trainer)``.
    The trainer's ``model`` must be a :class:`~modelbatch.ModelBatch`; each data batch (a dict
    such as ``input_ids``, ``attention_mask``, ``labels``) is shared by all N models.

    Keyword arguments (on top of the Trainer's):
        per_model_hparams: per-model optimizer hyper-parameters overriding the
            ``TrainingArguments``, in the optimizer's names, each a length-N list (or a scalar):
            ``{"lr": [...], "weight_decay": [...], "betas": [(0.9, 0.999), ...], "eps": [...]}``.
        loss_fn: optional single-model loss ``loss_fn(logits [B, ...], labels [B, ...]) ->
            scalar`` used instead of the loss the models compute from ``labels``.
        save_per_model: whether ``save_model()`` also writes one ``save_pretrained`` folder
            per model (``model_<id>/``); default True.
    """

    model_batch: ModelBatch
    if TYPE_CHECKING:  # provided by transformers.Trainer
        args: Any
        state: Any
        control: Any
        model: Any
        optimizer: Any
        eval_dataset: Any
        label_names: list[str]
        compute_metrics: Any
        callback_handler: Any
        optimizer_cls_and_kwargs: Any
        _signature_columns: list[str] | None

        def get_optimizer_cls_and_kwargs(self, args: Any, model: Any) -> tuple[Any, Any]: ...
        def get_decay_parameter_names(self, model: Any) -> list[str]: ...
        def get_eval_dataloader(self, eval_dataset: Any = None) -> Any: ...
        def get_test_dataloader(self, test_dataset: Any) -> Any: ...
        def _prepare_inputs(self, inputs: Any) -> Any: ...

    def __init__(
        self,
        *args: Any,
        per_model_hparams: Mapping[str, Any] | None = None,
        loss_fn: Any | None = None,
        save_per_model: bool = True,
        **kwargs: Any,
    ) -> None:
        model = kwargs.get("model", args[0] if args else None)
        if kwargs.get("model_init") is not None:
            raise TypeError(
                f"{type(self).__name__} does not take model_init= (the Trainer would replace the "
                "ModelBatch); pass model=ModelBatch([...]), and for a hyper-parameter search use "
                "per_model_hparams= or modelbatch.integrations.optuna.optimize_batched"
            )
        if not isinstance(model, ModelBatch):
            raise TypeError(
                f"{type(self).__name__} trains a ModelBatch; got model={type(model).__name__}. "
                "Wrap your models first: ModelBatch([model_0, model_1, ...])"
            )
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError(
                "compute_loss_func= would see the outputs of all N models at once; pass a "
                "single-model loss_fn=(logits [B, ...], labels [B, ...]) -> scalar instead"
            )
        # The Trainer reads model.config when label smoothing is on, which a ModelBatch lacks:
        # set the label smoother up here, for the wrapped model (see _forward).
        training_args: Any = kwargs.get("args", args[1] if len(args) > 1 else None)
        smoothing = getattr(training_args, "label_smoothing_factor", 0.0)
        if smoothing:
            training_args.label_smoothing_factor = 0.0
        try:
            super().__init__(*args, **kwargs)
        finally:
            if smoothing:
                training_args.label_smoothing_factor = smoothing
        self.model_batch = model
        self.per_model_hparams = dict(per_model_hparams or {})
        self.loss_fn = loss_fn
        self.save_per_model = save_per_model
        self._check_supported()
        template = self._template()
        # The Trainer inspects the ModelBatch's forward, which takes **kwargs: look at the
        # wrapped model's instead (label names, columns to keep).
        if self.args.label_names is None:
            self.label_names = transformers.utils.find_labels(type(template))
        self._template_params = set(inspect.signature(template.forward).parameters)
        self.label_smoother = None
        if smoothing:
            if getattr(getattr(template, "config", None), "problem_type", None) == (
                "multi_label_classification"
            ):
                raise ValueError(
                    "label_smoothing_factor does not apply to multi-label classification"
                )
            self.label_smoother = transformers.trainer_pt_utils.LabelSmoother(epsilon=smoothing)
        # Causal LMs predict the next token: the label smoother shifts their labels.
        causal = transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        self._shift_labels = type(template).__name__ in causal.values()
        # compute_loss returns per-batch means: let the Trainer divide by the number of
        # gradient accumulation steps, as for a model that takes no loss kwargs.
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        self._train_loss_sum: Tensor | None = None
        self._train_loss_count = 0
        self._total_loss_sum: Tensor | None = None
        self._total_loss_count = 0
        self.last_grad_norms: Tensor | None = None

    # ------------------------------------------------------------------ set-up
    def _label_name(self) -> str:
        return self.label_names[0] if self.label_names else "labels"

    def _template(self) -> torch.nn.Module:
        return cast(torch.nn.Module, self.model_batch._template)

    def _check_supported(self) -> None:
        args = self.args
        if args.fp16:
            raise ValueError(
                "fp16=True uses a gradient scaler that cannot see ModelBatch's stacked "
                "parameters and would skip the step of all N models when one overflows; "
                "use bf16=True or full precision"
            )
        if getattr(self, "is_deepspeed_enabled", False) or getattr(self, "is_fsdp_enabled", False):
            raise ValueError("DeepSpeed and FSDP are not supported with a ModelBatch")
        if getattr(args, "activation_checkpointing", False) or args.gradient_checkpointing:
            raise ValueError(
                "activation_checkpointing / gradient_checkpointing is not supported: "
                "torch.utils.checkpoint cannot "
                "re-run the vectorised (vmap) forward of the N models; lower the batch size or "
                "the number of models per batch instead"
            )
        if getattr(args, "include_for_metrics", None) or getattr(args, "batch_eval_metrics", False):
            raise ValueError(
                "include_for_metrics and batch_eval_metrics are not supported: compute_metrics is "
                "called once per model with that model's predictions and the labels"
            )
        if args.n_gpu > 1:
            raise ValueError(
                "a ModelBatch trains on one device; set CUDA_VISIBLE_DEVICES to one GPU "
                f"(found n_gpu={args.n_gpu})"
            )

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            columns = list(inspect.signature(self._template().forward).parameters)
            self._signature_columns = columns + list({"label", "label_ids", *self.label_names})

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        """A vectorised optimizer from the ``TrainingArguments`` (and ``per_model_hparams``).

        ``torch.optim`` AdamW, Adam and SGD (``optim="adamw_torch"``, ``"adamw_torch_fused"``,
        ``"sgd"``, ...) get the vectorised ``modelbatch.optim`` versions, with no weight decay
        for biases and norm weights, as the Trainer does. Other optimizers run per model
        through :class:`~modelbatch.optim.PerModelOptimizer` (weight decay on every parameter).
        """
        if self.optimizer is not None:
            return self.optimizer
        args = self.args
        template = self._template()
        if self.optimizer_cls_and_kwargs is not None:
            cls, kwargs = self.optimizer_cls_and_kwargs
        else:
            cls, kwargs = self.get_optimizer_cls_and_kwargs(args, template)
        hp: dict[str, Any] = {"lr": args.learning_rate, "weight_decay": args.weight_decay}
        hp.update({k: v for k, v in kwargs.items() if k not in _IMPLEMENTATION_KWARGS})
        hp.update(self.per_model_hparams)
        vectorised = _VECTORISED.get(cls)
        if vectorised is not None:
            decay = set(self.get_decay_parameter_names(template))
            names = {name for name, _ in self.model_batch.stacked_parameters()}
            optimizer: Any = vectorised(self.model_batch, **hp)
            optimizer._no_decay = frozenset(names - decay)
        else:
            optimizer = OptimizerFactory(cls, **hp).build(self.model_batch)
        self.optimizer = optimizer
        return optimizer

    # ------------------------------------------------------------------ loss
    def _forward(
        self, model: Any, inputs: Mapping[str, Any], need_loss: bool = True
    ) -> tuple[Any, Tensor | None]:
        """``(outputs, summed loss)``; the loss is None when absent and ``need_loss`` is off."""
        inputs = dict(inputs)
        if "use_cache" in self._template_params:
            inputs.setdefault("use_cache", False)  # a KV cache object cannot leave vmap
        labels: Any = None
        smoother = self.label_smoother if self.loss_fn is None else None
        if self.loss_fn is not None:
            labels = inputs.pop(self._label_name(), None)
            if labels is None and need_loss:
                raise ValueError(f"loss_fn needs labels; the inputs hold {sorted(inputs)}")
        elif smoother is not None:
            labels = inputs.pop(self._label_name(), None)  # as the Trainer (evaluation too)
        outputs = model(**inputs)
        batch = self.model_batch
        if self.loss_fn is not None:
            if labels is None:
                return outputs, None
            logits = _first_output(outputs, "logits", 0)
            return outputs, batch.compute_loss(logits, labels, self.loss_fn)
        if smoother is not None and labels is not None:
            logits = _first_output(outputs, "logits", 0)
            losses = torch.stack(
                [
                    smoother({"logits": logits[i]}, labels, shift_labels=self._shift_labels)
                    for i in range(len(batch))
                ]
            )  # [N]: model i's label-smoothed loss, exactly as the Trainer computes it alone
            batch.latest_losses = losses.detach()
            return outputs, losses.sum()
        losses = _first_output(outputs, "loss", 0)
        if not need_loss and not (isinstance(losses, Tensor) and losses.shape == (len(batch),)):
            return outputs, None
        if not isinstance(losses, Tensor) or losses.shape != (len(batch),):
            got = "nothing" if losses is None else f"shape {tuple(getattr(losses, 'shape', ()))}"
            raise ValueError(
                f"the models returned no per-model loss (expected shape [{len(batch)}], got "
                f"{got}); pass `labels` in the inputs or give the trainer a loss_fn="
            )
        batch.latest_losses = losses.detach()
        return outputs, losses.sum()

    def compute_loss(
        self,
        model: Any,
        inputs: Mapping[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        """The sum of the N models' losses on ``inputs`` (each model's own mean loss).

        The per-model losses (``[N]``) are stored in ``model_batch.latest_losses`` and, in
        training, accumulated for the ``loss/model_<id>`` logs.
        """
        outputs, total = self._forward(model, inputs)
        assert total is not None
        losses = self.model_batch.latest_losses
        if self.model_batch.training and losses is not None:
            d = losses.double()
            if self._train_loss_sum is None or self._train_loss_sum.shape != d.shape:
                self._train_loss_sum, self._train_loss_count = torch.zeros_like(d), 0
            if self._total_loss_sum is None or self._total_loss_sum.shape != d.shape:
                self._total_loss_sum, self._total_loss_count = torch.zeros_like(d), 0
            self._train_loss_sum += d
            self._train_loss_count += 1
            self._total_loss_sum += d
            self._total_loss_count += 1
        return (total, outputs) if return_outputs else total

    # ------------------------------------------------------------------ gradient clipping
    def _clip_grad_norm(self, model: Any) -> Tensor:
        """Clip every model's gradients by its own norm; the mean pre-clip norm is logged."""
        max_norm = float(self.args.max_grad_norm)
        norms = clip_grad_norm_per_model(self.model_batch, max_norm)
        self.last_grad_norms = norms
        return norms.mean()

    def _get_grad_norm(self, model: Any, grad_norm: Any = None) -> Any:
        if grad_norm is None:
            norms = per_model_grad_norms(self.model_batch)
            self.last_grad_norms = norms
            grad_norm = norms.mean()
        return grad_norm

    # ------------------------------------------------------------------ logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add each model's training loss (``loss/model_<id>``) and learning rate
        (``learning_rate/model_<id>``); ``loss`` is the mean over models (the Trainer's own
        value would be their sum)."""
        ids = self.model_batch.model_ids
        optimizer = getattr(self, "optimizer", None)
        if "learning_rate" in logs and optimizer is not None:
            for group in optimizer.param_groups:
                mid = group.get("model_id")
                if mid is not None and per_model_key("learning_rate", mid) not in logs:
                    logs[per_model_key("learning_rate", mid)] = float(group["lr"])
        if "loss" in logs and self._train_loss_sum is not None and self._train_loss_count:
            per_model = (self._train_loss_sum / self._train_loss_count).tolist()
            for mid, v in zip(ids, per_model, strict=True):
                logs[per_model_key("loss", mid)] = v
            logs["loss"] = sum(per_model) / len(per_model)
            self._train_loss_sum.zero_()
            self._train_loss_count = 0
        if "train_loss" in logs and self._total_loss_sum is not None and self._total_loss_count:
            per_model = (self._total_loss_sum / self._total_loss_count).tolist()
            for mid, v in zip(ids, per_model, strict=True):
                logs[per_model_key("train_loss", mid)] = v
            logs["train_loss"] = sum(per_model) / len(per_model)
        super().log(logs, start_time)  # type: ignore[misc]

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``; ``training_loss`` of the result is the mean over models."""
        self._total_loss_sum, self._total_loss_count = None, 0
        self._train_loss_sum, self._train_loss_count = None, 0
        out = super().train(*args, **kwargs)  # type: ignore[misc]
        loss = out.metrics.get("train_loss", out.training_loss)
        return type(out)(out.global_step, loss, out.metrics)

    # ------------------------------------------------------------------ evaluation
    def _eval_loop(self, loader: Any, collect: bool) -> dict[str, Any]:
        """One pass over ``loader`` in eval mode: per-model loss sums, correct counts, and
        (with ``collect``) every batch's ``[N, B, ...]`` logits and labels."""
        batch = self.model_batch
        n = len(batch)
        loss_sum = torch.zeros(n, dtype=torch.float64, device=batch.device)
        correct = torch.zeros(n, dtype=torch.float64, device=batch.device)
        found: dict[str, Any] = {"count": 0, "steps": 0, "has_loss": True, "has_accuracy": True}
        logits_list: list[Tensor] = []
        labels_list: list[Tensor] = []
        was_training, previous = batch.training, batch.latest_losses
        batch.eval()
        try:
            with torch.no_grad():
                for inputs in loader:
                    inputs = self._prepare_inputs(inputs)
                    outputs, total = self._forward(self.model, inputs, need_loss=False)
                    labels = inputs.get(self._label_name())
                    # A tuple output starts with the loss when the models computed one.
                    with_loss = (
                        total is not None and self.loss_fn is None and self.label_smoother is None
                    )
                    logits = _first_output(outputs, "logits", 1 if with_loss else 0)
                    b = _batch_size(inputs, labels)
                    found["count"] += b
                    found["steps"] += 1
                    if total is None or batch.latest_losses is None:
                        found["has_loss"] = False
                    else:
                        loss_sum += batch.latest_losses.double() * b
                    if (
                        isinstance(labels, Tensor)
                        and isinstance(logits, Tensor)
                        and labels.dim() == 1
                        and logits.dim() == 3
                    ):
                        correct += (logits.argmax(-1) == labels).double().sum(dim=1)
                    else:
                        found["has_accuracy"] = False
                    if collect:
                        if not isinstance(logits, Tensor):
                            raise ValueError("the models returned no logits to collect")
                        logits = logits.detach()
                        preprocess = getattr(self, "preprocess_logits_for_metrics", None)
                        if preprocess is not None:  # per model, as the Trainer does for one
                            logits = torch.stack([preprocess(lo, labels) for lo in logits])
                        if logits.is_floating_point():
                            logits = logits.float()
                        logits_list.append(logits.cpu())
                        if isinstance(labels, Tensor):
                            labels_list.append(labels.detach().cpu())
        finally:
            batch.train(was_training)
            batch.latest_losses = previous
        count = found["count"]
        if count == 0:
            raise ValueError("the dataset yielded no batches")
        per_model: dict[str, list[float]] = {}
        if found["has_loss"]:
            per_model["loss"] = (loss_sum / count).tolist()
        if found["has_accuracy"]:
            per_model["accuracy"] = (correct / count).tolist()
        found["per_model"] = per_model
        if collect:
            # Batches padded to different lengths are padded with -100, as the Trainer does.
            found["logits"] = _pad_cat(logits_list, dim=1)  # [N, samples, ...]
            found["labels"] = (
                _pad_cat(labels_list, dim=0) if len(labels_list) == found["steps"] else None
            )
        return found

    def _finish_metrics(
        self, per_model: Mapping[str, list[float]], prefix: str, start: float, found: Mapping
    ) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for name, values in per_model.items():
            for mid, v in zip(self.model_batch.model_ids, values, strict=True):
                metrics[per_model_key(f"{prefix}_{name}", mid)] = v
            metrics[f"{prefix}_{name}"] = sum(values) / len(values)
        metrics.update(
            transformers.trainer_utils.speed_metrics(
                prefix, start, num_samples=found["count"], num_steps=found["steps"]
            )
        )
        return metrics

    def evaluate(
        self,
        eval_dataset: Any = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> dict[str, float]:
        """Evaluate every model: ``{prefix}_loss/model_<id>``, ``{prefix}_accuracy/model_<id>``
        (labels of shape ``[B]``), ``{prefix}_<metric>/model_<id>`` for each value of
        ``compute_metrics`` (called once per model), and the mean over models of each."""
        override = eval_dataset is not None
        eval_dataset = eval_dataset if override else self.eval_dataset
        if isinstance(eval_dataset, dict):
            metrics: dict[str, float] = {}
            for name, ds in eval_dataset.items():
                metrics.update(
                    self.evaluate(
                        eval_dataset=ds if override else name,
                        ignore_keys=ignore_keys,
                        metric_key_prefix=f"{metric_key_prefix}_{name}",
                    )
                )
            return metrics
        start = time.time()
        found = self._eval_loop(
            self.get_eval_dataloader(eval_dataset), collect=self.compute_metrics is not None
        )
        per_model = dict(found["per_model"])
        if self.compute_metrics is not None:
            if found["labels"] is None:
                raise ValueError("compute_metrics needs labels in every evaluation batch")
            per_model.update(self._per_model_compute_metrics(found["logits"], found["labels"]))
        metrics = self._finish_metrics(per_model, metric_key_prefix, start, found)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(
            self.args, self.state, self.control, metrics
        )
        return metrics

    def hyperparameter_search(self, *args: Any, **kwargs: Any) -> Any:
        """Not supported: it re-creates one model per trial through ``model_init``.

        A ModelBatch already trains N configurations at once: give each model its own
        optimizer values with ``per_model_hparams``, or run an Optuna study whose trials train
        N at a time with :func:`modelbatch.integrations.optuna.optimize_batched`.
        """
        raise NotImplementedError(
            f"{type(self).__name__}.hyperparameter_search is not supported (it trains one "
            "model per trial through model_init): give each model of the batch its own values "
            "with per_model_hparams={'lr': [...]}, or use "
            "modelbatch.integrations.optuna.optimize_batched for an Optuna study"
        )

    def predict(
        self,
        test_dataset: Any,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "test",
    ) -> Any:
        """Every model's predictions: a ``PredictionOutput`` whose ``predictions`` are the
        ``[N, samples, ...]`` logits, with ``label_ids`` (if the data has labels) and the
        per-model metrics of :meth:`evaluate` (prefix ``test``)."""
        start = time.time()
        found = self._eval_loop(self.get_test_dataloader(test_dataset), collect=True)
        per_model = dict(found["per_model"])
        if self.compute_metrics is not None and found["labels"] is not None:
            per_model.update(self._per_model_compute_metrics(found["logits"], found["labels"]))
        metrics = self._finish_metrics(per_model, metric_key_prefix, start, found)
        labels = found["labels"]
        return transformers.trainer_utils.PredictionOutput(
            predictions=found["logits"].numpy(),
            label_ids=None if labels is None else labels.numpy(),
            metrics=metrics,
        )

    def _per_model_compute_metrics(self, logits: Tensor, labels: Tensor) -> dict[str, list[float]]:
        """``compute_metrics`` called once per model on its ``[samples, ...]`` logits."""
        label_ids = labels.numpy()
        out: dict[str, list[float]] = {}
        for i in range(logits.shape[0]):
            prediction = transformers.EvalPrediction(
                predictions=logits[i].numpy(), label_ids=label_ids
            )
            for name, value in self.compute_metrics(prediction).items():
                out.setdefault(name, []).append(float(value))
        return out

    # ------------------------------------------------------------------ saving
    def _save(
        self, output_dir: str | None = None, state_dict: dict[str, Tensor] | None = None
    ) -> None:
        """Write ``model.safetensors`` (the stacked weights, read back by a checkpoint resume),
        ``modelbatch.json`` (model ids) and ``training_args.json``."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        state = state_dict if state_dict is not None else self.model_batch.state_dict()
        path = os.path.join(output_dir, "model.safetensors")
        _safetensors_torch.save_file(_unshared(state), path, metadata={"format": "pt"})
        with open(os.path.join(output_dir, "modelbatch.json"), "w") as f:
            json.dump({"model_ids": self.model_batch.model_ids}, f)
        with open(os.path.join(output_dir, "training_args.json"), "w") as f:
            f.write(self.args.to_json_string())
        processing_class = getattr(self, "processing_class", None)
        if processing_class is not None:
            processing_class.save_pretrained(output_dir)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the stacked weights and, with ``save_per_model``, each model's
        ``save_pretrained`` folder ``model_<id>/`` (not for intermediate checkpoints)."""
        super().save_model(output_dir, _internal_call)  # type: ignore[misc]
        if _internal_call or not self.save_per_model or not self.args.should_save:
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        for mid in self.model_batch.model_ids:
            save_pretrained = getattr(self.model_batch.extract(mid), "save_pretrained", None)
            if callable(save_pretrained):
                save_pretrained(os.path.join(output_dir, f"model_{mid}"))


def _pad_cat(tensors: list[Tensor], dim: int, pad: int = -100) -> Tensor:
    """Concatenate along ``dim``, padding every later dimension to its largest size with
    ``pad`` (the Trainer's ``padding_index``): ``[N, B_k, L_k, ...] -> [N, sum B_k, max L, ...]``
    for ``dim=1``."""
    first = tensors[0]
    for k, t in enumerate(tensors):
        if t.dim() != first.dim() or t.shape[:dim] != first.shape[:dim]:
            raise ValueError(
                f"evaluation batch {k} gave shape {tuple(t.shape)}, batch 0 gave "
                f"{tuple(first.shape)}: only the sample and later dimensions may differ"
            )
    size = [max(t.shape[d] for t in tensors) for d in range(first.dim())]
    padded = []
    for t in tensors:
        target = [*size[:dim], t.shape[dim], *size[dim + 1 :]]
        if list(t.shape) != target:
            out = t.new_full(target, pad)
            out[tuple(slice(0, n) for n in t.shape)] = t
            t = out
        padded.append(t)
    return torch.cat(padded, dim=dim)


def _batch_size(inputs: Mapping[str, Any], labels: Any) -> int:
    if isinstance(labels, Tensor) and labels.dim() > 0:
        return int(labels.shape[0])
    for v in inputs.values():
        if isinstance(v, Tensor) and v.dim() > 0:
            return int(v.shape[0])
    raise ValueError("cannot tell the batch size: no tensor among the inputs")


def _unshared(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Copies where tensors share memory (tied weights): safetensors stores each once."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for k, v in state.items():
        key = (int(v.untyped_storage().data_ptr()), int(v.storage_offset()))
        t = v.detach().contiguous()
        if key in seen or not v.is_contiguous():
            t = t.clone()
        seen.add(key)
        out[k] = t
    return out


class BundledTrainer(HFTrainerMixin, transformers.Trainer):  # type: ignore[misc,name-defined]
    """A ``transformers.Trainer`` that trains every model of a ModelBatch in one run.

    Same arguments as ``transformers.Trainer`` (``model`` must be a
    :class:`~modelbatch.ModelBatch`), plus ``per_model_hparams``, ``loss_fn`` and
    ``save_per_model`` (see :class:`HFTrainerMixin`).

    Example:
        >>> batch = ModelBatch([BertForSequenceClassification(config) for _ in range(8)])
        >>> trainer = BundledTrainer(model=batch, args=TrainingArguments("out"),
        ...                          train_dataset=train, eval_dataset=val,
        ...                          per_model_hparams={"lr": [1e-4 * 2**i for i in range(8)]})
        >>> trainer.train()
        >>> trainer.evaluate()["eval_accuracy/model_3"]
    """
