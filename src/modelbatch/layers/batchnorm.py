"""BatchNorm of its own: the N models' BatchNorm as ONE native ``batch_norm`` over N*C channels.

vmap's own ``batch_norm`` rule normalises without the affine and applies each model's weight
and bias as a separate multiply and add; the multiply saves the normalised output a second
time for backward (ResNet-8 at batch 128: 120 MiB per model against 78 MiB for one model
alone). It also fails with mixed dtypes (autocast, pytorch#184890), and ``momentum=None``
calls ``float(num_batches_tracked)``, which vmap refuses.

When a :class:`~modelbatch.ModelBatch` is built, every exact ``nn.BatchNorm1d/2d/3d`` of its
stacked mirror becomes the matching ``VmapBatchNorm*`` below (the class is swapped in place,
so parameter and buffer names, checkpoints and ``extract`` are unchanged). Its forward calls
the custom operator ``modelbatch::batch_norm``, whose vmap batching rule runs the N models as
one native ``batch_norm`` on a ``[B, N*C, ...]`` view of the activations, with the per-model
weight, bias and running statistics as ``[N*C]`` views of the stacked ``[N, C]`` tensors: the
affine is fused, the running statistics of every model are updated in the same kernel, and
autograd saves exactly what one model alone saves (the input, the weight and the per-channel
mean and inverse standard deviation), once per model. Low-precision inputs (autocast) go to the
native mixed-precision kernel (float32 statistics and affine), as ``nn.BatchNorm`` alone does.

Per-model settings: each model keeps its own ``momentum`` and ``eps``
(:attr:`VmapBatchNormMixin.per_model_momentum`, :attr:`~VmapBatchNormMixin.per_model_eps`),
so a momentum sweep is one batch. Paths:

* one momentum (a number) and one eps for all models (the usual case): one native call;
* momenta that differ, or ``momentum=None`` (cumulative average, ``1 / num_batches_tracked``
  per model): the same native call for the output, and the running statistics updated from a
  separate ``var_mean`` of the input with each model's factor (one more pass over the input,
  nothing more saved for backward);
* eps that differ: the operator ``modelbatch::batch_norm_eps`` (training), one pass over
  ``[B, N*C, ...]`` with a ``[N*C]`` eps (``var_mean``, ``rsqrt``, one multiply-add), whose
  autograd formula saves what the native kernel saves and is the native backward; in eval
  mode, ``x * scale + shift`` from the running statistics.

Data routing: while :func:`modelbatch.data.routed_batch_norm` holds a step's ``[N, B]``
sample weights (``train_one_epoch`` with a ``DataRouter`` enters it around the forward), a
layer in training mode calls ``modelbatch::batch_norm_routed`` instead: per model, weighted
mean and biased variance over (B, spatial) of the samples with weight > 0, normalise,
affine, and running statistics (own momentum or ``1 / num_batches_tracked``, unbiased with
``n = sum_b w_b * spatial``) updated only for models with a sample. Its batching rule runs
the N models as plain operations on ``[N, B, C, ...]`` (autograd differentiates them): each
model exactly as trained alone on its selected samples, repeated by their counts.

The per-model settings are stored as Python lists indexed by the non-persistent ``[N]``
buffer ``mb_slot`` (each model's slot among the models the batch was built with), so they follow
the models through ``drop`` / ``keep_positions`` like every stacked buffer, and survive
``.to(dtype)``. ``insert(i, module)`` writes tensors only: model i keeps the momentum and eps
it had.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modelbatch.layers import register_substitution
from modelbatch.layers._direct import call_rule, plain_level
from modelbatch.layers.settings import PerModelAttribute, repr_per_model

__all__ = [
    "VmapBatchNorm1d",
    "VmapBatchNorm2d",
    "VmapBatchNorm3d",
    "VmapBatchNormMixin",
    "batch_norm",
]


@torch.library.custom_op("modelbatch::batch_norm", mutates_args=("running_mean", "running_var"))
def batch_norm(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
) -> Tensor:
    """``F.batch_norm`` as an operator with a batching rule that fuses the N models.

    Outside vmap it is exactly ``F.batch_norm(input [B, C, ...], running_mean [C],
    running_var [C], weight [C], bias [C], training, momentum, eps)`` (running statistics
    updated in place in training). Under vmap see :func:`_batch_norm_vmap`.

    Autograd: the operator mutates the running statistics, and PyTorch accepts an autograd
    formula only for functional operators. None is needed: the batching rule runs before
    autograd (vmap's dispatch key is above autograd's), so autograd records the native
    ``batch_norm`` the rule runs and differentiates it with the native formula, saving what
    one model alone saves. Outside vmap the layers call ``F.batch_norm`` itself.
    """
    return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)


@batch_norm.register_fake
def _batch_norm_fake(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
) -> Tensor:
    return torch.empty_like(input)


def _per_model_channels(t: Tensor | None, dim: int | None, n: int) -> Tensor | None:
    """A per-model ``[C]`` tensor batched at ``dim`` as ``[N*C]`` (a view when possible)."""
    if t is None:
        return None
    stacked = t.movedim(dim, 0) if dim is not None else t.expand(n, *t.shape)
    return stacked.reshape(-1)


def _batch_norm_vmap(
    info: Any,
    in_dims: tuple[int | None, ...],
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
) -> tuple[Tensor, int]:
    """Batching rule: the N BatchNorms as one native ``batch_norm`` over N*C channels.

    Per model: input ``[B, C, ...]`` (batched at ``in_dims[0]``, or shared), weight/bias
    ``[C]``, running statistics ``[C]`` (batched: one per model). Returns ``[B, N, C, ...]``, a
    view of the ``[B, N*C, ...]`` result, with the model dimension at 1.
    """
    n = int(info.batch_size)
    x_dim, w_dim, b_dim, m_dim, v_dim = in_dims[:5]
    x = (
        input.movedim(x_dim, 1)
        if x_dim is not None
        else input.unsqueeze(1).expand(input.shape[0], n, *input.shape[1:])
    )
    c = x.shape[2]
    flat_x = x.reshape(x.shape[0], n * c, *x.shape[3:])
    copied: list[tuple[Tensor, Tensor]] = []  # (per-model [N, C], its [N*C] copy)
    flat_stats: list[Tensor | None] = []
    for t, dim, what in (
        (running_mean, m_dim, "running_mean"),
        (running_var, v_dim, "running_var"),
    ):
        if t is None:
            flat_stats.append(None)
            continue
        if dim is None:
            raise RuntimeError(
                f"modelbatch::batch_norm under vmap needs per-model (batched) {what}; got one "
                f"shared across the {n} models, which cannot hold each model's statistics"
            )
        per_model = t.movedim(dim, 0)
        if per_model.is_contiguous():  # a view: the native kernel updates it in place
            flat = per_model.view(-1)
        else:
            flat = per_model.reshape(-1).clone()
            copied.append((per_model, flat))
        flat_stats.append(flat)
    out = torch.batch_norm(
        flat_x,
        _per_model_channels(weight, w_dim, n),
        _per_model_channels(bias, b_dim, n),
        flat_stats[0],
        flat_stats[1],
        training,
        momentum,
        eps,
        torch.backends.cudnn.enabled,
    )
    if training:
        for per_model, flat in copied:  # write the update back
            per_model.copy_(flat.view(per_model.shape))
    return out.unflatten(1, (n, c)), 1


torch.library.register_vmap(batch_norm, _batch_norm_vmap)


def _memory_format(x: Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def _stat_dtype(x: Tensor, weight: Tensor | None, eps: Tensor) -> torch.dtype:
    """float32 statistics for a low-precision input, as the native mixed kernel."""
    ref = weight.dtype if weight is not None else eps.dtype
    return x.dtype if x.element_size() >= torch.finfo(ref).bits // 8 else ref


@torch.library.custom_op("modelbatch::batch_norm_eps", mutates_args=())
def batch_norm_eps(
    input: Tensor, weight: Tensor | None, bias: Tensor | None, eps: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode batch normalisation with one ``eps`` per channel, no running statistics.

    Input ``[B, K, ...]``, weight/bias/eps ``[K]``. Returns ``(output [B, K, ...], mean [K],
    invstd [K])``. Its autograd formula saves what the native kernel saves (input, weight,
    mean, inverse std) and is the native ``native_batch_norm_backward``; its vmap rule runs
    the N models as one call over ``[B, N*C, ...]``. For BatchNorm sweeps over ``eps``.
    """
    dims = [0, *range(2, input.dim())]
    xs = input.to(_stat_dtype(input, weight, eps))
    var, mean = torch.var_mean(xs, dim=dims, correction=0)
    invstd = torch.rsqrt(var + eps.to(xs.dtype))
    scale = invstd if weight is None else invstd * weight
    shift = -mean * scale if bias is None else bias - mean * scale
    shape = [1, -1, *([1] * (input.dim() - 2))]
    out = torch.addcmul(shift.view(shape), xs, scale.view(shape)).to(input.dtype)
    return out, mean, invstd


@batch_norm_eps.register_fake
def _batch_norm_eps_fake(
    input: Tensor, weight: Tensor | None, bias: Tensor | None, eps: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    stat = input.new_empty(input.shape[1], dtype=_stat_dtype(input, weight, eps))
    return torch.empty_like(input), stat, torch.empty_like(stat)


def _eps_setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    input, weight, bias, _ = inputs
    _, mean, invstd = output
    ctx.save_for_backward(input, weight, mean, invstd)
    ctx.has_bias = bias is not None


def _eps_backward(ctx: Any, grad: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:
    input, weight, mean, invstd = ctx.saved_tensors
    need = ctx.needs_input_grad
    grad_input, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
        grad.contiguous(memory_format=_memory_format(input)),
        input,
        weight,
        None,
        None,
        mean,
        invstd,
        True,
        0.0,
        [bool(need[0]), weight is not None and bool(need[1]), ctx.has_bias and bool(need[2])],
    )
    return grad_input, grad_weight, grad_bias, None


batch_norm_eps.register_autograd(_eps_backward, setup_context=_eps_setup_context)


def _batch_norm_eps_vmap(
    info: Any,
    in_dims: tuple[int | None, ...],
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: Tensor,
) -> tuple[tuple[Tensor, Tensor, Tensor], tuple[int, int, int]]:
    """Batching rule: the N models as one call over ``[B, N*C, ...]`` (eps ``[N*C]``)."""
    n = int(info.batch_size)
    x_dim, w_dim, b_dim, e_dim = in_dims
    x = (
        input.movedim(x_dim, 1)
        if x_dim is not None
        else input.unsqueeze(1).expand(input.shape[0], n, *input.shape[1:])
    )
    c = x.shape[2]
    flat_x = x.reshape(x.shape[0], n * c, *x.shape[3:])
    out, mean, invstd = batch_norm_eps(
        flat_x,
        _per_model_channels(weight, w_dim, n),
        _per_model_channels(bias, b_dim, n),
        _per_model_channels(eps, e_dim, n),  # type: ignore[arg-type]
    )
    return (out.unflatten(1, (n, c)), mean.view(n, c), invstd.view(n, c)), (1, 0, 0)


torch.library.register_vmap(batch_norm_eps, _batch_norm_eps_vmap)


# ---------------------------------------------------------------- routed (weighted) statistics
class RoutedWeights:
    """The ``[N, B]`` sample weights of a routed training step (see
    :func:`modelbatch.data.routed_batch_norm`), with a lazily computed host copy of each
    model's total weight (only needed for the ``n > 1`` check of a layer without spatial
    dimensions)."""

    def __init__(self, weights: Tensor) -> None:
        if weights.dim() != 2:
            raise ValueError(f"routing weights must have shape [N, B], got {tuple(weights.shape)}")
        self.weights = weights
        self._totals: list[float] | None = None

    def totals(self) -> list[float]:
        """Each model's total weight ``sum_b w[n, b]`` (one device-to-host copy per step)."""
        if self._totals is None:
            self._totals = [float(v) for v in self.weights.double().sum(dim=1).tolist()]
        return self._totals


_ROUTING: ContextVar[RoutedWeights | None] = ContextVar("modelbatch_bn_routing", default=None)


def routing_weights() -> RoutedWeights | None:
    """The routed step's weights while :func:`modelbatch.data.routed_batch_norm` is active."""
    return _ROUTING.get()


@torch.library.custom_op(
    "modelbatch::batch_norm_routed",
    mutates_args=("running_mean", "running_var", "num_batches_tracked"),
)
def batch_norm_routed(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    sample_weight: Tensor,
    momentum: Tensor,
    eps: Tensor,
) -> Tensor:
    """Training-mode batch normalisation over weighted samples (one model).

    Input ``[B, C, ...]``, ``sample_weight`` ``[B]`` (sample b counts ``w[b]`` times; 0: not
    in this model's batch), weight/bias/running statistics ``[C]``, ``num_batches_tracked``,
    ``momentum`` (NaN: cumulative average) and ``eps`` 0-dim. Exactly ``F.batch_norm`` on
    the batch in which each sample is repeated ``w[b]`` times, for the samples with
    ``w[b] > 0`` (the others get finite, meaningless outputs). With all weights 0 the
    running statistics and ``num_batches_tracked`` are left as they are.

    Under vmap ``sample_weight`` may also be the unbatched ``[N, B]`` table of all N models
    (row n for model n); the batching rule runs the N models in one pass. Used only under
    vmap (autograd records the plain operations of the rule).
    """
    out = _routed_all(
        input.unsqueeze(0),
        sample_weight.reshape(1, -1),
        _first(weight),
        _first(bias),
        _first(running_mean),
        _first(running_var),
        _first(num_batches_tracked),
        momentum.reshape(1),
        eps.reshape(1),
    )
    return out[0]


@batch_norm_routed.register_fake
def _batch_norm_routed_fake(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    sample_weight: Tensor,
    momentum: Tensor,
    eps: Tensor,
) -> Tensor:
    return torch.empty_like(input)


def _first(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.unsqueeze(0)


def _routed_all(
    x: Tensor,
    w: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    nbt: Tensor | None,
    momentum: Tensor,
    eps: Tensor,
) -> Tensor:
    """The N models' weighted batch normalisation with plain (differentiable) operations.

    ``x`` ``[N, B, C, *S]``, ``w`` ``[N, B]``, weight/bias/running statistics ``[N, C]``,
    ``nbt``/``momentum``/``eps`` ``[N]``. Per model and channel: ``n = sum_b w_b * |S|``,
    ``mean = sum w x / n``, biased ``var = sum w (x - mean)^2 / n`` (over the samples with
    ``w > 0`` only, so the values of the others never enter), output
    ``(x - mean) / sqrt(var + eps) * weight + bias``; running statistics
    ``(1 - f) r + f s`` with the unbiased ``var * n / (n - 1)`` and ``f`` the momentum
    (``1 / num_batches_tracked`` for NaN), for the models with ``n > 0``. Returns
    ``[N, B, C, *S]``.
    """
    n_models, b = x.shape[:2]
    spatial = x.shape[3:]
    ref = weight if weight is not None else running_mean
    sd = x.dtype if ref is None else _stat_dtype(x, ref, ref)
    xs = x.to(sd)
    bshape = [n_models, b, 1, *([1] * len(spatial))]  # per sample, broadcast over C and S
    cshape = [n_models, 1, -1, *([1] * len(spatial))]  # per channel
    wv = w.to(sd).view(bshape)
    keep = w.ne(0).view(bshape)
    size = math.prod(spatial)
    count = w.to(sd).sum(dim=1) * size  # [N]
    has = count > 0
    denom = torch.where(has, count, 1.0).view(n_models, 1)
    dims = [1, *range(3, x.dim())]
    mean = (wv * torch.where(keep, xs, 0.0)).sum(dim=dims) / denom  # [N, C]
    centred = torch.where(keep, xs - mean.view(cshape), 0.0)
    var = (wv * centred * centred).sum(dim=dims) / denom  # biased, [N, C]
    invstd = torch.rsqrt(var + eps.to(sd).view(n_models, 1))
    scale = invstd if weight is None else invstd * weight.to(sd)
    out = (xs - mean.view(cshape)) * scale.view(cshape)
    if bias is not None:
        out = out + bias.to(sd).view(cshape)
    if running_mean is not None and running_var is not None:
        with torch.no_grad():
            new_nbt = None
            if nbt is not None:
                new_nbt = nbt + has.to(nbt.dtype)
                nbt.copy_(new_nbt)
            m = momentum.to(running_mean.dtype)
            if new_nbt is not None:  # momentum=None: 1 / num_batches_tracked (no host sync)
                m = torch.where(torch.isnan(m), 1.0 / new_nbt.to(m.dtype), m)
            f = m.view(n_models, 1)
            rd = running_mean.dtype
            c = count.to(rd).view(n_models, 1)
            unbiased = var.detach().to(rd) * (c / torch.where(c > 1, c - 1, 1.0))
            keep_model = has.view(n_models, 1)
            new_mean = (1 - f) * running_mean + f * mean.detach().to(rd)
            new_var = (1 - f) * running_var + f * unbiased
            running_mean.copy_(torch.where(keep_model, new_mean, running_mean))
            running_var.copy_(torch.where(keep_model, new_var, running_var))
    return out.to(x.dtype)


def _routed_vmap(
    info: Any,
    in_dims: tuple[int | None, ...],
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    sample_weight: Tensor,
    momentum: Tensor,
    eps: Tensor,
) -> tuple[Tensor, int]:
    """Batching rule: the N models' weighted statistics in one pass over ``[N, B, C, ...]``."""
    n = int(info.batch_size)
    x_dim, w_dim, b_dim, m_dim, v_dim, t_dim, s_dim, mo_dim, e_dim = in_dims
    x = (
        input.movedim(x_dim, 0)
        if x_dim is not None
        else input.unsqueeze(0).expand(n, *input.shape)
    )
    sw = sample_weight.movedim(s_dim, 0) if s_dim is not None else sample_weight
    sw = sw.to(x.device, non_blocking=True)
    if sw.dim() != 2 or tuple(sw.shape) != (n, x.shape[1]):
        raise ValueError(
            f"routed BatchNorm: the routing weights have shape {tuple(sw.shape)}, the layer's "
            f"input {tuple(x.shape[1:])} per model for N={n} models; they must be [N, B] = "
            f"[{n}, {x.shape[1]}]. A model that changes the batch dimension before a "
            "BatchNorm (e.g. [B, T, C] -> [B*T, C]) cannot train with routed BatchNorm "
            "statistics: leave modelbatch.data.routed_batch_norm (train_one_epoch: "
            "router=None with masks of your own)"
        )

    def per_model(t: Tensor | None, dim: int | None, what: str, stat: bool) -> Tensor | None:
        if t is None:
            return None
        if dim is None:
            if stat:
                raise RuntimeError(
                    f"modelbatch::batch_norm_routed under vmap needs per-model (batched) "
                    f"{what}; got one shared across the {n} models"
                )
            return t.unsqueeze(0).expand(n, *t.shape)
        return t.movedim(dim, 0)

    rm = per_model(running_mean, m_dim, "running_mean", True)
    rv = per_model(running_var, v_dim, "running_var", True)
    nbt = per_model(num_batches_tracked, t_dim, "num_batches_tracked", True)
    if x.dim() == 3 and not torch.compiler.is_compiling():
        routing = _ROUTING.get()
        totals = (
            routing.totals()
            if routing is not None and routing.weights is sample_weight
            else [float(v) for v in sw.double().sum(dim=1).tolist()]
        )
        few = [i for i, t in enumerate(totals) if 0 < t <= 1]
        if few:
            raise ValueError(
                f"routed BatchNorm on [B, C] inputs: model(s) at position(s) {few} have one "
                "sample in this batch, and training BatchNorm needs more than 1 value per "
                "channel (as nn.BatchNorm alone raises). Use larger batches or drop_last=True"
            )
    return (
        _routed_all(
            x,
            sw,
            per_model(weight, w_dim, "weight", False),
            per_model(bias, b_dim, "bias", False),
            rm,
            rv,
            nbt,
            per_model(momentum, mo_dim, "momentum", False),  # type: ignore[arg-type]
            per_model(eps, e_dim, "eps", False),  # type: ignore[arg-type]
        ),
        0,
    )


torch.library.register_vmap(batch_norm_routed, _routed_vmap)


def _under_vmap(*tensors: Tensor | None) -> bool:
    is_batched = torch._C._functorch.is_batchedtensor
    return any(t is not None and is_batched(t) for t in tensors)


def _single(
    bn: nn.modules.batchnorm._BatchNorm,
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    bn_training: bool,
) -> Tensor:
    """``nn.BatchNorm``'s own call, for the layer used outside vmap."""
    momentum = bn.momentum
    if momentum is None:
        assert bn.num_batches_tracked is not None or not bn.training
        nbt = bn.num_batches_tracked
        momentum = 1.0 / float(nbt) if nbt is not None and bn.training else 0.0
    return F.batch_norm(
        input, running_mean, running_var, bn.weight, bn.bias, bn_training, momentum, bn.eps
    )


def _param_like(bn: nn.modules.batchnorm._BatchNorm, input: Tensor) -> Tensor:
    """A tensor in the dtype BatchNorm computes its statistics in (float32 under autocast)."""
    for t in (bn.weight, bn.running_mean):
        if t is not None:
            return t
    return input


class VmapBatchNormMixin:
    """Forward shared by the three classes (see the module docstring)."""

    mb_slot: Tensor
    _mb_momenta: list[float | None]
    _mb_epss: list[float]
    # Reading momentum / eps while the models' values differ raises (see PerModelAttribute);
    # assigning one value while they agree applies it to every model (_set_per_model).
    momentum = PerModelAttribute("momentum")
    eps = PerModelAttribute("eps")

    def _init_per_model(
        self, momenta: Sequence[float | None], epss: Sequence[float], device: torch.device
    ) -> None:
        """Record the N models' own momentum and eps; ``mb_slot`` [N] points into them."""
        self._mb_momenta = list(momenta)
        self._mb_epss = [float(e) for e in epss]
        self._mb_tables: dict[tuple[str, torch.device, torch.dtype], Tensor] = {}
        bn: nn.Module = self  # type: ignore[assignment]
        bn.register_buffer(
            "mb_slot", torch.arange(len(epss), dtype=torch.int64, device=device), persistent=False
        )

    def extra_repr(self) -> str:
        return repr_per_model(self, nn.modules.batchnorm._NormBase, ("momentum", "eps"))  # type: ignore[arg-type]

    def _set_per_model(self, attr: str, value: Any) -> bool:
        """``bn.momentum = v`` / ``bn.eps = v`` on the batch's layer: applied to every model
        when the models share one value (True), refused when they differ (False)."""
        current = self.per_model_momentum if attr == "momentum" else self.per_model_eps
        if any(v != current[0] for v in current):
            return False
        if attr == "momentum":
            self._mb_momenta = [value] * len(self._mb_momenta)
        else:
            self._mb_epss = [float(value)] * len(self._mb_epss)
        self._mb_tables.clear()
        return True

    @property
    def per_model_momentum(self) -> list[float | None]:
        """Each model's ``momentum`` (``None``: cumulative average), in position order."""
        return [self._mb_momenta[k] for k in self._slots()]

    @property
    def per_model_eps(self) -> list[float]:
        """Each model's ``eps``, in position order."""
        return [self._mb_epss[k] for k in self._slots()]

    def _slots(self) -> list[int]:
        """``mb_slot`` as a list (also inside the batch's vmap, where it is per model)."""
        slot = self.mb_slot
        while torch._C._functorch.is_batchedtensor(slot):
            slot = torch._C._functorch.get_unwrapped(slot)
        return [int(k) for k in slot.tolist()]

    def _table(self, name: str, values: Sequence[float | None], like: Tensor) -> Tensor:
        """``values`` as a device tensor (``None`` -> nan), cached per device and dtype."""
        key = (name, like.device, like.dtype)
        table = self._mb_tables.get(key)
        if table is None:
            table = torch.tensor(
                [float("nan") if v is None else v for v in values], dtype=like.dtype
            ).to(like.device)
            self._mb_tables[key] = table
        return table

    def forward(self, input: Tensor) -> Tensor:
        bn: nn.modules.batchnorm._BatchNorm = self  # type: ignore[assignment]
        if "_mb_epss" not in self.__dict__:  # built outside a ModelBatch: one model
            self._init_per_model([bn.momentum], [bn.eps], input.device)
        bn._check_input_dim(input)
        routing = _ROUTING.get() if bn.training else None
        if routing is not None and _under_vmap(input, bn.weight, bn.running_mean, self.mb_slot):
            return self._routed(input, routing)
        track = bn.training and bn.track_running_stats and bn.num_batches_tracked is not None
        if track:
            assert bn.num_batches_tracked is not None
            bn.num_batches_tracked.add_(1)
        bn_training = bn.training or (bn.running_mean is None and bn.running_var is None)
        use_stats = not bn.training or bn.track_running_stats
        running_mean = bn.running_mean if use_stats else None
        running_var = bn.running_var if use_stats else None
        # One model (built outside a batch): nn.BatchNorm's call. Inside a batch ``mb_slot``
        # is per model even when nothing else is (no affine, no running statistics, shared
        # input), so each model keeps its own eps.
        if not _under_vmap(input, bn.weight, running_mean, self.mb_slot):
            return _single(bn, input, running_mean, running_var, bn_training)
        momenta, epss = self._mb_momenta, self._mb_epss
        one_eps = all(e == epss[0] for e in epss)
        one_momentum = momenta[0] is not None and all(m == momenta[0] for m in momenta)
        if not one_eps and not bn_training:
            return self._composite(input, running_mean, running_var)
        if not one_eps:  # per-model eps: one pass, native backward, running stats apart
            eps = self._table("eps", epss, _param_like(bn, input))[self.mb_slot]
            out = batch_norm_eps(input, bn.weight, bn.bias, eps.expand(input.shape[1]))[0]
            if track:
                self._update_running(input, running_mean, running_var)
            return out
        if one_momentum or not (bn_training and track):
            momentum = momenta[0] if momenta[0] is not None else 0.0
            return self._native(
                input,
                bn.weight,
                bn.bias,
                running_mean,
                running_var,
                bn_training,
                float(momentum),
                epss[0],
            )
        # Per-model momenta or momentum=None: the running statistics are updated apart.
        out = self._native(input, bn.weight, bn.bias, None, None, True, 0.0, epss[0])
        self._update_running(input, running_mean, running_var)
        return out

    def _native(
        self,
        input: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        training: bool,
        momentum: float,
        eps: float,
    ) -> Tensor:
        """``modelbatch::batch_norm``; in the plain case its batching rule directly, without
        the operator's per-call Python cost (:mod:`modelbatch.layers._direct`)."""
        args = (input, weight, bias, running_mean, running_var, training, momentum, eps)
        level = plain_level(self.mb_slot)
        if level is None:
            return batch_norm(*args)
        return call_rule(_batch_norm_vmap, level, *args)

    def _routed(self, input: Tensor, routing: RoutedWeights) -> Tensor:
        """Training under data routing: statistics over each model's routed samples only."""
        bn: nn.modules.batchnorm._BatchNorm = self  # type: ignore[assignment]
        like = _param_like(bn, input)
        stats = bn.track_running_stats and bn.running_mean is not None
        return batch_norm_routed(
            input,
            bn.weight,
            bn.bias,
            bn.running_mean if stats else None,
            bn.running_var if stats else None,
            bn.num_batches_tracked if stats else None,
            routing.weights,
            self._table("momentum", self._mb_momenta, like)[self.mb_slot],
            self._table("eps", self._mb_epss, like)[self.mb_slot],
        )

    def _factor(self, like: Tensor) -> Tensor:
        """This model's running-average factor (0-dim): its momentum, or
        ``1 / num_batches_tracked`` for ``momentum=None``."""
        bn: nn.modules.batchnorm._BatchNorm = self  # type: ignore[assignment]
        m = self._table("momentum", self._mb_momenta, like)[self.mb_slot]
        if any(v is None for v in self._mb_momenta):
            assert bn.num_batches_tracked is not None
            cumulative = 1.0 / bn.num_batches_tracked.to(like.dtype)
            m = torch.where(torch.isnan(m), cumulative, m)
        return m

    def _update_running(
        self, x: Tensor, running_mean: Tensor | None, running_var: Tensor | None
    ) -> None:
        if running_mean is None or running_var is None:
            return
        with torch.no_grad():
            dims = [0, *range(2, x.dim())]
            var, mean = torch.var_mean(x.to(running_mean.dtype), dim=dims, correction=1)
            f = self._factor(running_mean)
            running_mean.mul_(1 - f).add_(mean * f)
            running_var.mul_(1 - f).add_(var * f)

    def _composite(
        self, input: Tensor, running_mean: Tensor | None, running_var: Tensor | None
    ) -> Tensor:
        """Eval mode with per-model eps: ``x * scale + shift`` from the running statistics."""
        bn: nn.modules.batchnorm._BatchNorm = self  # type: ignore[assignment]
        assert running_mean is not None and running_var is not None
        x = input.to(running_mean.dtype)
        eps = self._table("eps", self._mb_epss, x)[self.mb_slot]
        scale = torch.rsqrt(running_var + eps)
        if bn.weight is not None:
            scale = scale * bn.weight
        shift = -running_mean * scale if bn.bias is None else bn.bias - running_mean * scale
        shape = [1, -1, *([1] * (x.dim() - 2))]
        return torch.addcmul(shift.view(shape), x, scale.view(shape)).to(input.dtype)


class VmapBatchNorm1d(VmapBatchNormMixin, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` whose N copies run as one native call (see the module docstring)."""


class VmapBatchNorm2d(VmapBatchNormMixin, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose N copies run as one native call (see the module docstring)."""


class VmapBatchNorm3d(VmapBatchNormMixin, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` whose N copies run as one native call (see the module docstring)."""


_REPLACEMENTS: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: VmapBatchNorm1d,
    nn.BatchNorm2d: VmapBatchNorm2d,
    nn.BatchNorm3d: VmapBatchNorm3d,
}


def _substitute(module: nn.Module, context: dict[str, object]) -> nn.Module:
    peers = list(context.get("peers") or [])  # type: ignore[call-overload]
    n = int(context.get("num_models", len(peers) or 1))  # type: ignore[call-overload]
    if not peers:
        peers = [module] * n
    module.__class__ = _REPLACEMENTS[type(module)]
    given = context.get("device")
    ref = module.running_mean if module.running_mean is not None else module.weight
    device = given if isinstance(given, torch.device) else torch.device("cpu")
    if not isinstance(given, torch.device) and isinstance(ref, Tensor):
        device = ref.device
    assert isinstance(module, VmapBatchNormMixin)
    module._init_per_model([p.momentum for p in peers], [p.eps for p in peers], device)
    return module


for _cls in _REPLACEMENTS:
    register_substitution(_cls, _substitute)
