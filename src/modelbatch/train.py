"""Training-loop helpers for raw PyTorch loops."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from modelbatch.core import ModelBatch, _targets_are_per_model
from modelbatch.data import (
    DataRouter,
    _to_device,
    route_inputs,
    route_targets,
    routed_batch_norm,
    skip_models_without_samples,
)

if TYPE_CHECKING:
    from modelbatch.callbacks import CallbackPack

__all__ = ["evaluate", "train_one_epoch"]


def train_one_epoch(
    batch: ModelBatch,
    loader: Iterable[Any],
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    *,
    per_model: bool = False,
    per_model_targets: bool | None = None,
    scheduler: Any | None = None,
    router: DataRouter | None = None,
    callbacks: CallbackPack | None = None,
) -> Tensor:
    """Train every model of ``batch`` for one pass over ``loader``.

    Each ``(inputs, targets)`` pair is copied to the device once and shared by all models
    (or, with ``per_model=True``, split along its leading ``N`` dimension).

    Args:
        batch: the ModelBatch.
        loader: yields ``(x, y)``: ``x`` is ``[B, ...]`` (``[N, B, ...]`` when per_model),
            ``y`` is ``[B, ...]`` or ``[N, B, ...]``.
        optimizer: an optimizer built for ``batch`` (e.g. ``modelbatch.optim.Adam(batch)``).
        loss_fn: a single-model loss, e.g. ``torch.nn.functional.cross_entropy``.
        per_model: whether ``x`` carries a leading model dimension.
        per_model_targets: whether ``y`` carries a leading model dimension (default: the
            shapes decide, and an error asks for it when they are ambiguous; see
            :meth:`ModelBatch.compute_loss`).
        scheduler: optional LR scheduler stepped after every optimizer step.
        router: optional :class:`modelbatch.data.DataRouter`. The loader then yields
            ``(x, y, index)`` and model i's loss uses its ``[N, B]`` weights
            ``router.train_mask(index)``; a model with no sample in a batch skips that step.
            BatchNorm layers compute each model's statistics over its routed samples only
            (:func:`modelbatch.data.routed_batch_norm` around the forward).
        callbacks: optional :class:`modelbatch.CallbackPack`; its ``on_step_begin``,
            ``on_before_optimizer_step``, ``on_step_end`` and ``on_epoch_end`` hooks are
            called (e.g. a :class:`modelbatch.NaNGuard` quarantines non-finite models).

    Returns:
        ``[N]`` tensor (on the CPU) of each model's mean training loss over the epoch,
        weighted by batch size (by each model's sample weights with a router).
    """
    batch.train()
    device = batch.device
    total = torch.zeros(len(batch), dtype=torch.float64, device=device)
    count: Tensor | int = 0
    if router is not None:
        router.check_batch(batch)
    for item in loader:
        mask = None
        if router is None:
            x, y = item
        else:
            x, y, idx = item
            mask = router.train_mask(idx).to(device, non_blocking=True)
        x, y = _to_device(x, device), _to_device(y, device)
        if callbacks is not None:
            callbacks.on_step_begin()
        x_per_model, y_per_model = per_model, per_model_targets
        if mask is not None and router is not None and router.isolate_inputs:
            # Each model sees only its own samples' values (see modelbatch.data).
            x, x_per_model = route_inputs(x, mask, per_model=per_model), isinstance(x, Tensor)
        # BatchNorm statistics over each model's routed samples only (see modelbatch.data).
        with routed_batch_norm(mask) if mask is not None else nullcontext():
            outputs = batch(x, per_model=x_per_model or per_model)
        if mask is not None and router is not None and router.isolate_inputs:
            y, y_per_model = route_targets(outputs, y, mask, per_model_targets)
        loss = batch.compute_loss(
            outputs, y, loss_fn, mask=mask, per_model_targets=y_per_model
        )
        optimizer.zero_grad()
        loss.backward()
        if callbacks is not None:
            callbacks.on_before_optimizer_step()
        if mask is None:
            optimizer.step()
        else:
            with skip_models_without_samples(batch, mask):
                optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if callbacks is not None:
            callbacks.on_step_end()
        b = outputs.shape[1] if mask is None else mask.double().sum(dim=1).to(device)
        assert batch.latest_losses is not None
        total += batch.latest_losses.double() * b
        count = count + b
    if callbacks is not None:
        callbacks.on_epoch_end()
    if isinstance(count, int) and count == 0:
        raise ValueError("the loader yielded no batches")
    return (total / torch.as_tensor(count, device=device).clamp_min(1e-300)).cpu()


@torch.no_grad()
def evaluate(
    batch: ModelBatch,
    loader: Iterable[Any],
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    *,
    per_model: bool = False,
    per_model_targets: bool | None = None,
) -> dict[str, Tensor]:
    """Evaluate every model in eval mode.

    Args:
        batch: the ModelBatch.
        loader: yields ``(x, y)`` as for :func:`train_one_epoch`.
        loss_fn: optional single-model loss, reported per model.
        per_model: whether ``x`` carries a leading model dimension.
        per_model_targets: whether ``y`` does (default: the shapes decide, and an error
            asks for it when they are ambiguous; see :meth:`ModelBatch.compute_loss`).

    Returns:
        ``{"accuracy": [N], "loss": [N]}`` (CPU tensors; ``loss`` only with ``loss_fn``).
        Accuracy is the fraction of samples whose argmax over the last output dimension
        equals the integer target.
    """
    was_training = batch.training
    batch.eval()
    device = batch.device
    correct = torch.zeros(len(batch), dtype=torch.float64, device=device)
    loss_sum = torch.zeros(len(batch), dtype=torch.float64, device=device)
    count = 0
    try:
        for x, y in loader:
            x, y = _to_device(x, device), _to_device(y, device)
            out = batch(x, per_model=per_model)
            # The targets rule of compute_loss: y is [B] (shared) or [N, B] (per model).
            pm = _targets_are_per_model(out, y, per_model_targets)
            correct += (out.argmax(dim=-1) == (y if pm else y.unsqueeze(0))).double().sum(dim=1)
            if loss_fn is not None:
                batch.compute_loss(out, y, loss_fn, per_model_targets=pm)
                assert batch.latest_losses is not None
                loss_sum += batch.latest_losses.double() * out.shape[1]
            count += out.shape[1]
    finally:
        batch.train(was_training)
    if count == 0:
        raise ValueError("the loader yielded no batches")
    result = {"accuracy": (correct / count).cpu()}
    if loss_fn is not None:
        result["loss"] = (loss_sum / count).cpu()
    return result
