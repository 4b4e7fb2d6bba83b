"""Running a layer's batching rule directly from its forward, in the plain case.

The layers of :mod:`modelbatch.layers` compute the N models at once in a batching rule: a
function ``rule(info, in_dims, *args) -> (output, out_dim)`` on plain tensors with the model
dimension at ``in_dims[k]``, as ``torch.library.register_vmap`` takes. Reached through a
custom operator, that rule costs tens of microseconds of Python per call (argument
normalisation, pytree passes, output wrapping), more than the kernels it saves at small
sizes. :func:`call_rule` does what that machinery does, for the case every ModelBatch forward
is in: the batch's ``vmap`` is the only functorch transform. It unwraps the batched
arguments at that level, runs the rule with the level popped (its operations are plain
ones, which autograd records as usual), and wraps the output back.

:func:`plain_level` says whether a call is in that case; otherwise the layer goes through its
operator (or vmap's own rules), which handle every composition of transforms.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch._C import _functorch

__all__ = ["call_rule", "plain_level"]


class RuleInfo(NamedTuple):
    """What the layers' batching rules read of ``torch.library``'s ``VmapInfo``."""

    batch_size: int


def _compile_callback() -> object:
    """torch.compile's frame callback while a compiled function runs (None outside)."""
    get = getattr(torch._C._dynamo.eval_frame, "get_eval_frame_callback", None)
    return None if get is None else get()


def plain_level(anchor: Tensor) -> int | None:
    """The vmap level to run a rule at directly, or None when the call is not plain.

    Plain: one functorch transform is active, a vmap, and ``anchor`` (a stacked parameter or
    buffer) is batched at it; no forward-mode AD level is open; ``torch.compile`` is neither
    tracing (it fuses the default lowering itself) nor running a compiled function, whose
    graph breaks would make it try to trace the rule's plain-tensor code as a frame of its
    own.
    """
    if torch.compiler.is_compiling() or _compile_callback() is not None:
        return None
    stack = _functorch.get_interpreter_stack()
    if stack is None or len(stack) != 1:
        return None
    if stack[0].key() != _functorch.TransformType.Vmap:
        return None
    if getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0:
        return None
    level = int(stack[0].level())
    if _functorch.maybe_get_level(anchor) != level:
        return None
    return level


def call_rule(rule: Callable[..., tuple[Tensor, int]], level: int, *args: Any) -> Tensor:
    """``rule(info, in_dims, *unwrapped args)`` at ``level`` (from :func:`plain_level`), its
    output wrapped back as a batched tensor of that level."""
    values: list[Any] = []
    in_dims: list[int | None] = []
    batch_size = 0  # N: the size of a batched argument's model dimension (no stack query)
    for a in args:
        if isinstance(a, Tensor):
            value, dim = _functorch._unwrap_batched(a, level)
            if dim is not None:
                batch_size = int(value.shape[dim])
            values.append(value)
            in_dims.append(dim)
        else:
            values.append(a)
            in_dims.append(None)
    if not any(d is not None for d in in_dims):  # only the anchor was batched: ask vmap
        stack = _functorch.get_interpreter_stack()
        assert stack is not None
        batch_size = int(_functorch.CVmapInterpreterPtr(stack[0]).batchSize())
    info = RuleInfo(batch_size)
    saved = _functorch.pop_dynamic_layer_stack()
    try:
        out, out_dim = rule(info, tuple(in_dims), *values)
    finally:
        _functorch.push_dynamic_layer_stack(saved)
    return _functorch._add_batch_dim(out, out_dim, level)
