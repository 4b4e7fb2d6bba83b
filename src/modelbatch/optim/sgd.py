"""Vectorised SGD with per-model momentum, dampening, Nesterov and weight decay."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from modelbatch.optim.base import BatchOptimizer, check_range, per_model_view

if TYPE_CHECKING:
    from modelbatch.core import ModelBatch

__all__ = ["SGD"]

Hp = float | Sequence[float]


def _is_zero(value: float) -> bool:
    return value == 0


class SGD(BatchOptimizer):
    """Stochastic gradient descent over a :class:`~modelbatch.ModelBatch`, matching
    :class:`torch.optim.SGD` applied to each model alone.

    Every argument is a scalar (shared by all models) or a length-N list (one per model).

    Args:
        batch: the ModelBatch to optimise.
        lr: learning rate.
        momentum: momentum factor (0 disables momentum for that model).
        dampening: dampening of the momentum.
        weight_decay: L2 penalty added to the gradient.
        nesterov: Nesterov momentum (needs momentum > 0 and dampening 0).
        maximize: maximise the objective instead of minimising it.
    """

    _float_hparams = ("lr", "momentum", "dampening", "weight_decay")
    _bool_hparams = ("nesterov", "maximize")

    def __init__(
        self,
        batch: ModelBatch,
        lr: Hp = 1e-3,
        momentum: Hp = 0.0,
        dampening: Hp = 0.0,
        weight_decay: Hp = 0.0,
        nesterov: bool | Sequence[bool] = False,
        *,
        maximize: bool | Sequence[bool] = False,
    ) -> None:
        super().__init__(
            batch,
            {
                "lr": lr,
                "momentum": momentum,
                "dampening": dampening,
                "weight_decay": weight_decay,
                "nesterov": nesterov,
                "maximize": maximize,
            },
        )

    def _validate(self, group: Mapping[str, Any], i: int) -> None:
        for name in ("lr", "momentum", "weight_decay"):
            check_range(self, group, i, name)
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise self._error(i, "Nesterov momentum requires a momentum and zero dampening")

    def _update_param(self, name: str, p: Tensor, grad: Tensor, state: dict[str, Any]) -> None:
        step = state["step"]
        if self.any_hparam("maximize"):
            grad = torch.where(per_model_view(self.hparam("maximize", p), p), -grad, grad)
        if self.any_hparam("weight_decay"):
            grad = grad + per_model_view(self.hparam("weight_decay", p), p) * p
        if self.any_hparam("momentum"):
            momentum = per_model_view(self.hparam("momentum", p), p)
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = grad.clone()
            else:
                # A model's first step copies the gradient (as torch.optim.SGD does when
                # it creates the buffer); later steps apply momentum and dampening.
                damp = per_model_view(1 - self.hparam("dampening", p), p)
                first = per_model_view(step == 0, p)
                buf = torch.where(first, grad, buf * momentum + grad * damp)
            state["momentum_buffer"] = buf
            if self.any_hparam("nesterov"):
                nesterov = per_model_view(self.hparam("nesterov", p), p)
                update = torch.where(nesterov, grad + buf * momentum, buf)
            else:
                update = buf
            if self.any_hparam("momentum", _is_zero):  # some models without momentum
                update = torch.where(momentum != 0, update, grad)
        else:
            update = grad
        p.add_(update * per_model_view(-self.hparam("lr", p), p))
        step += 1
