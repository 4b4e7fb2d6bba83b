"""Vectorised Adam and AdamW with per-model hyper-parameters."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from modelbatch.optim.base import BatchOptimizer, check_range, per_model_view

if TYPE_CHECKING:
    from modelbatch.core import ModelBatch

__all__ = ["Adam", "AdamW"]

Hp = float | Sequence[float]
Betas = tuple[float, float] | Sequence[tuple[float, float]]


class Adam(BatchOptimizer):
    """Adam over a :class:`~modelbatch.ModelBatch`, matching :class:`torch.optim.Adam`
    applied to each model alone (L2 weight decay added to the gradient).

    Every argument is a scalar or a length-N list; ``betas`` is one pair or N pairs.

    Args:
        batch: the ModelBatch to optimise.
        lr: learning rate.
        betas: coefficients of the running averages of the gradient and its square.
        eps: term added to the denominator.
        weight_decay: L2 penalty.
        amsgrad: use the AMSGrad variant.
        maximize: maximise the objective instead of minimising it.
    """

    _float_hparams = ("lr", "eps", "weight_decay", "betas")
    _bool_hparams = ("amsgrad", "maximize")
    _decoupled_weight_decay = False
    # exp_avg_sq would square complex gradients; torch.optim.Adam works on real views.
    _supports_complex = False

    def __init__(
        self,
        batch: ModelBatch,
        lr: Hp = 1e-3,
        betas: Betas = (0.9, 0.999),
        eps: Hp = 1e-8,
        weight_decay: Hp = 0.0,
        amsgrad: bool | Sequence[bool] = False,
        *,
        maximize: bool | Sequence[bool] = False,
    ) -> None:
        super().__init__(
            batch,
            {
                "lr": lr,
                "betas": betas,
                "eps": eps,
                "weight_decay": weight_decay,
                "amsgrad": amsgrad,
                "maximize": maximize,
            },
        )

    def _validate(self, group: Mapping[str, Any], i: int) -> None:
        for name in ("lr", "eps", "weight_decay"):
            check_range(self, group, i, name)
        for k, beta in enumerate(group["betas"]):
            if not 0.0 <= beta < 1.0:
                raise self._error(i, f"invalid beta parameter at index {k}: {beta}")

    def _init_state(self, p: Tensor, state: dict[str, Any]) -> None:
        super()._init_state(p, state)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if self.any_hparam("amsgrad"):
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _update_param(self, name: str, p: Tensor, grad: Tensor, state: dict[str, Any]) -> None:
        step = state["step"]
        step += 1
        if self.any_hparam("maximize"):
            grad = torch.where(per_model_view(self.hparam("maximize", p), p), -grad, grad)
        lr = self.hparam("lr", p)
        if self.any_hparam("weight_decay"):
            wd = self.hparam("weight_decay", p)
            if self._decoupled_weight_decay:
                p.mul_(per_model_view(1 - lr * wd, p))
            else:
                grad = grad + per_model_view(wd, p) * p
        beta1 = self.hparam("betas", p, 0)
        beta2 = self.hparam("betas", p, 1)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(grad, per_model_view(1 - beta1, p))
        exp_avg_sq.mul_(per_model_view(beta2, p)).addcmul_(
            grad * per_model_view(1 - beta2, p), grad
        )

        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = lr / bias_correction1
        bias_correction2_sqrt = bias_correction2.sqrt()

        second = exp_avg_sq
        if self.any_hparam("amsgrad"):
            max_sq = state.get("max_exp_avg_sq")
            if max_sq is None:  # amsgrad switched on after the state was created
                max_sq = exp_avg_sq.clone()
            max_sq = torch.maximum(max_sq, exp_avg_sq)
            state["max_exp_avg_sq"] = max_sq
            second = torch.where(per_model_view(self.hparam("amsgrad", p), p), max_sq, exp_avg_sq)
        denom = (second.sqrt() / per_model_view(bias_correction2_sqrt, p)).add_(
            per_model_view(self.hparam("eps", p), p)
        )
        p.addcdiv_(exp_avg * per_model_view(-step_size, p), denom)


class AdamW(Adam):
    """AdamW (decoupled weight decay) over a :class:`~modelbatch.ModelBatch`, matching
    :class:`torch.optim.AdamW` applied to each model alone. Same arguments as :class:`Adam`;
    ``weight_decay`` defaults to 0.01 as in PyTorch."""

    _decoupled_weight_decay = True

    def __init__(
        self,
        batch: ModelBatch,
        lr: Hp = 1e-3,
        betas: Betas = (0.9, 0.999),
        eps: Hp = 1e-8,
        weight_decay: Hp = 1e-2,
        amsgrad: bool | Sequence[bool] = False,
        *,
        maximize: bool | Sequence[bool] = False,
    ) -> None:
        super().__init__(batch, lr, betas, eps, weight_decay, amsgrad, maximize=maximize)
