"""Errors from a batched forward, re-worded to name their cause and the way out.

The N models run as one ``torch.func.vmap`` call, so a model whose forward works alone can
fail in a batch for reasons that have nothing to do with its input shapes: Python control
flow on a tensor's value, ``.item()``, an op without a batching rule. (Outputs that cannot be
stacked are refused by :class:`modelbatch._functional.OutputLayout`.) Each gets its own
message; the "check that a single model accepts it" hint is kept for shape errors only.
"""

from __future__ import annotations

import os
import re
import traceback
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["explain_forward_error"]

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
    if type(e) is RuntimeError and _SHAPE_WORDS.search(msg):
        shapes = [tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__ for x in inputs]
        expect = "[N, B, ...]" if per_model else "[B, ...], shared by every model"
        return RuntimeError(
            f"{msg}\n({_what(n)}; input shapes {shapes}, read as {expect}. Each model sees "
            f"one [B, ...] slice: check that a single model accepts it"
            f"{'' if per_model else ', or pass per_model=True'}.)"
        )
    return None
