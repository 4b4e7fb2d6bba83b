"""Callbacks for per-model isolation and logging (the design doc's CallbackPack).

A :class:`CallbackPack` holds the batch, its optimizer (and optionally LR schedulers and a
:class:`~modelbatch.BatchGradScaler`) and a list of :class:`Callback` objects, and is called
at four points of a training loop::

    pack = CallbackPack(batch, [NaNGuard(), EarlyStopping("val_loss", patience=3)],
                        optimizer=opt)
    for x, y in loader:
        pack.on_step_begin()                 # snapshot of buffers (BatchNorm statistics)
        loss = batch.compute_loss(batch(x), y, F.cross_entropy)
        opt.zero_grad()
        loss.backward()
        pack.on_before_optimizer_step()      # guards and clipping act on the gradients
        opt.step()
        pack.on_step_end()                   # logging
    pack.on_validation_end({"val_loss": val_losses})   # [N] per metric

``train_one_epoch(..., callbacks=pack)`` makes the first three calls for you.

Guards never loop over models: they build an ``[N]`` bool mask on the device and hand it to
:meth:`CallbackPack.flag`; the pack reads all masks flagged during one hook with a single
host sync and quarantines the flagged models (restoring their buffers to the values before
the step, so a model is frozen exactly as it was before the bad step).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from modelbatch.isolation import (
    clip_grad_norm_,
    clip_grad_value_,
    diverged_models,
    nonfinite_grads,
    nonfinite_models,
)

if TYPE_CHECKING:
    from modelbatch.amp import BatchGradScaler
    from modelbatch.core import ModelBatch

__all__ = [
    "Callback",
    "CallbackPack",
    "DivergenceGuard",
    "EarlyStopping",
    "GradClipping",
    "LogMetrics",
    "MetricsLogger",
    "NaNGuard",
]


@runtime_checkable
class MetricsLogger(Protocol):
    """Anything that can record per-model metrics: ``metrics`` is :meth:`ModelBatch.metrics`
    (one dict per model: ``model_id``, ``index``, ``active``, ``loss``, logged metrics)."""

    def log(self, metrics: list[dict[str, Any]], step: int) -> None:
        """Record one row per model at ``step``."""


class Callback:
    """Base class: override the hooks you need. Every hook gets the :class:`CallbackPack`
    (``pack.batch``, ``pack.optimizer``, ``pack.global_step``, ...).

    A callback that keeps per-model ``[N]`` state overrides :meth:`on_keep_positions` so
    the state follows :meth:`ModelBatch.drop`.
    """

    #: Whether the pack should copy the batch's buffers at each step begin, so that models
    #: quarantined during the step get their pre-step buffers back.
    needs_buffer_snapshot: bool = False

    def on_attach(self, pack: CallbackPack) -> None:
        """Called once when the pack is built."""

    def on_step_begin(self, pack: CallbackPack) -> None:
        """Before the forward pass."""

    def on_before_optimizer_step(self, pack: CallbackPack) -> None:
        """After ``backward()`` (and after unscaling with a scaler), before the step."""

    def on_step_end(self, pack: CallbackPack) -> None:
        """After the optimizer step; ``pack.global_step`` counts this step."""

    def on_epoch_end(self, pack: CallbackPack) -> None:
        """After an epoch."""

    def on_validation_end(self, pack: CallbackPack, metrics: Mapping[str, Tensor]) -> None:
        """After validation; ``metrics`` maps names to ``[N]`` tensors."""

    def on_keep_positions(self, keep: Sequence[int]) -> None:
        """The batch now holds only the models formerly at positions ``keep``."""

    def on_models_replaced(self, pack: CallbackPack, positions: Sequence[int]) -> None:
        """Fresh models now sit at ``positions`` (a sweep refilled freed slots): reset any
        per-model state kept for those positions."""

    def state_dict(self) -> dict[str, Any]:
        """The callback's own state (tensors, numbers, strings, lists and dicts of them),
        for a resumable run such as a sweep folder. A callback that keeps state between
        hooks overrides this and :meth:`load_state_dict`; the default has none."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (called after :meth:`on_attach`)."""


class CallbackPack:
    """Runs callbacks at the hook points of a training loop and applies their verdicts.

    Args:
        batch: the ModelBatch.
        callbacks: the callbacks, run in this order at every hook.
        optimizer: the batch's optimizer (needed with a ``scaler``).
        schedulers: LR schedulers to shrink when a callback drops models.
        scaler: a :class:`~modelbatch.BatchGradScaler`. The pack unscales the gradients
            before :meth:`on_before_optimizer_step` callbacks run, and :class:`NaNGuard`
            then leaves gradient overflows to the scaler.

    Attributes:
        global_step: number of completed steps (:meth:`on_step_end` calls).
        epoch: number of completed epochs (:meth:`on_epoch_end` calls).
        events: one dict per quarantined or dropped model:
            ``{"model_id", "step", "epoch", "reason", "action"}``.
    """

    def __init__(
        self,
        batch: ModelBatch,
        callbacks: Iterable[Callback] = (),
        *,
        optimizer: torch.optim.Optimizer | None = None,
        schedulers: Iterable[Any] = (),
        scaler: BatchGradScaler | None = None,
    ) -> None:
        self.batch = batch
        self.callbacks = list(callbacks)
        for cb in self.callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(f"callbacks must be Callback instances, got {type(cb).__name__}")
        if scaler is not None and optimizer is None:
            raise ValueError("a CallbackPack with a scaler needs the optimizer too")
        self.optimizer = optimizer
        self.schedulers = list(schedulers)
        self.scaler = scaler
        self.global_step = 0
        self.epoch = 0
        self.events: list[dict[str, Any]] = []
        self._pending: list[tuple[Tensor, str, bool]] = []
        self._snapshot: dict[str, Tensor] | None = None
        self._unscaled_step = -1
        batch._register_optimizer(self)  # type: ignore[arg-type]  # shrinks with the batch
        for cb in self.callbacks:
            cb.on_attach(self)

    # ------------------------------------------------------------------ verdicts
    def flag(self, mask: Tensor, reason: str, *, restore_buffers: bool = True) -> None:
        """Ask for the models in the ``[N]`` bool ``mask`` to be quarantined at the end of the
        current hook (no host sync here). With ``restore_buffers``, their buffers go back to
        the snapshot taken at :meth:`on_step_begin`."""
        n = len(self.batch)
        if mask.shape != (n,) or mask.dtype != torch.bool:
            raise ValueError(
                f"flag() needs an [N] = [{n}] bool mask, got {mask.dtype} {tuple(mask.shape)}"
            )
        self._pending.append((mask, reason, restore_buffers))

    def _resolve(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        batch = self.batch
        active = batch.active
        any_new = torch.zeros_like(active)
        for mask, _, _ in pending:
            any_new |= mask.to(active.device)
        any_new &= active
        if not bool(any_new.any()):  # the one host sync of a hook with guards
            return
        restore = torch.zeros_like(active)
        seen = torch.zeros_like(active)
        for mask, reason, restore_buffers in pending:
            new = mask.to(active.device) & active & ~seen
            seen |= new
            if restore_buffers:
                restore |= new
            for pos in new.nonzero().flatten().tolist():
                self._record(batch.model_ids[pos], reason, "quarantine")
        active.logical_and_(~any_new)
        if self._snapshot is not None:
            with torch.no_grad():
                for name, b in batch.stacked_buffers():
                    old = self._snapshot.get(name)
                    if old is not None and old.shape == b.shape:
                        keep_old = restore.view(-1, *([1] * (b.dim() - 1))).to(b.device)
                        b.copy_(torch.where(keep_old, old, b))

    def _record(self, model_id: int | str, reason: str, action: str) -> None:
        self.events.append(
            {
                "model_id": model_id,
                "step": self.global_step,
                "epoch": self.epoch,
                "reason": reason,
                "action": action,
            }
        )

    def drop(self, ids: Iterable[int | str], reason: str = "dropped") -> None:
        """Drop models (by id) from the batch, shrinking the pack's schedulers too."""
        ids = list(ids)
        if not ids:
            return
        self.batch.drop(ids, schedulers=self.schedulers)
        for mid in ids:
            self._record(mid, reason, "drop")

    def state_dict(self) -> dict[str, Any]:
        """The pack's counters and events and each callback's :meth:`Callback.state_dict`,
        in callback order."""
        return {
            "global_step": self.global_step,
            "epoch": self.epoch,
            "events": [dict(e) for e in self.events],
            "callbacks": [cb.state_dict() for cb in self.callbacks],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` into a pack built with the same callbacks."""
        saved = list(state["callbacks"])
        if len(saved) != len(self.callbacks):
            raise ValueError(
                f"the saved callback state is for {len(saved)} callbacks, this pack has "
                f"{len(self.callbacks)}: build it with the same callbacks"
            )
        self.global_step = int(state["global_step"])
        self.epoch = int(state["epoch"])
        self.events = [dict(e) for e in state["events"]]
        for cb, cb_state in zip(self.callbacks, saved, strict=True):
            cb.load_state_dict(cb_state)

    @property
    def should_stop(self) -> bool:
        """True when no model is active any more (one host sync)."""
        return not bool(self.batch.active.any())

    # ------------------------------------------------------------------ hooks
    def on_step_begin(self) -> None:
        """Call before the forward pass."""
        if self.batch.training and any(cb.needs_buffer_snapshot for cb in self.callbacks):
            self._snapshot = {
                name: b.detach().clone() for name, b in self.batch.stacked_buffers()
            }
        else:
            self._snapshot = None
        for cb in self.callbacks:
            cb.on_step_begin(self)
        self._resolve()

    def on_before_optimizer_step(self) -> None:
        """Call after ``backward()`` and before ``optimizer.step()`` / ``scaler.step()``."""
        if self.scaler is not None and self.scaler.is_enabled():
            assert self.optimizer is not None
            state = self.scaler._state(self.optimizer)
            if state["found_inf"] is None:
                self.scaler.unscale_(self.optimizer)
        for cb in self.callbacks:
            cb.on_before_optimizer_step(self)
        self._resolve()

    def on_step_end(self) -> None:
        """Call after the optimizer step (and the scheduler step)."""
        self.global_step += 1
        for cb in self.callbacks:
            cb.on_step_end(self)
        self._resolve()
        self._snapshot = None

    def on_epoch_end(self) -> None:
        """Call after each epoch."""
        for cb in self.callbacks:
            cb.on_epoch_end(self)
        self._resolve()
        self.epoch += 1

    def on_validation_end(self, metrics: Mapping[str, Tensor | Sequence[float]]) -> None:
        """Call with ``{name: [N] values}`` after validation. The metrics are also recorded
        on the batch (:meth:`ModelBatch.log_metric`), so :meth:`ModelBatch.metrics` shows
        them."""
        tensors: dict[str, Tensor] = {}
        for name, values in metrics.items():
            self.batch.log_metric(name, values)
            tensors[name] = torch.as_tensor(values).detach()
        for cb in self.callbacks:
            cb.on_validation_end(self, tensors)
        self._resolve()

    # ------------------------------------------------------------------ shrinking
    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.batch._register_optimizer(self)  # type: ignore[arg-type]  # after copy/pickle

    def _keep_positions(self, keep: Sequence[int]) -> None:
        index = torch.tensor(list(keep), dtype=torch.long)
        self._pending = [
            (m.index_select(0, index.to(m.device)), reason, restore)
            for m, reason, restore in self._pending
        ]
        if self._snapshot is not None:
            self._snapshot = {
                k: v.index_select(0, index.to(v.device)) for k, v in self._snapshot.items()
            }
        for cb in self.callbacks:
            cb.on_keep_positions(keep)


def _per_model_tensor(value: float | Sequence[float], n: int, name: str) -> Tensor:
    t = torch.as_tensor(value, dtype=torch.float64)
    if t.dim() == 0:
        return t.expand(n).clone()
    if t.shape != (n,):
        raise ValueError(f"{name} needs a scalar or one value per model ([{n}]), "
                         f"got shape {tuple(t.shape)}")
    return t


def _select(t: Tensor | None, keep: Sequence[int]) -> Tensor | None:
    if t is None:
        return None
    return t.index_select(0, torch.tensor(list(keep), dtype=torch.long, device=t.device))


class NaNGuard(Callback):
    """Quarantine every model whose loss or gradient holds a NaN or an infinity, before
    the optimizer step, and restore its buffers to their pre-step values.

    Args:
        check_grads: check the gradients too. ``None`` (default): yes, unless the pack has
            an enabled :class:`~modelbatch.BatchGradScaler` (gradient overflows are then the
            scaler's business: it skips that model's step and lowers its scale).
        check_loss: check ``batch.latest_losses`` (set by :meth:`ModelBatch.compute_loss`).

    Cost: one max-abs reduction per parameter tensor and one host sync per step.
    """

    needs_buffer_snapshot = True

    def __init__(self, *, check_grads: bool | None = None, check_loss: bool = True) -> None:
        self.check_grads = check_grads
        self.check_loss = check_loss

    def on_before_optimizer_step(self, pack: CallbackPack) -> None:
        grads = self.check_grads
        if grads is None:
            grads = pack.scaler is None or not pack.scaler.is_enabled()
        batch = pack.batch
        losses = batch.latest_losses if self.check_loss else None
        if losses is not None and losses.shape != (len(batch),):
            losses = None  # stale (from before a drop): no loss computed this step
        if losses is not None:
            bad = nonfinite_models(batch, losses, grads=grads)
        elif grads:
            bad = nonfinite_grads(batch)
        else:
            return
        pack.flag(bad, "non-finite loss or gradient")


class DivergenceGuard(Callback):
    """Quarantine models whose training loss exceeds ``threshold`` (or is not finite) for
    ``patience`` consecutive steps, before the optimizer step.

    Args:
        threshold: the largest acceptable loss, shared or one per model.
        patience: consecutive steps above the threshold before quarantine.
    """

    needs_buffer_snapshot = True

    def __init__(self, threshold: float | Sequence[float], *, patience: int = 1) -> None:
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.threshold = threshold
        self.patience = patience
        self._threshold: Tensor | None = None
        self._count: Tensor | None = None

    def on_attach(self, pack: CallbackPack) -> None:
        n = len(pack.batch)
        self._threshold = _per_model_tensor(self.threshold, n, "threshold")
        self._count = torch.zeros(n, dtype=torch.int64, device=pack.batch.active.device)

    def on_before_optimizer_step(self, pack: CallbackPack) -> None:
        losses = pack.batch.latest_losses
        if losses is None or self._count is None or self._threshold is None:
            return
        device = self._count.device
        thr = self._threshold.to(device=device)
        over = diverged_models(losses.to(device=device, dtype=torch.float64), thr)
        self._count = torch.where(over, self._count + 1, torch.zeros_like(self._count))
        pack.flag(self._count >= self.patience, f"loss above {self.threshold}")

    def on_keep_positions(self, keep: Sequence[int]) -> None:
        self._threshold = _select(self._threshold, keep)
        self._count = _select(self._count, keep)

    def on_models_replaced(self, pack: CallbackPack, positions: Sequence[int]) -> None:
        if self._count is not None:
            for pos in positions:
                self._count[pos] = 0

    def state_dict(self) -> dict[str, Any]:
        return {"count": None if self._count is None else self._count.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state["count"] is not None and self._count is not None:
            self._count.copy_(state["count"])


class EarlyStopping(Callback):
    """Per-model early stopping on a validation metric, keeping each model's best weights.

    A model that has not improved ``metric`` by more than ``min_delta`` for ``patience``
    validations in a row is stopped: quarantined (``action="quarantine"``, it stays in the
    batch, frozen, and can be extracted) or removed from the batch (``action="drop"``, later
    steps cost less). Quarantined models are not watched. With ``"drop"``, when every
    remaining model would stop, they are quarantined instead (a batch cannot be empty);
    check :attr:`CallbackPack.should_stop`.

    With ``keep_best`` (default), each model's weights at its best validation so far are
    copied to host memory (or, with ``directory``, to ``<directory>/<id>.safetensors``)
    whenever it improves, so :meth:`best_state` / :meth:`best_model` give them back by model
    id, also after the model was dropped. ``restore_best_weights`` writes a stopped model's
    best weights back into its slot (quarantine) before it is frozen, as Keras does.

    Args:
        metric: the name passed to :meth:`CallbackPack.on_validation_end`.
        mode: ``"min"`` (lower is better, e.g. a loss) or ``"max"`` (e.g. accuracy).
        patience: validations without improvement before stopping.
        min_delta: smallest change that counts as an improvement.
        action: ``"quarantine"`` or ``"drop"``.
        keep_best: keep each model's best weights (one host copy per improvement).
        restore_best_weights: with ``action="quarantine"``, put a stopped model's best
            weights back in the batch.
        directory: write the best weights there (safetensors, one file per model id)
            instead of keeping them in memory.

    Attributes:
        best: ``[N]`` best value seen per model (float64, CPU).
        best_values: ``{model id: best value}``, also for models no longer in the batch.
    """

    def __init__(
        self,
        metric: str,
        mode: str = "min",
        patience: int = 3,
        min_delta: float = 0.0,
        *,
        action: str = "quarantine",
        keep_best: bool = True,
        restore_best_weights: bool = False,
        directory: str | os.PathLike[str] | None = None,
    ) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if action not in ("quarantine", "drop"):
            raise ValueError(f"action must be 'quarantine' or 'drop', got {action!r}")
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        if min_delta < 0:
            raise ValueError(f"min_delta must be >= 0, got {min_delta}")
        if restore_best_weights and not keep_best:
            raise ValueError("restore_best_weights needs keep_best=True")
        self.metric = metric
        self.mode = mode
        self.patience = patience
        self.min_delta = float(min_delta)
        self.action = action
        self.keep_best = keep_best
        self.restore_best_weights = restore_best_weights
        self.directory = Path(directory) if directory is not None else None
        self.best: Tensor | None = None
        self.best_values: dict[int | str, float] = {}
        self._wait: Tensor | None = None
        self._weights: dict[int | str, dict[str, Tensor]] = {}
        self._template: nn.Module | None = None
        self._state_keys: list[str] = []

    def on_attach(self, pack: CallbackPack) -> None:
        n = len(pack.batch)
        self.best = torch.full((n,), torch.inf if self.mode == "min" else -torch.inf,
                               dtype=torch.float64)
        self._wait = torch.zeros(n, dtype=torch.int64)
        if self.keep_best:
            template = pack.batch.extract(pack.batch.model_ids[0]).to("cpu")
            self._state_keys = list(template.state_dict())
            self._template = template
            if self.directory is not None:
                self.directory.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ best weights
    @torch.no_grad()
    def _save_best(self, batch: ModelBatch, positions: Sequence[int]) -> None:
        stacked: dict[str, Tensor] = dict(batch.stacked.named_parameters(remove_duplicate=False))
        stacked.update(dict(batch.stacked.named_buffers(remove_duplicate=False)))
        ids = batch.model_ids
        index = torch.tensor(list(positions), dtype=torch.long)
        rows = {k: stacked[k].detach().index_select(0, index.to(stacked[k].device)).cpu()
                for k in self._state_keys}
        for j, pos in enumerate(positions):
            state = {k: v[j].clone() for k, v in rows.items()}
            if self.directory is not None:
                from safetensors.torch import save_file

                save_file(state, str(self._path(ids[pos])))
            else:
                self._weights[ids[pos]] = state

    def _path(self, model_id: int | str) -> Path:
        from modelbatch.checkpoint import model_folder_name

        assert self.directory is not None
        return self.directory / f"{model_folder_name(model_id)}.safetensors"

    def best_state(self, model_id: int | str) -> dict[str, Tensor]:
        """Model ``model_id``'s state dict at its best validation (CPU tensors), also after
        it was dropped from the batch."""
        if not self.keep_best:
            raise RuntimeError("this EarlyStopping was built with keep_best=False")
        if model_id not in self.best_values:
            raise KeyError(
                f"no best weights for model {model_id!r}: it never had a finite "
                f"{self.metric}; models with best weights: {sorted(self.best_values, key=str)}"
            )
        if self.directory is not None:
            from safetensors.torch import load_file

            return load_file(str(self._path(model_id)))
        return self._weights[model_id]

    def best_model(self, model_id: int | str) -> nn.Module:
        """Model ``model_id`` as a plain ``nn.Module`` (on the CPU) with its best weights."""
        state = self.best_state(model_id)
        assert self._template is not None
        module = copy.deepcopy(self._template)
        module.load_state_dict(state)
        return module

    # ------------------------------------------------------------------ hooks
    def on_validation_end(self, pack: CallbackPack, metrics: Mapping[str, Tensor]) -> None:
        if self.metric not in metrics:
            raise KeyError(
                f"EarlyStopping watches {self.metric!r}, but the validation metrics are "
                f"{sorted(metrics)}"
            )
        assert self.best is not None and self._wait is not None
        n = len(pack.batch)
        values = metrics[self.metric].to(dtype=torch.float64, device=self.best.device)
        if values.shape != (n,):
            raise ValueError(f"metric {self.metric!r} needs shape [N] = [{n}], "
                             f"got {tuple(values.shape)}")
        if self.mode == "min":
            improved = values < self.best - self.min_delta
        else:
            improved = values > self.best + self.min_delta
        improved &= pack.batch.active.to(improved.device) & values.isfinite()
        self.best = torch.where(improved, values, self.best)
        self._wait = torch.where(improved, torch.zeros_like(self._wait), self._wait + 1)
        better = improved.nonzero().flatten().tolist()
        if better:
            ids = pack.batch.model_ids
            for pos in better:
                self.best_values[ids[pos]] = float(values[pos])
            if self.keep_best:
                self._save_best(pack.batch, better)
        stop = (self._wait >= self.patience).to(pack.batch.active.device) & pack.batch.active
        reason = f"early stopping on {self.metric}"
        positions = stop.nonzero().flatten().tolist()
        if not positions:
            return
        if self.restore_best_weights:
            ids = pack.batch.model_ids
            for pos in positions:
                if ids[pos] in self.best_values:
                    module = self.best_model(ids[pos]).to(pack.batch.device)
                    pack.batch.insert(ids[pos], module)
        if self.action == "quarantine" or len(positions) == len(pack.batch):
            pack.flag(stop, reason, restore_buffers=False)
            return
        pack.drop([pack.batch.model_ids[i] for i in positions], reason)

    def on_keep_positions(self, keep: Sequence[int]) -> None:
        self.best = _select(self.best, keep)
        self._wait = _select(self._wait, keep)

    def on_models_replaced(self, pack: CallbackPack, positions: Sequence[int]) -> None:
        """The models at ``positions`` are new: their patience, best value and best weights
        start over. The previous occupant's record under that id is forgotten (take it with
        :meth:`best_state` before replacing), so it can never be restored into, or returned
        for, the new model."""
        assert self.best is not None and self._wait is not None
        ids = pack.batch.model_ids
        for pos in positions:
            self.best[pos] = torch.inf if self.mode == "min" else -torch.inf
            self._wait[pos] = 0
            model_id = ids[pos]
            self.best_values.pop(model_id, None)
            self._weights.pop(model_id, None)
            if self.directory is not None:
                self._path(model_id).unlink(missing_ok=True)

    def state_dict(self) -> dict[str, Any]:
        """Per-model best values and patience counters, and the best weights kept in memory
        (those under ``directory`` stay there)."""
        assert self.best is not None and self._wait is not None
        return {
            "best": self.best.clone(),
            "wait": self._wait.clone(),
            "best_values": dict(self.best_values),
            "weights": {k: dict(v) for k, v in self._weights.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        assert self.best is not None and self._wait is not None
        if tuple(state["best"].shape) != tuple(self.best.shape):
            raise ValueError(
                f"the saved EarlyStopping state is for {state['best'].shape[0]} models, this "
                f"batch has {self.best.shape[0]}"
            )
        self.best = state["best"].clone()
        self._wait = state["wait"].clone()
        self.best_values = dict(state["best_values"])
        self._weights = {k: dict(v) for k, v in state["weights"].items()}


class GradClipping(Callback):
    """Clip each model's gradient before the step (value first, then norm), each model
    with its own norm (:func:`modelbatch.clip_grad_norm_`). The ``[N]`` pre-clipping norms
    are recorded as the batch metric ``"grad_norm"``.

    Args:
        max_norm: maximum total norm, shared or one per model (``None``: no norm clipping).
        norm_type: p of the p-norm.
        max_value: clip every gradient entry to ``[-max_value, max_value]`` (``None``: no).
    """

    def __init__(
        self,
        max_norm: float | Sequence[float] | None = None,
        norm_type: float = 2.0,
        *,
        max_value: float | Sequence[float] | None = None,
    ) -> None:
        if max_norm is None and max_value is None:
            raise ValueError("GradClipping needs max_norm or max_value")
        self.max_norm = max_norm
        self.norm_type = norm_type
        self.max_value = max_value

    def on_before_optimizer_step(self, pack: CallbackPack) -> None:
        if self.max_value is not None:
            clip_grad_value_(pack.batch, self.max_value)
        if self.max_norm is not None:
            norms = clip_grad_norm_(pack.batch, self.max_norm, self.norm_type)
            pack.batch.log_metric("grad_norm", norms)


class LogMetrics(Callback):
    """Send :meth:`ModelBatch.metrics` to a :class:`MetricsLogger` every ``every_n_steps``
    steps and after each validation. Each call reads the metrics on the host (one sync).

    Args:
        logger: any object with ``log(metrics: list[dict], step: int)``.
        every_n_steps: logging period in steps (0: only after validation).
        on_validation: also log after :meth:`CallbackPack.on_validation_end`.
    """

    def __init__(
        self, logger: MetricsLogger, every_n_steps: int = 1, *, on_validation: bool = True
    ) -> None:
        if not isinstance(logger, MetricsLogger):
            raise TypeError(
                f"logger must have a log(metrics, step) method, got {type(logger).__name__}"
            )
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0, got {every_n_steps}")
        self.logger = logger
        self.every_n_steps = every_n_steps
        self.on_validation = on_validation

    def on_step_end(self, pack: CallbackPack) -> None:
        if self.every_n_steps and pack.global_step % self.every_n_steps == 0:
            self.logger.log(pack.batch.metrics(), pack.global_step)

    def on_validation_end(self, pack: CallbackPack, metrics: Mapping[str, Tensor]) -> None:
        if self.on_validation:
            self.logger.log(pack.batch.metrics(), pack.global_step)
