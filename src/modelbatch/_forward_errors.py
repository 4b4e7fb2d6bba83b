"""Errors from a batched forward, re-worded to name their cause and the way out.

The N models run as one ``torch.func.vmap`` call, so a model whose forward works alone can
fail in a batch for reasons that have nothing to do with its input shapes: Python control
flow on a tensor's value, ``.item()``, an op without a batching rule. (Outputs that cannot be
stacked are refused by :class:`modelbatch._functional.OutputLayout`.) Each gets its own
message; the "check that a single model accepts it" hint is kept for shape errors only.

Inputs and outputs that are not tensors are checked before and after the vmapped call
(:func:`check_inputs`, :func:`check_outputs`): a ``PackedSequence`` crossing the batch
boundary (vmap rebuilds the named tuple with non-tensor fields and fails with
``'int' object has no attribute 'device'``; returned, it would be stacked field by field
into something that is no longer a valid ``PackedSequence``), and, with ``per_model=True``,
a container or object holding tensors (only tensor inputs are split per model, so every
model would silently see all N slices).
"""

from __future__ import annotations

import dataclasses
import os
import re
import traceback
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

__all__ = ["check_inputs", "check_outputs", "explain_forward_error"]

_SHAPE_WORDS = re.compile(
    r"shape|size|dimension|\bdims?\b|mat1 and mat2|must match|expected .*input|"
    r"expected .*\d-?D|out of range|cannot be multiplied|broadcast",
    re.IGNORECASE,
)
_FALLBACK = re.compile(r"(aten::\S+) hit the vmap fallback|Batching rule not implemented for (\S+)")


def _what(n: int) -> str:
    return f"in the forward pass of a ModelBatch of {n} models"


_INTERNAL = (
    os.path.dirname(torch.__file__),
    os.path.dirname(os.path.abspath(__file__)),
)


def _where(e: BaseException) -> str:
    """`` at file:line (function): `source` `` for the innermost frame of ``e``'s traceback
    outside torch and modelbatch (the model's own line), or ``""``."""
    for frame in reversed(traceback.extract_tb(e.__traceback__)):
        if not os.path.abspath(frame.filename).startswith(_INTERNAL):
            code = f": `{frame.line.strip()}`" if frame.line else ""
            return f" at {frame.filename}:{frame.lineno} ({frame.name}){code}"
    return ""


def explain_forward_error(
    e: BaseException, n: int, inputs: Sequence[Any], per_model: bool
) -> BaseException | None:
    """The error to raise instead of ``e`` (raised by a batched forward), or ``None`` to
    re-raise ``e`` unchanged."""
    msg = str(e)
    if "data-dependent control flow" in msg:
        return RuntimeError(
            f"a model's forward uses the value of a tensor in Python control flow (an `if`, "
            f"`while`, `bool(t)`, `assert` or Python comparison on a tensor that depends on "
            f"the model's weights or per-model inputs){_where(e)} ({_what(n)}). The N models "
            "run as one vectorised call, so there is no single value to branch on. Way out: "
            "write the branch as tensor operations (torch.where, masking, clamp), or train "
            f"such models one by one.\nOriginal error: {msg}"
        )
    if ".item()" in msg:
        return RuntimeError(
            f"a model's forward calls .item() (or float()/int()/.tolist()) on a tensor that "
            f"depends on the model's weights or per-model inputs{_where(e)} ({_what(n)}): "
            "under vmap that value is N values, one per model, and cannot become one Python "
            "number. Way out: keep it a tensor (e.g. pass it to torch.where / use it in "
            f"arithmetic), or train such models one by one.\nOriginal error: {msg}"
        )
    fallback = _FALLBACK.search(msg)
    if fallback is not None:
        op = fallback.group(1) or fallback.group(2)
        return RuntimeError(
            f"the operator {op} has no vmap batching rule, so it would run once per model "
            f"in a slow Python loop ({_what(n)}), and vmap's fallback is switched off here "
            "(torch._C._functorch._set_vmap_fallback_enabled(False)). Way out: switch the "
            "fallback back on to accept the slow loop, or use an equivalent operator; please "
            f"report the operator to ModelBatch.\nOriginal error: {msg}"
        )
    if "autograd.Function with functorch transforms" in msg:
        return RuntimeError(
            f"a model's forward uses a torch.autograd.Function without a setup_context "
            f"staticmethod ({_what(n)}), which vmap cannot run (this is what reentrant "
            "torch.utils.checkpoint uses on torch versions where ModelBatch cannot run "
            "checkpointed code directly). Way out: torch.utils.checkpoint.checkpoint(..., "
            "use_reentrant=False), or give the Function a setup_context (see "
            f"https://pytorch.org/docs/stable/notes/extending.func.html).\nOriginal error: {msg}"
        )
    if "inplace arithmetic" in msg and "but `self` not being vmapped over" in msg:
        return RuntimeError(
            f"a model's forward writes in place into a tensor shared by all models{_where(e)} "
            f"({_what(n)}): an `inplace=True` layer (Dropout, ReLU, LeakyReLU, ...) or an "
            "in-place op (`x.mul_()`, `x += y`) on a shared input or constant. Alone it "
            "overwrites that tensor; here the N models cannot all write their own result into "
            "one tensor. Way out: pass per-model inputs [N, B, ...] with per_model=True, or "
            f"use inplace=False / an out-of-place op.\nOriginal error: {msg}"
        )
    if type(e) is RuntimeError and _SHAPE_WORDS.search(msg):
        shapes = [tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__ for x in inputs]
        expect = "[N, B, ...]" if per_model else "[B, ...], shared by every model"
        return RuntimeError(
            f"{msg}\n({_what(n)}; input shapes {shapes}, read as {expect}. Each model sees "
            f"one [B, ...] slice: check that a single model accepts it"
            f"{'' if per_model else ', or pass per_model=True'}.)"
        )
    return None


_PACKED_WAY_OUT = (
    "Way out: pack inside the model (torch.nn.utils.rnn.pack_padded_sequence on the padded "
    "[B, T, ...] input and its lengths, both passed to batch(...) as tensors) and return "
    "tensors (pad_packed_sequence's padded output, h_n, or packed.data)"
)


def _parts(value: Any, where: str, depth: int = 0) -> Iterator[tuple[str, Any]]:
    """``(where, part)`` for ``value`` and everything inside its tuples, lists, dicts,
    dataclass fields and (one level of) plain attributes."""
    yield where, value
    if depth >= 6 or isinstance(value, (Tensor, str, bytes)):
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            yield from _parts(v, f"{where}[{k!r}]", depth + 1)
    elif isinstance(value, (tuple, list)):
        for k, v in enumerate(value):
            yield from _parts(v, f"{where}[{k}]", depth + 1)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from _parts(getattr(value, f.name, None), f"{where}.{f.name}", depth + 1)
    elif depth == 0 and isinstance(getattr(value, "__dict__", None), dict):
        for k, v in vars(value).items():
            if isinstance(v, Tensor):
                yield f"{where}.{k}", v


def check_inputs(inputs: Sequence[Any], per_model: bool) -> None:
    """Refuse positional inputs of a batched forward that vmap cannot pass in or split: a
    ``PackedSequence`` anywhere in them, and with ``per_model=True`` any non-tensor input
    holding tensors (only tensor inputs carry the model dimension). Keyword arguments
    reach every model unchanged (outside vmap's inputs), so they are not checked."""
    for k, x in enumerate(inputs):
        if isinstance(x, Tensor):
            continue
        label = f"input {k}"
        for where, part in _parts(x, label):
            if isinstance(part, PackedSequence):
                raise TypeError(
                    f"{where} of a ModelBatch is a PackedSequence. A ModelBatch runs its N "
                    "models through torch.func.vmap, which cannot pass a PackedSequence in "
                    "(it rebuilds the named tuple with non-tensor fields and fails with "
                    f"\"'int' object has no attribute 'device'\"). {_PACKED_WAY_OUT}; or, "
                    "as it is the same for every model, pass it by keyword (batch(x=packed), "
                    "with the name of the model's forward argument): keyword arguments "
                    "reach every model unchanged. See docs/recurrent.md."
                )
        if per_model:
            inner = next(
                (w for w, part in _parts(x, label) if w != label and isinstance(part, Tensor)),
                None,
            )
            if inner is not None:
                raise TypeError(
                    f"{label} is a {type(x).__name__} holding tensors ({inner}), and "
                    "per_model=True splits only tensor inputs along their leading N "
                    "dimension: every model would see all N slices of it. Way out: pass "
                    "each per-model tensor as its own [N, B, ...] input of batch(...) and "
                    "build the object inside the model"
                )


def check_outputs(out: Any) -> None:
    """Refuse a ``PackedSequence`` in a batched forward's output: stacked field by field
    (``batch_sizes`` and the index tensors too) it is no longer a valid PackedSequence."""
    if isinstance(out, Tensor):
        return
    for where, part in _parts(out, "the output"):
        if isinstance(part, PackedSequence):
            where = where.replace("the output", "its output", 1)
            raise TypeError(
                f"a model's forward returned a PackedSequence ({where}). A ModelBatch "
                "stacks the N models' outputs into [N, ...] tensors, and a PackedSequence "
                "stacked field by field (batch_sizes and index tensors with a model "
                "dimension) is no longer valid: pad_packed_sequence and the recurrent "
                f"layers would misread it. {_PACKED_WAY_OUT}. See docs/recurrent.md."
            )
