"""Helpers shared by the integrations: per-model gradient clipping and per-model metrics.

Trainers of other libraries clip gradients with one norm over all parameters they can see.
Over a :class:`~modelbatch.ModelBatch` that global norm would mix the N models (one model's
large gradient would shrink every other model's update), so the integrations clip each
model by its own norm instead, with exactly :func:`torch.nn.utils.clip_grad_norm_`'s maths.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.func import vmap

if TYPE_CHECKING:
    from modelbatch.core import ModelBatch

__all__ = [
    "PER_MODEL_KEY",
    "clip_grad_norm_per_model",
    "clip_grad_value_per_model",
    "per_model_grad_norms",
    "per_model_key",
    "per_model_metrics",
]

#: The one naming scheme for per-model metrics in every integration (Lightning, the Hugging
#: Face Trainer, the TensorBoard / W&B loggers, Ray Tune, sweeps): ``<metric>/model_<id>``,
#: where ``<metric>`` is the integration's own name for the value (``train/loss`` in
#: Lightning, ``eval_loss`` in the HF Trainer, ``loss``, ``lr``, ``val_accuracy`` ...) and
#: ``<id>`` the model's stable id.
PER_MODEL_KEY = "{metric}/model_{model_id}"


def per_model_key(metric: str, model_id: int | str) -> str:
    """``<metric>/model_<id>``: the name of model ``model_id``'s value of ``metric``."""
    return PER_MODEL_KEY.format(metric=metric, model_id=model_id)

MetricFn = Callable[[Tensor, Tensor], Tensor]


def _stacked_grads(batch: ModelBatch) -> list[Tensor]:
    return [p.grad for _, p in batch.stacked_parameters() if p.grad is not None]


@torch.no_grad()
def per_model_grad_norms(batch: ModelBatch, norm_type: float = 2.0) -> Tensor:
    """``[N]`` total gradient norm of each model (over all its parameters), as
    :func:`torch.nn.utils.clip_grad_norm_` computes it for one model; zeros without gradients."""
    grads = _stacked_grads(batch)
    n = len(batch)
    if not grads:
        return torch.zeros(n, device=batch.device)
    norm_type = float(norm_type)
    dtype = grads[0].dtype
    for g in grads[1:]:
        dtype = torch.promote_types(dtype, g.dtype)
    per_param = torch.stack(
        [torch.linalg.vector_norm(g.reshape(n, -1), norm_type, dim=1).to(dtype) for g in grads]
    )  # [P, N]
    return torch.linalg.vector_norm(per_param, norm_type, dim=0)


@torch.no_grad()
def clip_grad_norm_per_model(batch: ModelBatch, max_norm: float, norm_type: float = 2.0) -> Tensor:
    """Clip each model's gradients to its own total norm ``max_norm``, in place.

    Model i's gradients are scaled by ``min(1, max_norm / (norm_i + 1e-6))`` where ``norm_i``
    is the ``norm_type`` norm over all of model i's gradients: what
    :func:`torch.nn.utils.clip_grad_norm_` does to that model trained alone.

    Args:
        batch: the ModelBatch whose stacked ``[N, ...]`` gradients are clipped.
        max_norm: largest allowed norm per model.
        norm_type: the p of the p-norm (``float("inf")`` for the max norm).

    Returns:
        ``[N]`` tensor of each model's gradient norm before clipping.
    """
    norms = per_model_grad_norms(batch, norm_type)
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in _stacked_grads(batch):
        g.mul_(coef.to(g.dtype).view(-1, *([1] * (g.dim() - 1))))
    return norms


@torch.no_grad()
def clip_grad_value_per_model(batch: ModelBatch, clip_value: float) -> None:
    """Clamp every gradient element to ``[-clip_value, clip_value]`` (element-wise, so it is
    per model already; the same as :func:`torch.nn.utils.clip_grad_value_`)."""
    for g in _stacked_grads(batch):
        g.clamp_(min=-clip_value, max=clip_value)


@torch.no_grad()
def per_model_metrics(
    outputs: Tensor, targets: Tensor, metrics: Mapping[str, MetricFn], *, per_model_targets: bool
) -> dict[str, Tensor]:
    """Evaluate single-model metrics on every model at once.

    Args:
        outputs: ``[N, B, ...]`` model outputs.
        targets: ``[B, ...]`` shared targets, or ``[N, B, ...]`` with ``per_model_targets``.
        metrics: name -> ``fn(output [B, ...], target [B, ...]) -> scalar``, written for one
            model (e.g. ``lambda o, y: (o.argmax(-1) == y).float().mean()``).
        per_model_targets: whether ``targets`` has the leading N dimension.

    Returns:
        name -> ``[N]`` tensor of per-model values.
    """
    t_dim = 0 if per_model_targets else None
    out: dict[str, Tensor] = {}
    for name, fn in metrics.items():
        values = vmap(fn, in_dims=(0, t_dim))(outputs.detach(), targets)
        if values.shape != (outputs.shape[0],):
            raise ValueError(
                f"metric {name!r} must return a scalar per model; got per-model shape "
                f"{tuple(values.shape[1:])}"
            )
        out[name] = values
    return out
