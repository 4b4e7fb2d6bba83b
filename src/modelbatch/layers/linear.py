"""``nn.Linear`` of its own: the N models' linear layers as ONE ``baddbmm``.

vmap's rule for ``F.linear`` (``addmm`` with a batched weight) runs a ``bmm``, then applies
the bias as a separate multiply and add: three kernels forward and three more backward per
layer, where one model alone runs one ``addmm``; and the weight's gradient comes out of the
``bmm`` transposed, so autograd copies it once more (a parameter that is a column range of
the flat ``[N, P]`` storage must get a contiguous gradient). On an MLP that is most of a
step's kernels.

When a :class:`~modelbatch.ModelBatch` is built, every exact ``nn.Linear`` of its stacked
mirror becomes a :class:`VmapLinear` (the class is swapped in place: parameter names,
checkpoints and ``extract`` are unchanged). Under the batch's vmap its forward computes the
N layers as one ``baddbmm(bias [N, 1, out], x [N, M, in], weight^T [N, in, out])`` (``bmm``
without a bias), with ``M`` the product of the leading dimensions of one model's input; a
shared input (the first layer of a batch whose models all see the same samples) is expanded
with stride 0, no copy. The operator :func:`batched_linear` carries its own backward: two
``bmm`` and one ``sum``, the weight's gradient contiguous ``[N, out, in]`` (one model alone
runs two ``mm`` and one ``sum``).

The layer runs its batching rule directly (:mod:`modelbatch.layers._direct`), only in the
plain case: the batch's vmap is the only functorch transform, no forward-mode AD level is
open and ``torch.compile`` is not involved. Anything else (an outer ``vmap``, ``grad`` or
``jvp``, a shared weight, a compiled forward) runs vmap's own ``F.linear`` rule, as before.

The result equals ``F.linear`` per model up to floating-point summation order (``bmm``
against ``addmm`` kernels), as vmap's own rule does; outside vmap the layer is ``nn.Linear``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modelbatch.layers import register_substitution
from modelbatch.layers._direct import call_rule, plain_level
from modelbatch.layers.conv import _autocast

__all__ = ["VmapLinear", "batched_linear"]


def _bmm_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    wt = weight.transpose(1, 2)
    if bias is None:
        return torch.bmm(x, wt)
    return torch.baddbmm(bias.unsqueeze(1), x, wt)


class _BatchedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _bmm_linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        # (conj: the complex convention of autograd's own bmm formulas; a no-op when real)
        grad_x = torch.bmm(grad, weight.conj()) if need[0] else None
        grad_w = torch.bmm(grad.transpose(1, 2), x.conj()) if need[1] else None
        grad_b = grad.sum(1) if ctx.has_bias and need[2] else None
        return grad_x, grad_w, grad_b


def batched_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """N linear layers at once: ``x [N, M, in]``, ``weight [N, out, in]``, ``bias [N, out]``
    or None -> ``[N, M, out]``, as one ``baddbmm`` (``bmm`` without a bias).

    Its backward is its own (not ``baddbmm``'s): ``grad [N, M, out]`` -> x ``bmm(grad,
    weight)``, weight ``bmm(grad^T, x)``, bias ``grad.sum(1)``, so that the weight's
    gradient comes out contiguous ``[N, out, in]``. Call it outside functorch transforms.
    """
    out: Tensor = _BatchedLinear.apply(x, weight, bias)
    return out


def _linear_rule(
    info: Any, in_dims: tuple[int | None, ...], input: Tensor, weight: Tensor, bias: Tensor | None
) -> tuple[Tensor, int]:
    """Batching rule: per model ``input [..., in]``, ``weight [out, in]``, ``bias [out]``,
    each batched at its ``in_dims`` entry or shared. Returns ``[N, ..., out]`` (model dim 0).
    """
    n = int(info.batch_size)
    x, w, b = (
        None if t is None else t.movedim(d, 0) if d is not None else t.expand(n, *t.shape)
        for t, d in zip((input, weight, bias), in_dims, strict=True)
    )
    assert x is not None and w is not None
    lead = x.shape[1:-1]
    # [N, M, in]; a view unless x is not contiguous. (M spelled out, not -1: with
    # in_features 0 the input has no elements and -1 would be ambiguous.)
    x3 = x.reshape(n, math.prod(lead), x.shape[-1])
    out = batched_linear(x3, w, b)
    return out.view(n, *lead, out.shape[-1]), 0


class VmapLinear(nn.Linear):
    """``nn.Linear`` whose N copies run as one :func:`batched_linear` under the batch's
    vmap (see the module docstring)."""

    def forward(self, input: Tensor) -> Tensor:
        level = plain_level(self.weight)
        # Autocast's casts first, on every path: a layer whose input is already in the
        # autocast dtype (the output of an earlier layer) must still run in that dtype, as
        # nn.Linear alone does. (vmap's own F.linear rule, given a bfloat16 input and a
        # float32 weight, adds the float32 bias after the bfloat16 bmm: a float32 output.)
        device_type = input.device.type
        input = _autocast(input, device_type)  # type: ignore[assignment]
        weight = _autocast(self.weight, device_type)
        bias = _autocast(self.bias, device_type)
        assert weight is not None
        if (
            level is None
            or input.dim() == 0
            or input.shape[-1] != weight.shape[-1]
            or input.dtype != weight.dtype
            or (bias is not None and bias.dtype != weight.dtype)
        ):
            return F.linear(input, weight, bias)  # (and F.linear's own errors)
        return call_rule(_linear_rule, level, input, weight, bias)


def _substitute(module: nn.Module, context: dict[str, object]) -> nn.Module:
    module.__class__ = VmapLinear
    return module


register_substitution(nn.Linear, _substitute)
