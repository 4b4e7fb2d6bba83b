"""Convolutions in a batch: autocast's casts under vmap, and opt-in channels_last grouped
convolutions for ``nn.Conv2d``.

Every exact ``nn.Conv1d/2d/3d`` and ``nn.ConvTranspose1d/2d/3d`` of a batch's stacked mirror
becomes the matching ``Autocast*`` class below (swapped in place, names unchanged), which
applies autocast's lower-precision casts itself: under vmap a convolution reaches autocast as
``aten::convolution``, which CPU autocast does not list, so it would run in float32 where the
model alone runs in bfloat16.

Under ``vmap``, a convolution whose input and weight are both batched becomes one grouped
convolution (``groups = N``) on an NCHW tensor ``[B, N*C, H, W]``; a shared input with a
batched weight becomes one ordinary convolution with ``N*Cout`` output channels. The same
grouped convolution in channels_last (NHWC) memory format ran 2.1-2.6x faster per layer on an
H200 (bf16, fwd+bwd), but vmap refuses channels_last inputs ("NYI: querying is_contiguous
inside of vmap for memory_format other than torch.contiguous_format").

When a :class:`~modelbatch.ModelBatch` is built with ``conv_layout="channels_last"``, every
exact ``nn.Conv2d`` of its stacked mirror becomes a :class:`VmapConv2d` (the class is swapped
in place: parameter names, checkpoints and ``extract`` are unchanged). Its forward calls the
custom operator ``modelbatch::conv2d``, whose vmap batching rule runs the N convolutions as
one convolution on a channels_last ``[B, N*C, H, W]`` tensor and returns the result as a
``[B, N, Cout, H', W']`` view, so the activations stay channels_last from layer to layer
(BatchNorm, ReLU and additions keep the memory format).

Autograd: the batching rule runs *before* autograd (vmap's dispatch key is above autograd's),
so when ``loss.backward()`` runs outside vmap, autograd records the ordinary operations the
rule ran (reshape, memory-format copy, convolution) and differentiates those. The operator's
own autograd formula (``aten.convolution_backward``) is only used outside vmap, where
``modelbatch::conv2d`` is a plain convolution; both are tested against ``nn.Conv2d``.

The results equal the default lowering up to floating-point summation order (the
convolution kernels differ), not bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from modelbatch.layers import register_substitution
from modelbatch.layers._direct import call_rule, plain_level

__all__ = [
    "CONV_LAYOUTS",
    "AutocastConv1d",
    "AutocastConv2d",
    "AutocastConv3d",
    "AutocastConvTranspose1d",
    "AutocastConvTranspose2d",
    "AutocastConvTranspose3d",
    "ChannelsLastViews",
    "VmapConv2d",
    "conv2d",
]

#: Accepted values of ``ModelBatch(..., conv_layout=...)``.
CONV_LAYOUTS = ("default", "channels_last")


@torch.library.custom_op("modelbatch::conv2d", mutates_args=())
def conv2d(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> Tensor:
    """``F.conv2d`` with integer padding, as an operator with a channels_last vmap rule.

    Outside vmap it is exactly ``F.conv2d(input [B, C, H, W], weight [Cout, C/groups, kh,
    kw], bias [Cout] or None, ...)``. Under vmap see :func:`_conv2d_vmap`.
    """
    return F.conv2d(input, weight, bias, list(stride), list(padding), list(dilation), groups)


@conv2d.register_fake
def _conv2d_fake(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> Tensor:
    return F.conv2d(input, weight, bias, list(stride), list(padding), list(dilation), groups)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    input, weight, bias, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(input, weight)
    ctx.conf = (bias is not None, list(stride), list(padding), list(dilation), int(groups))


def _backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
    input, weight = ctx.saved_tensors
    has_bias, stride, padding, dilation, groups = ctx.conf
    need = ctx.needs_input_grad
    grad_input, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
        grad,
        input,
        weight,
        [weight.shape[0]] if has_bias else None,
        stride,
        padding,
        dilation,
        False,
        [0, 0],
        groups,
        [bool(need[0]), bool(need[1]), has_bias and bool(need[2])],
    )
    return grad_input, grad_weight, grad_bias, None, None, None, None


conv2d.register_autograd(_backward, setup_context=_setup_context)


def _conv2d_vmap(
    info: Any,
    in_dims: tuple[int | None, ...],
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> tuple[Tensor, int]:
    """Batching rule: the N convolutions as one channels_last convolution.

    Per model: input ``[B, C, H, W]`` (batched: the model dimension at ``in_dims[0]``, or
    shared), weight ``[Cout, C/g, kh, kw]``, bias ``[Cout]`` or None. Returns the output as
    a ``[B, N, Cout, H', W']`` view of a channels_last ``[B, N*Cout, H', W']`` tensor, with
    the model dimension at 1.
    """
    x_dim, w_dim, b_dim = in_dims[0], in_dims[1], in_dims[2]
    n = int(info.batch_size)
    # A shared weight or bias (not the case inside a ModelBatch) is expanded per model.
    w = weight.movedim(w_dim, 0) if w_dim is not None else weight.expand(n, *weight.shape)
    cout = w.shape[1]
    b = None
    if bias is not None:
        b = bias.movedim(b_dim, 0) if b_dim is not None else bias.expand(n, *bias.shape)
        b = b.reshape(n * cout)
    stride, padding, dilation = list(stride), list(padding), list(dilation)
    if x_dim is None:
        # Shared input: one ordinary convolution with N*Cout output channels. With groups g,
        # output block j must see input group j: order the weights [g, N, Cout/g].
        x = input.contiguous(memory_format=torch.channels_last)
        if groups == 1:
            out = F.conv2d(x, w.reshape(n * cout, *w.shape[2:]), b, stride, padding, dilation)
            return out.unflatten(1, (n, cout)), 1
        per = cout // groups
        wg = w.unflatten(1, (groups, per)).transpose(0, 1).reshape(n * cout, *w.shape[2:])
        bg = None if b is None else b.view(n, groups, per).transpose(0, 1).reshape(-1)
        out = F.conv2d(x, wg, bg, stride, padding, dilation, groups)
        # Reorder the channels [g, N, Cout/g] -> [N, g, Cout/g] in NHWC order (one copy).
        nhwc = out.permute(0, 2, 3, 1).unflatten(3, (groups, n, per)).transpose(3, 4)
        out = nhwc.reshape(*nhwc.shape[:3], n * cout).permute(0, 3, 1, 2)
        return out.unflatten(1, (n, cout)), 1
    # Batched input: [B, N, C, H, W] -> [B, N*C, H, W] (a view when the previous layer was
    # one of these convolutions), one grouped convolution with groups g*N.
    x = input.movedim(x_dim, 1)
    x = x.reshape(x.shape[0], n * x.shape[2], *x.shape[3:])
    x = x.contiguous(memory_format=torch.channels_last)
    out = F.conv2d(x, w.reshape(n * cout, *w.shape[2:]), b, stride, padding, dilation, groups * n)
    return out.unflatten(1, (n, cout)), 1


torch.library.register_vmap(conv2d, _conv2d_vmap)


def _autocast_on(device_type: str) -> bool:
    """Whether autocast is enabled for ``device_type`` (never on a device type it does not
    know, such as ``meta``: asking whether it is enabled there raises)."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(
        device_type
    )


def _autocast(t: Tensor | None, device_type: str) -> Tensor | None:
    """Cast like autocast's lower-precision policy: floating, non-float64 tensors only."""
    if t is None or not _autocast_on(device_type):
        return t
    dtype = torch.get_autocast_dtype(device_type)
    if t.is_floating_point() and t.dtype not in (torch.float64, dtype):
        return t.to(dtype)
    return t


class VmapConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose convolution runs through ``modelbatch::conv2d``.

    The same function as ``nn.Conv2d`` (every padding mode, string paddings, groups,
    dilation, autocast), but under vmap the N models' convolutions run as one channels_last
    convolution. Built by ``ModelBatch(..., conv_layout="channels_last")``.
    """

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if input.dim() == 3:  # an unbatched [C, H, W] input, as nn.Conv2d accepts
            return self._conv_forward(input.unsqueeze(0), weight, bias).squeeze(0)
        padding: list[int]
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = [0, 0]
        elif isinstance(self.padding, str):
            padding = []
            extra = []  # F.pad order: (left W, right W, top H, bottom H)
            for k, d in zip(self.kernel_size, self.dilation, strict=True):
                total = d * (k - 1) if self.padding == "same" else 0
                padding.append(total // 2)
                extra.append(total - 2 * (total // 2))  # odd totals: one more at the end
            if any(extra):
                input = F.pad(input, (0, extra[1], 0, extra[0]))
        else:
            padding = [int(p) for p in self.padding]
        device_type = input.device.type
        args = (
            _autocast(input, device_type),
            _autocast(weight, device_type),
            _autocast(bias, device_type),
            list(self.stride),
            padding,
            list(self.dilation),
            self.groups,
        )
        # In the plain case the batching rule directly, without the operator's per-call
        # Python cost (modelbatch.layers._direct).
        level = plain_level(weight)
        if level is None:
            return conv2d(*args)  # type: ignore[arg-type]
        return call_rule(_conv2d_vmap, level, *args)


class ChannelsLastViews(TorchFunctionMode):
    """While active, ``Tensor.view`` falls back to ``reshape`` when the tensor's strides
    forbid the view.

    Outputs of :class:`VmapConv2d` under vmap are channels_last, so a flatten written as
    ``x.view(x.size(0), -1)`` (fine on the NCHW tensor a model alone has) cannot be a view;
    ``reshape`` gives the same values as a copy. The only difference from the model alone is
    aliasing: an in-place write into the result does not reach ``x``. Used by
    :class:`~modelbatch.ModelBatch` around its forward when ``conv_layout="channels_last"``.
    """

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is not Tensor.view:
            return func(*args, **kwargs)
        try:
            return func(*args, **kwargs)
        except RuntimeError as e:
            if "view size is not compatible" not in str(e) or kwargs or len(args) < 2:
                raise
            if isinstance(args[1], torch.dtype):  # a dtype view: not a shape
                raise
            shape = args[1] if len(args) == 2 and not isinstance(args[1], int) else args[1:]
            return args[0].reshape(*shape)


class _AutocastConvMixin:
    """The default-layout convolution with autocast's casts applied first.

    Under vmap, a convolution reaches autocast as ``aten::convolution``, which CPU autocast
    does not list (it lists ``conv1d/2d/3d``): in a batch the convolution would run in float32
    where the model alone runs in bfloat16. Casting the operands as autocast's
    lower-precision policy does gives the model alone's dtype on every device (on a GPU,
    where autocast lists ``convolution``, the casts are the ones it would make)."""

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        device_type = input.device.type
        out: Tensor = super()._conv_forward(  # type: ignore[misc]
            _autocast(input, device_type),
            _autocast(weight, device_type),
            _autocast(bias, device_type),
        )
        return out


class AutocastConv1d(_AutocastConvMixin, nn.Conv1d):
    """``nn.Conv1d`` in a batch (default layout): see :class:`_AutocastConvMixin`."""


class AutocastConv2d(_AutocastConvMixin, nn.Conv2d):
    """``nn.Conv2d`` in a batch (default layout): see :class:`_AutocastConvMixin`."""


class AutocastConv3d(_AutocastConvMixin, nn.Conv3d):
    """``nn.Conv3d`` in a batch (default layout): see :class:`_AutocastConvMixin`."""


class _AutocastConvTransposeMixin:
    """The transposed convolution with autocast's casts applied first (the same reason as
    :class:`_AutocastConvMixin`); without autocast, ``nn.ConvTranspose*d``'s own forward."""

    _conv_transpose: Any
    _spatial: int

    def forward(self, input: Tensor, output_size: list[int] | None = None) -> Tensor:
        conv: Any = self
        device_type = input.device.type
        if conv.padding_mode != "zeros" or not _autocast_on(device_type):
            out: Tensor = super().forward(input, output_size)  # type: ignore[misc]
            return out
        output_padding = conv._output_padding(
            input,
            output_size,
            conv.stride,
            conv.padding,
            conv.kernel_size,
            self._spatial,
            conv.dilation,
        )
        return self._conv_transpose(  # type: ignore[no-any-return]
            _autocast(input, device_type),
            _autocast(conv.weight, device_type),
            _autocast(conv.bias, device_type),
            conv.stride,
            conv.padding,
            output_padding,
            conv.groups,
            conv.dilation,
        )


class AutocastConvTranspose1d(_AutocastConvTransposeMixin, nn.ConvTranspose1d):
    """``nn.ConvTranspose1d`` in a batch: see :class:`_AutocastConvTransposeMixin`."""

    _conv_transpose = staticmethod(F.conv_transpose1d)
    _spatial = 1


class AutocastConvTranspose2d(_AutocastConvTransposeMixin, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` in a batch: see :class:`_AutocastConvTransposeMixin`."""

    _conv_transpose = staticmethod(F.conv_transpose2d)
    _spatial = 2


class AutocastConvTranspose3d(_AutocastConvTransposeMixin, nn.ConvTranspose3d):
    """``nn.ConvTranspose3d`` in a batch: see :class:`_AutocastConvTransposeMixin`."""

    _conv_transpose = staticmethod(F.conv_transpose3d)
    _spatial = 3


def _substitute(module: nn.Module, context: dict[str, object]) -> nn.Module:
    layout = context.get("conv_layout", "default")
    if layout not in CONV_LAYOUTS:
        raise ValueError(f"conv_layout must be one of {CONV_LAYOUTS}, got {layout!r}")
    if layout == "channels_last" and type(module) is nn.Conv2d:
        module.__class__ = VmapConv2d
        return module
    module.__class__ = _AUTOCAST_CLASSES[type(module)]
    return module


_AUTOCAST_CLASSES: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: AutocastConv1d,
    nn.Conv2d: AutocastConv2d,
    nn.Conv3d: AutocastConv3d,
    nn.ConvTranspose1d: AutocastConvTranspose1d,
    nn.ConvTranspose2d: AutocastConvTranspose2d,
    nn.ConvTranspose3d: AutocastConvTranspose3d,
}
for _cls in _AUTOCAST_CLASSES:
    register_substitution(_cls, _substitute)
