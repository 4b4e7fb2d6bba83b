"""Training-loop helpers for raw PyTorch loops."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from modelbatch.core import ModelBatch

__all__ = ["train_one_epoch", "evaluate"]


def _to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, (list, tuple)):
        return type(x)(_to_device(v, device) for v in x)
    return x


def train_one_epoch(
    batch: ModelBatch,
    loader: Iterable[Any],
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    *,
    per_model: bool = False,
    scheduler: Any | None = None,
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
        scheduler: optional LR scheduler stepped after every optimizer step.

    Returns:
        ``[N]`` tensor (on the CPU) of each model's mean training loss over the epoch,
        weighted by batch size.
    """
    batch.train()
    device = batch.device
    total = torch.zeros(len(batch), dtype=torch.float64, device=device)
    count = 0
    for x, y in loader:
        x, y = _to_device(x, device), _to_device(y, device)
        outputs = batch(x, per_model=per_model)
        loss = batch.compute_loss(outputs, y, loss_fn)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        b = outputs.shape[1]
        assert batch.latest_losses is not None
        total += batch.latest_losses.double() * b
        count += b
    if count == 0:
        raise ValueError("the loader yielded no batches")
    return (total / count).cpu()


@torch.no_grad()
def evaluate(
    batch: ModelBatch,
    loader: Iterable[Any],
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    *,
    per_model: bool = False,
) -> dict[str, Tensor]:
    """Evaluate every model in eval mode.

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
            target = y if y.dim() == out.dim() - 1 and y.shape[0] == len(batch) and per_model else y
            correct += (out.argmax(dim=-1) == target).double().sum(dim=1)
            if loss_fn is not None:
                batch.compute_loss(out, y, loss_fn)
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
