"""Per-model settings inside one batch: LayerNorm/GroupNorm ``eps``, LeakyReLU slope.

Models that differ only in such a setting (an eps or slope sweep) share one batch: when a
:class:`~modelbatch.ModelBatch` is built and the N models' values differ, the layer of the
stacked mirror becomes the ``PerModel*`` class below (the class is swapped in place, so
parameter names, checkpoints and ``extract`` are unchanged). It records the N values as
``per_model_<attr>`` (a list, in model order) and keeps them as an ``[N]`` non-persistent
buffer ``_per_model_<attr>``, which ``vmap`` hands to each model as its own 0-dim value.
When all models agree, the layer is left as it is (torch's own kernel).

The buffer holds the float64 bit patterns as int64 (:func:`per_model_floats`), so that
``batch.float()`` or ``batch.half()`` cannot round the settings. The dropout layers
(:mod:`modelbatch.layers.dropout`) keep their per-model rates the same way.

Numerics: LayerNorm and GroupNorm with per-model eps are computed from their definition
(``(x - mean) / sqrt(var + eps) * weight + bias``, biased variance), equal to torch's
kernels up to rounding (float64: about 1e-16 relative). They return the dtype torch's op
returns for the same input (under autocast: float32 on CUDA, the input's dtype on CPU) and
compute half and bfloat16 in float32, as torch's kernels do. LeakyReLU is exact.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modelbatch._structure import ArchitectureMismatchError, same_setting
from modelbatch.layers import register_substitution

__all__ = [
    "PerModelAttribute",
    "PerModelGroupNorm",
    "PerModelLayerNorm",
    "PerModelLeakyReLU",
    "attach_per_model",
    "per_model_floats",
    "read_per_model",
]


def per_model_floats(values: Sequence[float], device: Any = None) -> Tensor:
    """``[N]`` int64 tensor holding the float64 bit patterns of ``values``.

    Integer buffers are moved by ``.to(device)`` but never cast by ``.to(dtype)`` /
    ``.half()``, so the values stay exact; :func:`read_per_model` reads them back.
    """
    floats = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    return floats.view(torch.int64)


def read_per_model(bits: Tensor) -> Tensor:
    """The float64 values stored by :func:`per_model_floats` (inside the batch's vmap: this
    model's 0-dim value)."""
    return bits.view(torch.float64)


def attach_per_model(module: nn.Module, attr: str, values: Sequence[float], device: Any) -> None:
    """Record per-model ``values`` of setting ``attr`` on ``module``: the list
    ``per_model_<attr>`` and the ``[N]`` non-persistent buffer ``_per_model_<attr>``."""
    setattr(module, f"per_model_{attr}", [float(v) for v in values])
    module.register_buffer(f"_per_model_{attr}", per_model_floats(values, device), persistent=False)


def differing_values(peers: Sequence[nn.Module], attr: str) -> list[float] | None:
    """The N models' values of ``attr`` (as floats) when they differ, else ``None``."""
    values = [float(getattr(p, attr)) for p in peers]
    if len(values) < 2 or all(v == values[0] for v in values):
        return None
    return values


class PerModelAttribute:
    """The plain attribute ``attr`` of a layer that runs a per-model setting (dropout ``p``,
    normalisation ``eps``, BatchNorm ``momentum``, LeakyReLU ``negative_slope``).

    The layer runs model i's own value from ``per_model_<attr>``; the attribute itself holds
    one value only (model 0's). Reading it while the models' values differ raises
    :class:`~modelbatch.ArchitectureMismatchError`: code that reads the setting instead of
    calling the layer (timm's attention passes ``dropout_p=self.attn_drop.p`` to
    ``scaled_dot_product_attention``) would otherwise run model 0's value in every model.
    Assigning it inside a batch raises too (the layer would keep running the recorded
    values), unless the layer's class defines ``_set_per_model(attr, value)`` to apply it.
    """

    def __init__(self, attr: str) -> None:
        self.attr = attr

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        try:
            value = vars(obj)[self.attr]
        except KeyError:
            raise AttributeError(
                f"'{type(obj).__name__}' object has no attribute '{self.attr}'"
            ) from None
        values = _recorded(obj, self.attr)
        if not values:
            return value
        if any(not same_setting(v, values[0]) for v in values):
            raise ArchitectureMismatchError(
                f"{_where(obj)}: its '{self.attr}' was read directly, but the models of this "
                f"batch have different values {values} (one per model, in position order). One "
                f"Python number cannot be each model's own: every model would run model 0's. "
                f"Way out: call the layer (e.g. `self.drop(x)`, `self.norm(x)`) instead of "
                f"reading its {self.attr} in the model's code, or put models with different "
                f"{self.attr} in separate batches."
            )
        return values[0]  # the models' one value (model 0 may have been dropped since)

    def __set__(self, obj: Any, value: Any) -> None:
        if _recorded(obj, self.attr) is not None:
            apply = getattr(obj, "_set_per_model", None)
            if apply is None or not apply(self.attr, value):
                raise ArchitectureMismatchError(
                    f"{_where(obj)}: cannot set '{self.attr}' = {value!r} inside a batch: each "
                    f"model runs its own {self.attr}, recorded when the batch was built "
                    f"({_recorded(obj, self.attr)}). Set it on the models before building the "
                    "batch."
                )
        vars(obj)[self.attr] = value


def _recorded(obj: Any, attr: str) -> list[Any] | None:
    """The per-model values of ``attr`` the layer runs, or None (one value, the attribute)."""
    try:
        values = getattr(obj, f"per_model_{attr}", None)
    except AttributeError:  # a property read before the layer was set up
        return None
    return list(values) if values is not None else None


def repr_per_model(module: nn.Module, base: type[nn.Module], attrs: Sequence[str]) -> str:
    """``base.extra_repr`` of ``module`` with each of ``attrs`` shown as its per-model list
    (read on a shallow copy: torch's reprs format ``module.__dict__``)."""
    shown = object.__new__(type(module))
    shown.__dict__.update(module.__dict__)
    for attr in attrs:
        values = _recorded(module, attr)
        if values is not None:
            shown.__dict__[attr] = values if len(set(map(repr, values))) > 1 else values[0]
    return base.extra_repr(shown)


def _where(obj: Any) -> str:
    path = vars(obj).get("_mb_path")
    name = type(obj).__name__
    return f"submodule {path or '<root>'!r} ({name})" if path is not None else f"a {name}"


_LOW = (torch.float16, torch.bfloat16)
# (op, device type, input dtype, autocast dtype) -> the dtype torch's op returns there.
_AUTOCAST_OUT: dict[tuple[str, str, torch.dtype, torch.dtype], torch.dtype] = {}


def _dtypes(
    x: Tensor, op: str, probe: Callable[[Tensor], Tensor]
) -> tuple[torch.dtype, torch.dtype]:
    """``(compute dtype, output dtype)`` for a normalisation of ``x``, as torch's kernel does
    it: the output dtype is what torch's op returns for this input (under autocast, what
    the autocast policy of this device gives: float32 on CUDA, the input's dtype on CPU;
    learnt once from ``probe`` on an empty tensor); half and bfloat16 are computed in
    float32, as torch's kernels do internally."""
    out = x.dtype
    if x.is_floating_point() and torch.is_autocast_enabled(x.device.type):
        key = (op, x.device.type, x.dtype, torch.get_autocast_dtype(x.device.type))
        if key not in _AUTOCAST_OUT:
            with torch.no_grad():
                _AUTOCAST_OUT[key] = probe(torch.empty(0, device=x.device, dtype=x.dtype)).dtype
        out = _AUTOCAST_OUT[key]
    compute = torch.float32 if (out in _LOW or x.dtype in _LOW) else out
    return compute, out


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


def _normalize(x: Tensor, dims: tuple[int, ...], eps: Tensor) -> Tensor:
    var, mean = torch.var_mean(x, dim=dims, correction=0, keepdim=True)
    return (x - mean) * torch.rsqrt(var + eps.to(var.dtype))


class PerModelLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` whose ``eps`` is model i's own inside a batch (see the module
    docstring). Per model: input ``[*, *normalized_shape]``."""

    per_model_eps: list[float]
    _per_model_eps: Tensor
    eps = PerModelAttribute("eps")  # type: ignore[assignment]

    def extra_repr(self) -> str:
        return repr_per_model(self, nn.LayerNorm, ("eps",))

    def forward(self, input: Tensor) -> Tensor:
        k = len(self.normalized_shape)
        if tuple(input.shape[input.dim() - k :]) != tuple(self.normalized_shape):
            raise RuntimeError(
                f"Given normalized_shape={list(self.normalized_shape)}, expected input with "
                f"shape [*, {', '.join(map(str, self.normalized_shape))}], but got input of "
                f"size {list(input.shape)}"
            )
        compute, out_dtype = _dtypes(
            input,
            "layer_norm",
            lambda e: F.layer_norm(e.view(0, *self.normalized_shape), self.normalized_shape),
        )
        x = input.to(compute)
        eps = read_per_model(self._per_model_eps)
        out = _normalize(x, tuple(range(x.dim() - k, x.dim())), eps)
        weight, bias = _cast(self.weight, compute), _cast(self.bias, compute)
        if weight is not None:
            out = out * weight
        if bias is not None:
            out = out + bias
        return out.to(out_dtype)


class PerModelGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` whose ``eps`` is model i's own inside a batch (see the module
    docstring). Per model: input ``[B, C, *]``."""

    per_model_eps: list[float]
    _per_model_eps: Tensor
    eps = PerModelAttribute("eps")  # type: ignore[assignment]

    def extra_repr(self) -> str:
        return repr_per_model(self, nn.GroupNorm, ("eps",))

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() < 2:
            raise RuntimeError(
                f"Expected at least 2 dimensions for input tensor but received {input.dim()}"
            )
        b, c = input.shape[0], input.shape[1]
        if c != self.num_channels or c % self.num_groups:
            raise RuntimeError(
                f"GroupNorm({self.num_groups}, {self.num_channels}) expects an input of shape "
                f"[B, {self.num_channels}, *], got {list(input.shape)}"
            )
        compute, out_dtype = _dtypes(
            input, "group_norm", lambda e: F.group_norm(e.view(0, c), self.num_groups)
        )
        x = input.to(compute)
        grouped = x.reshape(b, self.num_groups, -1)
        out = _normalize(grouped, (2,), read_per_model(self._per_model_eps)).reshape(x.shape)
        weight, bias = _cast(self.weight, compute), _cast(self.bias, compute)
        if weight is not None and bias is not None:
            shape = (c,) + (1,) * (x.dim() - 2)
            out = out * weight.reshape(shape) + bias.reshape(shape)
        return out.to(out_dtype)


class PerModelLeakyReLU(nn.LeakyReLU):
    """``nn.LeakyReLU`` whose ``negative_slope`` is model i's own inside a batch; exactly
    ``F.leaky_relu`` (the product is formed in float32 for half/bfloat16 inputs, as torch's
    kernel does). With ``inplace=True`` the result is written into the input, as torch's
    in-place LeakyReLU does (a model may rely on its input being overwritten)."""

    per_model_negative_slope: list[float]
    _per_model_negative_slope: Tensor
    negative_slope = PerModelAttribute("negative_slope")  # type: ignore[assignment]

    def extra_repr(self) -> str:
        inplace = ", inplace=True" if self.inplace else ""
        return f"negative_slope={self.per_model_negative_slope}{inplace}"

    def forward(self, input: Tensor) -> Tensor:
        slope = read_per_model(self._per_model_negative_slope)
        low = input.dtype in (torch.float16, torch.bfloat16)
        compute = torch.float32 if low else input.dtype
        negative = (input.to(compute) * slope.to(compute)).to(input.dtype)
        out = torch.where(input > 0, input, negative)
        return input.copy_(out) if self.inplace else out


_REPLACEMENTS: dict[type[nn.Module], tuple[type[nn.Module], str]] = {
    nn.LayerNorm: (PerModelLayerNorm, "eps"),
    nn.GroupNorm: (PerModelGroupNorm, "eps"),
    nn.LeakyReLU: (PerModelLeakyReLU, "negative_slope"),
}


def _substitute(module: nn.Module, context: dict[str, object]) -> nn.Module:
    new_cls, attr = _REPLACEMENTS[type(module)]
    peers = context.get("peers") or []
    values = differing_values(peers, attr)  # type: ignore[arg-type]
    if values is None:
        return module
    module.__class__ = new_cls
    attach_per_model(module, attr, values, context.get("device"))
    return module


for _cls in _REPLACEMENTS:
    register_substitution(_cls, _substitute)
