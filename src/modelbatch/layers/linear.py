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

The layer unwraps the batched tensors itself (what a ``torch.library.register_vmap`` rule
gets, without that machinery's per-call Python cost, which at tiny sizes is more than the
kernels it saves). It does so only in the plain case: the batch's vmap is the only functorch
transform, no forward-mode AD level is open and ``torch.compile`` is not tracing. Anything
else (an outer ``vmap``, ``grad`` or ``jvp``, a shared weight, a compiled forward) runs vmap's
own ``F.linear`` rule, as before.

The result equals ``F.linear`` per model up to floating-point summation order (``bmm``
against ``addmm`` kernels), as vmap's own rule does; outside vmap the layer is ``nn.Linear``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._C import _functorch

from modelbatch.layers import register_substitution
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


def _compile_callback() -> object:
    """torch.compile's frame callback while a compiled function runs (None outside)."""
    get = getattr(torch._C._dynamo.eval_frame, "get_eval_frame_callback", None)
    return None if get is None else get()


def _batch_level(weight: Tensor) -> int | None:
    """The vmap level to compute at, in the plain case only (see the module docstring): one
    functorch transform, a vmap, with the weight batched at it; no forward-mode AD."""
    # Traced by torch.compile (and so fused by it), or run eagerly inside a compiled
    # function after a graph break, where torch.compile would try to trace the plain-tensor
    # code below as a frame of its own: vmap's own rule.
    if torch.compiler.is_compiling() or _compile_callback() is not None:
        return None
    stack = _functorch.get_interpreter_stack()
    if stack is None or len(stack) != 1:
        return None
    interpreter = stack[0]
    if interpreter.key() != _functorch.TransformType.Vmap:
        return None
    if getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0:
        return None
    level = int(interpreter.level())
    if _functorch.maybe_get_level(weight) != level:
        return None
    return level


def _unwrap(t: Tensor, level: int, n: int) -> Tensor:
    """``t`` at ``level`` as a plain tensor with the model dimension first (shared: expanded)."""
    value, dim = _functorch._unwrap_batched(t, level)
    return value.movedim(dim, 0) if dim is not None else value.expand(n, *value.shape)


class VmapLinear(nn.Linear):
    """``nn.Linear`` whose N copies run as one :func:`batched_linear` under the batch's
    vmap (see the module docstring)."""

    def forward(self, input: Tensor) -> Tensor:
        level = _batch_level(self.weight)
        if level is None:
            return F.linear(input, self.weight, self.bias)
        device_type = input.device.type
        x_b = _autocast(input, device_type)
        w_b = _autocast(self.weight, device_type)
        b_b = _autocast(self.bias, device_type)
        assert x_b is not None and w_b is not None
        w, b_dim = _functorch._unwrap_batched(w_b, level)
        assert b_dim is not None
        w = w.movedim(b_dim, 0)
        n = w.shape[0]
        x = _unwrap(x_b, level, n)
        b = None if b_b is None else _unwrap(b_b, level, n)
        if (
            x.dim() < 2
            or w.dim() != 3
            or x.shape[-1] != w.shape[-1]
            or x.dtype != w.dtype
            or (b is not None and b.dtype != w.dtype)
        ):
            return F.linear(input, self.weight, self.bias)  # F.linear's own error
        lead = x.shape[1:-1]
        x3 = x.reshape(n, -1, x.shape[-1])  # [N, M, in]; a view unless x is not contiguous
        saved = _functorch.pop_dynamic_layer_stack()
        try:
            out = batched_linear(x3, w, b)
        finally:
            _functorch.push_dynamic_layer_stack(saved)
        return _functorch._add_batch_dim(out.view(n, *lead, out.shape[-1]), 0, level)


def _substitute(module: nn.Module, context: dict[str, object]) -> nn.Module:
    module.__class__ = VmapLinear
    return module


register_substitution(nn.Linear, _substitute)
