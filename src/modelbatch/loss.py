"""Per-model losses for :meth:`modelbatch.ModelBatch.compute_loss`: the targets rule, the flat
path for the known losses and the exact masked losses.

Shapes: ``N`` = models, ``B`` = samples per model, outputs ``[N, B, ...]``.

* **Targets**: shared ``[B, ...]`` or per-model ``[N, B, ...]``. Never guessed: when both
  readings fit the shapes (``N == B``) and ``per_model_targets`` is not given, an error says so.
* **Flat path**: the known losses (``F.cross_entropy``, ``F.nll_loss``, ``F.mse_loss``,
  ``F.l1_loss``, ``F.smooth_l1_loss``, ``F.huber_loss``, ``F.binary_cross_entropy``,
  ``F.binary_cross_entropy_with_logits``, ``F.kl_div``, their ``nn.*Loss`` modules and
  ``functools.partial`` of the functions with keyword arguments) run once on the N models'
  outputs with ``reduction="none"`` (cross-entropy and NLL with N folded into the batch), and
  each model's loss is reduced exactly as the loss's own reduction would: ``"mean"`` divides by
  the number of elements, or for class-index cross-entropy / NLL by the sum of the targets'
  class weights without the ignored targets; ``"sum"`` sums; ``"batchmean"`` divides by B.
* **Masks**: sample weights ``w [N, B]`` (bool: selected; integer: repeat counts; float:
  weights). Known losses weight each sample's elements and their normaliser by ``w``; any other
  ``loss_fn`` is called once per model on its selected (repeated) samples: exact, but N calls.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FLAT_LOSSES", "masked_losses_per_model", "resolve_per_model_targets"]

LossFn = Callable[[Tensor, Tensor], Tensor]


# ---------------------------------------------------------------------------- targets
def _shape(t: Tensor) -> str:
    return str(list(t.shape))


def resolve_per_model_targets(
    outputs: Tensor, targets: Tensor, per_model_targets: bool | None
) -> bool:
    """Whether ``targets`` are per-model ``[N, B, ...]`` (True) or shared ``[B, ...]`` (False).

    With ``per_model_targets`` given, per-model targets are checked to have the leading N;
    shared targets are passed to every model as they are. Not given, the shapes decide:
    ``[B, ...]`` is shared, ``[N, B, ...]`` is per model. When N == B both leading shapes fit;
    then the reading whose per-model target has the rank of one model's output or one less
    (what a loss takes) is chosen if only one does, e.g. ``[N, B]`` binary labels for
    ``[N, B]`` logits are per model. A shape that still fits both (``[N, B]`` class indices
    for ``[N, B, C]`` logits when N == B) or neither raises a ``ValueError`` that names the
    shapes and the way out.
    """
    n = outputs.shape[0]
    b = outputs.shape[1] if outputs.dim() > 1 else None
    if per_model_targets is not None:
        if per_model_targets and (targets.dim() == 0 or targets.shape[0] != n):
            raise ValueError(
                f"per_model_targets=True expects targets [N, B, ...] with N={n} models, got "
                f"shape {_shape(targets)}"
            )
        return bool(per_model_targets)
    can_share = targets.dim() >= 1 and targets.shape[0] == b
    can_per_model = targets.dim() >= 2 and targets.shape[0] == n and targets.shape[1] == b
    if can_share and can_per_model:
        # Both leading shapes fit (N == B). A loss compares one model's output [B, ...] with
        # a target of the same rank (regression, probabilities) or one less (class indices):
        # when only one reading gives such a rank, it is the only one a loss can take.
        out_rank = outputs.dim() - 1
        share_fits = targets.dim() in (out_rank - 1, out_rank)
        per_model_fits = targets.dim() - 1 in (out_rank - 1, out_rank)
        if share_fits != per_model_fits:
            return per_model_fits
        raise ValueError(
            f"ambiguous targets: shape {_shape(targets)} reads both as shared [B, ...] targets "
            f"and as per-model [N, B, ...] targets, since N = B = {n} (outputs "
            f"{_shape(outputs)}). Pass per_model_targets=True (model i's targets are "
            f"targets[i]) or per_model_targets=False (every model gets all of them)."
        )
    if can_per_model:
        return True
    if can_share:
        return False
    expect = f"[B, ...] = [{b}, ...] shared" if b is not None else "shared targets"
    raise ValueError(
        f"targets of shape {_shape(targets)} fit neither {expect} nor [N, B, ...] = "
        f"[{n}, {b}, ...] per model, for outputs {_shape(outputs)}. Pass "
        f"per_model_targets=False to give every model these targets whole."
    )


#: Errors from inside ``loss_fn`` that are re-raised with the shapes one model was given.
LOSS_ERRORS = (RuntimeError, ValueError, IndexError, AssertionError, TypeError)


def targets_error(err: Exception, outputs: Tensor, targets: Tensor, per_model: bool) -> Exception:
    """``err`` (raised inside ``loss_fn``) re-raised with what one model was given."""
    one_out = list(outputs.shape[1:])
    one_tgt = list(targets.shape[1:]) if per_model else list(targets.shape)
    reading = "per-model [N, B, ...]" if per_model else "shared [B, ...]"
    message = (
        f"{err}\n(loss_fn raised this on one model's output {one_out} and targets {one_tgt}: the "
        f"targets {_shape(targets)} were read as {reading} for outputs {_shape(outputs)}. "
        f"loss_fn must accept (output [B, ...], target [B, ...]) of a single model; pass "
        f"per_model_targets= to choose the other reading.)"
    )
    return type(err)(message) if type(err) in LOSS_ERRORS else ValueError(message)


# ---------------------------------------------------------------------------- known losses
@dataclass
class LossSpec:
    """A recognised loss: its family and the options of its own call."""

    kind: str  # "ce", "nll" or "elementwise"
    fn: Callable[..., Tensor]
    reduction: str
    weight: Tensor | None = None
    ignore_index: int = -100
    label_smoothing: float = 0.0
    kwargs: dict[str, Any] = field(default_factory=dict)


# name of the function -> (kind, allowed keyword arguments with their defaults)
_FUNCTIONS: dict[Callable[..., Tensor], tuple[str, dict[str, Any]]] = {
    F.cross_entropy: (
        "ce",
        {"weight": None, "ignore_index": -100, "reduction": "mean", "label_smoothing": 0.0},
    ),
    F.nll_loss: ("nll", {"weight": None, "ignore_index": -100, "reduction": "mean"}),
    F.mse_loss: ("elementwise", {"reduction": "mean"}),
    F.l1_loss: ("elementwise", {"reduction": "mean"}),
    F.smooth_l1_loss: ("elementwise", {"reduction": "mean", "beta": 1.0}),
    F.huber_loss: ("elementwise", {"reduction": "mean", "delta": 1.0}),
    F.binary_cross_entropy: ("elementwise", {"reduction": "mean", "weight": None}),
    F.binary_cross_entropy_with_logits: (
        "elementwise",
        {"reduction": "mean", "weight": None, "pos_weight": None},
    ),
    F.kl_div: ("elementwise", {"reduction": "mean", "log_target": False}),
    F.soft_margin_loss: ("elementwise", {"reduction": "mean"}),
    F.poisson_nll_loss: (
        "elementwise",
        {"reduction": "mean", "log_input": True, "full": False, "eps": 1e-8},
    ),
}

# module class -> (function, attributes passed as keyword arguments)
_MODULES: dict[type[nn.Module], tuple[Callable[..., Tensor], tuple[str, ...]]] = {
    nn.CrossEntropyLoss: (
        F.cross_entropy,
        ("weight", "ignore_index", "reduction", "label_smoothing"),
    ),
    nn.NLLLoss: (F.nll_loss, ("weight", "ignore_index", "reduction")),
    nn.MSELoss: (F.mse_loss, ("reduction",)),
    nn.L1Loss: (F.l1_loss, ("reduction",)),
    nn.SmoothL1Loss: (F.smooth_l1_loss, ("reduction", "beta")),
    nn.HuberLoss: (F.huber_loss, ("reduction", "delta")),
    nn.BCELoss: (F.binary_cross_entropy, ("weight", "reduction")),
    nn.BCEWithLogitsLoss: (
        F.binary_cross_entropy_with_logits,
        ("weight", "pos_weight", "reduction"),
    ),
    nn.KLDivLoss: (F.kl_div, ("reduction", "log_target")),
    nn.SoftMarginLoss: (F.soft_margin_loss, ("reduction",)),
    nn.PoissonNLLLoss: (F.poisson_nll_loss, ("reduction", "log_input", "full", "eps")),
}

#: The losses that take the flat path (functions; their ``nn`` modules are in ``_MODULES``).
FLAT_LOSSES: tuple[Callable[..., Tensor], ...] = tuple(_FUNCTIONS)


def recognise(loss_fn: Any) -> LossSpec | None:
    """The :class:`LossSpec` of a known loss, or None (then the general path runs)."""
    fn: Any = None
    given: dict[str, Any] = {}
    if type(loss_fn) in _MODULES:  # exact classes: a subclass may override forward
        if _call_differs(loss_fn):
            return None
        fn, attrs = _MODULES[type(loss_fn)]
        for attr in attrs:
            given[attr] = getattr(loss_fn, attr)
    elif isinstance(loss_fn, functools.partial):
        if loss_fn.args or loss_fn.func not in _FUNCTIONS:
            return None
        fn, given = loss_fn.func, dict(loss_fn.keywords)
    elif loss_fn in _FUNCTIONS:
        fn = loss_fn
    if fn is None:
        return None
    kind, defaults = _FUNCTIONS[fn]
    if any(k not in defaults for k in given):  # size_average, reduce, ...: general path
        return None
    options = {**defaults, **given}
    reduction = options.pop("reduction")
    allowed = ("sum", "batchmean") if fn is F.kl_div else ("mean", "sum")
    if reduction not in allowed:  # "none" (an error later) or kl_div's warned "mean"
        return None
    if kind == "elementwise":
        weight = options.pop("weight", None)
        return LossSpec(kind, fn, reduction, weight=weight, kwargs=options)
    return LossSpec(
        kind,
        fn,
        reduction,
        weight=options["weight"],
        ignore_index=int(options["ignore_index"]),
        label_smoothing=float(options.get("label_smoothing", 0.0)),
    )


def _call_differs(module: nn.Module) -> bool:
    """Whether calling ``module`` may do more than its class's ``forward``: hooks on the
    instance or on every module (``nn.modules.module.register_module_forward_hook``), or a
    ``forward`` set on the instance. The flat path would skip them."""
    if "forward" in vars(module):
        return True
    for attr, table in vars(module).items():
        if "hook" in attr and isinstance(table, dict) and table:
            return True
    from torch.nn.modules import module as torch_module

    return any(
        bool(getattr(torch_module, name, None))
        for name in (
            "_global_forward_hooks",
            "_global_forward_pre_hooks",
            "_global_backward_hooks",
            "_global_backward_pre_hooks",
            "_global_forward_hooks_always_called",
        )
    )


def _class_weights(spec: LossSpec, target: Tensor, dtype: torch.dtype) -> Tensor:
    """Each class-index target's weight in the mean's denominator (0 when ignored)."""
    valid = target != spec.ignore_index
    if spec.weight is None:
        return valid.to(dtype)
    safe = torch.where(valid, target, 0)
    return torch.where(valid, spec.weight.to(dtype)[safe], 0)


def flat_losses(
    spec: LossSpec, outputs: Tensor, targets: Tensor, per_model: bool, mask: Tensor | None
) -> Tensor | None:
    """``[N]`` per-model losses of a known loss in one call, or None when the shapes are not
    the loss's plain form (then the general path runs and reports the loss's own error).

    Args:
        outputs: ``[N, B, ...]``.
        targets: ``[N, B, ...]`` (``per_model``) or ``[B, ...]``.
        mask: optional ``[N, B]`` sample weights (already checked, in the outputs' dtype).
    """
    n, one = outputs.shape[0], outputs.shape[1:]
    if outputs.dim() < 2 or not outputs.is_floating_point():
        return None
    t_one = targets.shape[1:] if per_model else targets.shape
    b = one[0]
    if spec.kind == "elementwise":
        if t_one != one or targets.dtype != outputs.dtype:
            return None
        if spec.weight is not None and spec.weight.dim() > len(one):
            return None
        tgt = targets if per_model else targets.expand(n, *one)
        if mask is not None:
            outputs, tgt = _selected(outputs, mask), _selected(tgt, mask)
        options = dict(spec.kwargs)
        if spec.weight is not None:
            options["weight"] = spec.weight
        elems = spec.fn(outputs, tgt, reduction="none", **options)  # [N, B, ...]
        if elems.shape != outputs.shape:
            return None
        per_sample = elems.reshape(n, b, -1)
        numel = per_sample.shape[2]
        if mask is None:
            total = per_sample.sum(dim=(1, 2))
            if spec.reduction == "sum":
                return total
            return total / (numel * b if spec.reduction == "mean" else b)
        total = (per_sample.sum(dim=2) * mask).sum(dim=1)
        if spec.reduction == "sum":
            return total
        count = mask.sum(dim=1) * (numel if spec.reduction == "mean" else 1)
        return _divide(total, count, mask)
    # Cross-entropy / NLL: per model [B, C, d...] with targets [B, d...] (class indices)
    # or, for cross-entropy, probabilities [B, C, d...].
    if len(one) < 2:
        return None
    probabilities = targets.is_floating_point()
    if probabilities:
        if spec.kind != "ce" or t_one != one or targets.dtype != outputs.dtype:
            return None
    elif targets.dtype != torch.int64 or t_one != (b, *one[2:]):
        return None
    tgt = targets if per_model else targets.expand(n, *t_one)
    if mask is not None:
        # Model i's loss sees its selected samples only (any label, NaN or inf elsewhere).
        outputs, tgt = _selected(outputs, mask), _selected(tgt, mask)
        targets, per_model = tgt, True
    kwargs: dict[str, Any] = {"weight": spec.weight, "reduction": "none"}
    if spec.kind == "ce":
        kwargs["label_smoothing"] = spec.label_smoothing
    if not probabilities:
        kwargs["ignore_index"] = spec.ignore_index
    elems = spec.fn(outputs.flatten(0, 1), tgt.flatten(0, 1), **kwargs)  # [N*B, d...]
    per_sample = elems.reshape(n, b, -1)
    if spec.reduction == "sum":
        per_sample = per_sample if mask is None else per_sample * mask.unsqueeze(2)
        return per_sample.sum(dim=(1, 2))
    if probabilities:  # mean over the B * d... positions
        count_one = per_sample.shape[2]
        if mask is None:
            return per_sample.sum(dim=(1, 2)) / (b * count_one)
        total = (per_sample.sum(dim=2) * mask).sum(dim=1)
        return _divide(total, mask.sum(dim=1) * count_one, mask)
    # Class indices: the denominator is the sum of the targets' weights (ignored: 0).
    lead = 2 if per_model else 1
    if mask is None:
        if spec.weight is None:  # count of the targets that are not ignored: [N] or []
            denom = (targets != spec.ignore_index).reshape(*targets.shape[: lead - 1], -1)
            return per_sample.sum(dim=(1, 2)) / denom.sum(dim=-1)
        v = _class_weights(spec, targets, outputs.dtype)
        return per_sample.sum(dim=(1, 2)) / v.reshape(*v.shape[: lead - 1], -1).sum(dim=-1)
    v = _class_weights(spec, targets, outputs.dtype)  # [N, B, d...] or [B, d...]
    v_sample = v.reshape(*v.shape[:lead], -1).sum(dim=-1)  # [N, B] or [B]
    total = (per_sample.sum(dim=2) * mask).sum(dim=1)
    denom = (mask * v_sample).sum(dim=1)
    return _divide(total, denom, mask)


def _selected(t: Tensor, mask: Tensor) -> Tensor:
    """``t`` ``[N, B, ...]`` with 0 where ``mask`` ``[N, B]`` is 0: what model i does not
    select (a NaN target, an unlabelled sample's label -1, a non-finite output) cannot
    reach its loss or its gradient (``0 * nan`` would be nan), as when trained alone on its
    selected samples. Class index 0 in place of a label is weighted by 0 like the sample."""
    keep = mask.ne(0).view(*mask.shape, *([1] * (t.dim() - 2)))
    return torch.where(keep, t, torch.zeros((), dtype=t.dtype, device=t.device))


def _divide(total: Tensor, denom: Tensor, mask: Tensor) -> Tensor:
    """``total / denom`` per model; a model without any selected sample gets 0 (and zero
    gradients). A model whose selected samples all have zero weight gets nan, as alone."""
    empty = mask.sum(dim=1) == 0
    return torch.where(empty, 0.0, total / torch.where(empty, 1.0, denom))


# ---------------------------------------------------------------------------- other losses
def _sample_indices(mask: Tensor) -> list[Tensor]:
    """Per model, the indices of its samples, repeated by integer counts (host sync)."""
    if mask.dtype == torch.bool:
        counts = mask.long()
    elif mask.is_floating_point():
        if not bool(torch.all(mask == mask.round())) or bool(torch.any(mask < 0)):
            raise ValueError(
                "a mask with fractional or negative weights cannot be applied to a loss_fn "
                "that ModelBatch does not know (its per-sample normalisation is unknown). Pass "
                "a bool selection or integer repeat counts, or use one of the losses listed in "
                "modelbatch.loss.FLAT_LOSSES (or their nn modules)."
            )
        counts = mask.long()
    else:
        if bool(torch.any(mask < 0)):
            raise ValueError("mask counts must be non-negative")
        counts = mask.long()
    b = mask.shape[1]
    arange = torch.arange(b, device=mask.device)
    return [torch.repeat_interleave(arange, c) for c in counts]


def masked_losses_per_model(
    loss_fn: LossFn, outputs: Tensor, targets: Tensor, per_model: bool, mask: Tensor
) -> Tensor:
    """``[N]`` losses of any ``loss_fn``: model i's loss is ``loss_fn`` on its own selected
    samples ``outputs[i][idx_i]``, ``targets[idx_i]`` (indices repeated by integer counts).

    Exact for every loss (token-level, class weights, ``ignore_index``...), at the cost of one
    ``loss_fn`` call per model and one host sync to read the mask. A model with no selected
    sample gets loss 0.
    """
    losses = []
    for i, idx in enumerate(_sample_indices(mask)):
        if idx.numel() == 0:
            losses.append(outputs[i].flatten()[:0].sum())  # 0, still in the graph
            continue
        t = targets[i] if per_model else targets
        try:
            loss = loss_fn(outputs[i].index_select(0, idx), t.index_select(0, idx.to(t.device)))
        except LOSS_ERRORS as e:
            if type(e) not in LOSS_ERRORS:
                raise
            raise targets_error(e, outputs, targets, per_model) from e
        if loss.dim() != 0:
            raise ValueError(
                f"loss_fn must return a scalar per model; got per-model shape "
                f"{tuple(loss.shape)}. Use a reduction such as 'mean'."
            )
        losses.append(loss)
    return torch.stack(losses)
