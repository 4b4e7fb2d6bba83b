"""Per-model isolation: detect non-finite or diverging models, clip each model's gradient.

Every function here works on the stacked ``[N, ...]`` gradients of a
:class:`~modelbatch.ModelBatch` with a number of kernels that depends on the number of
parameter tensors, never on N, and none of them reads a value back to the host.
A single global gradient norm (``torch.nn.utils.clip_grad_norm_`` over the batch) would
couple the models; the functions here give each model its own norm, exactly as if it had
been clipped alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from modelbatch.core import ModelBatch

__all__ = [
    "clip_grad_norm_",
    "clip_grad_value_",
    "diverged_models",
    "grad_norms",
    "nonfinite_grads",
    "nonfinite_models",
    "shrink_scheduler",
]

# Per-parameter-group lists kept by torch.optim.lr_scheduler classes (one entry per
# param group, i.e. per model of a batch optimizer).
_SCHEDULER_LISTS = (
    "base_lrs",
    "_last_lr",
    "lr_lambdas",
    "min_lrs",
    "max_lrs",
    "base_momentums",
    "max_momentums",
)


def _view(values: Tensor, like: Tensor) -> Tensor:
    """``[N]`` -> ``[N, 1, ..., 1]`` on ``like``'s device, broadcasting over ``like``."""
    return values.to(like.device).view(-1, *([1] * (like.dim() - 1)))


def _grads(batch: ModelBatch) -> list[Tensor]:
    return [p.grad for _, p in batch.stacked_parameters() if p.grad is not None]


def _per_model(values: float | Sequence[float] | Tensor, n: int, name: str,
               device: torch.device, dtype: torch.dtype) -> Tensor | float:
    """A scalar stays a Python float; N values become an ``[N]`` tensor."""
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        return float(values)
    t = torch.as_tensor(values, dtype=dtype, device=device)
    if t.dim() == 0:
        return float(t)
    if t.shape != (n,):
        raise ValueError(f"{name} needs a scalar or one value per model ([{n}]), "
                         f"got shape {tuple(t.shape)}")
    return t


def nonfinite_grads(batch: ModelBatch) -> Tensor:
    """``[N]`` bool: which models have a NaN or infinite gradient entry (no host sync).

    Parameters without a gradient are ignored. One max-abs reduction per stacked
    parameter tensor (NaN propagates through it).
    """
    n = len(batch)
    bad = torch.zeros(n, dtype=torch.bool, device=batch.active.device)
    for g in _grads(batch):
        amax = torch.linalg.vector_norm(g.reshape(n, -1), ord=math.inf, dim=1)
        bad |= ~torch.isfinite(amax).to(bad.device)
    return bad


def nonfinite_models(
    batch: ModelBatch, losses: Tensor | None = None, *, grads: bool = True
) -> Tensor:
    """``[N]`` bool: models whose loss (``losses`` [N], default ``batch.latest_losses``) or,
    with ``grads=True``, whose gradient holds a NaN or an infinity. No host sync."""
    n = len(batch)
    if losses is None:
        losses = batch.latest_losses
    bad = torch.zeros(n, dtype=torch.bool, device=batch.active.device)
    if losses is not None:
        if losses.shape != (n,):
            raise ValueError(f"losses must have shape [N] = [{n}], got {tuple(losses.shape)}")
        bad |= ~torch.isfinite(losses.detach()).to(bad.device)
    if grads:
        bad |= nonfinite_grads(batch)
    return bad


def diverged_models(
    values: Tensor, threshold: float | Sequence[float] | Tensor, *, mode: str = "max"
) -> Tensor:
    """``[N]`` bool: ``values`` (``[N]``, e.g. losses) beyond a per-model or shared
    ``threshold`` (above it with ``mode="max"``, below it with ``mode="min"``), or not finite.
    """
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    values = values.detach()
    thr = _per_model(threshold, values.shape[0], "threshold", values.device, values.dtype)
    beyond = values > thr if mode == "max" else values < thr
    return beyond | ~torch.isfinite(values)


def grad_norms(batch: ModelBatch, norm_type: float = 2.0) -> Tensor:
    """``[N]`` total gradient norm of each model over all its parameters, computed as
    ``torch.nn.utils.clip_grad_norm_`` computes it for one model (norm of per-tensor norms).
    """
    n = len(batch)
    norm_type = float(norm_type)
    grads = _grads(batch)
    if not grads:
        return torch.zeros(n, device=batch.active.device)
    per_tensor = [torch.linalg.vector_norm(g.reshape(n, -1), norm_type, dim=1) for g in grads]
    device = grads[0].device
    return torch.linalg.vector_norm(
        torch.stack([t.to(device) for t in per_tensor]), norm_type, dim=0
    )


@torch.no_grad()
def clip_grad_norm_(
    batch: ModelBatch,
    max_norm: float | Sequence[float] | Tensor,
    norm_type: float = 2.0,
    *,
    error_if_nonfinite: bool = False,
) -> Tensor:
    """Clip each model's gradient to its own total norm, in place.

    Model i's gradients are scaled by ``min(1, max_norm_i / (norm_i + 1e-6))``, exactly the
    rule of ``torch.nn.utils.clip_grad_norm_`` applied to model i alone.

    Args:
        batch: the ModelBatch whose stacked ``.grad`` tensors are clipped.
        max_norm: a shared maximum norm or one per model (``[N]``).
        norm_type: the p of the p-norm (``inf`` for the max-abs norm).
        error_if_nonfinite: raise (naming the models) when a model's norm is NaN or
            infinite. This reads the norms on the host (one sync). Otherwise such a model's
            gradients become NaN, as in PyTorch; pair with :class:`~modelbatch.NaNGuard`.

    Returns:
        ``[N]`` total norms before clipping.
    """
    grads = _grads(batch)
    norms = grad_norms(batch, norm_type)
    if not grads:
        return norms
    if error_if_nonfinite:
        bad = (~torch.isfinite(norms)).nonzero().flatten().tolist()
        if bad:
            ids = [batch.model_ids[i] for i in bad]
            raise RuntimeError(
                f"the total norm of order {norm_type} of the gradients of models at positions "
                f"{bad} (ids {ids}) is non-finite, so they cannot be clipped"
            )
    limit = _per_model(max_norm, len(batch), "max_norm", norms.device, norms.dtype)
    coef = torch.clamp(limit / (norms + 1e-6), max=1.0)
    for g in grads:
        g.mul_(_view(coef, g).to(g.dtype))
    return norms


@torch.no_grad()
def clip_grad_value_(batch: ModelBatch, clip_value: float | Sequence[float] | Tensor) -> None:
    """Clamp each model's gradient entries to ``[-clip_value_i, clip_value_i]``, in place
    (``torch.nn.utils.clip_grad_value_`` per model; ``clip_value`` shared or ``[N]``)."""
    for g in _grads(batch):
        v = _per_model(clip_value, len(batch), "clip_value", g.device, g.dtype)
        if isinstance(v, float):
            g.clamp_(min=-v, max=v)
        else:
            v = _view(v, g)
            torch.clamp(g, min=-v, max=v, out=g)


def shrink_scheduler(scheduler: Any, keep: Sequence[int], n_old: int) -> None:
    """Shrink an LR scheduler's per-model lists after models were dropped from its batch.

    ``torch.optim.lr_scheduler`` classes keep one entry per param group in lists such as
    ``base_lrs``, ``_last_lr``, ``LambdaLR.lr_lambdas``, ``ReduceLROnPlateau.min_lrs`` and
    ``CyclicLR.max_lrs``. A batch optimizer has one param group per model, so after
    :meth:`ModelBatch.drop` these lists must keep the same positions as the optimizer's
    groups. Schedulers nested in ``SequentialLR`` / ``ChainedScheduler`` are handled too.

    Args:
        scheduler: any ``torch.optim.lr_scheduler`` object (or one with such lists).
        keep: the kept positions, in their new order.
        n_old: the number of models before the drop.
    """
    for name in _SCHEDULER_LISTS:
        values = getattr(scheduler, name, None)
        if isinstance(values, (list, tuple)) and len(values) == n_old:
            setattr(scheduler, name, type(values)(values[i] for i in keep))
    for inner in getattr(scheduler, "_schedulers", None) or ():
        shrink_scheduler(inner, keep, n_old)
