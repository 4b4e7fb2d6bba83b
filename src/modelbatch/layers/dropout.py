"""Dropout inside a batch: N-independent seeded masks, and per-model rates.

``vmap(randomness="different")`` gives each model its own dropout mask, but all masks come
from one stateful generator, so model i's mask depends on N and on the other models. When a
:class:`~modelbatch.ModelBatch` is built with ``seeds=``, every layer of the dropout family
(``nn.Dropout``, ``nn.Dropout1d/2d/3d``, ``nn.AlphaDropout``, ``nn.FeatureAlphaDropout``) in
the stacked mirror is replaced by a :class:`SeededDropout` whose mask element ``j`` at the
``c``-th training call of model ``i`` is a pure function of ``(seeds[i], layer index, c,
j)``. Model i's masks are therefore the same whatever N is and whichever models share the
batch, and the same as those of a plain module using :class:`SeededDropout` alone with
``seed=seeds[i]`` (:func:`modelbatch.use_seeded_dropout`).

**Per-model rates.** Models may differ in their dropout probability ``p`` (a dropout sweep
is one batch). With ``seeds=``, :class:`SeededDropout` reads model i's own ``p`` from an
``[N]`` buffer; model i then trains exactly as it does alone with ``use_seeded_dropout``.
Without seeds, a layer whose rate differs between models becomes a
:class:`PerModelDropout`: torch's formula with model i's rate, its random numbers drawn
under vmap's randomness like torch's dropout (when all rates agree, torch's own dropout
stays). Either way the layer records the rates as ``per_model_p``.

**Shapes.** The channel variants follow what torch does on the same input alone,
including its warnings: ``Dropout1d`` takes ``[C, L]`` or ``[B, C, L]``; ``Dropout2d``
and ``FeatureAlphaDropout`` share one mask entry per ``input[b, c]`` for any input of 2 or
more dimensions (a 3-D input is read as ``[B, C, L]``, with torch's warning);
``Dropout3d`` reads a 5-D input as batched and anything else as one sample.

The hash works on 32-bit lanes held in int64 tensors, so every multiplication stays below
2**63 (no reliance on integer overflow) and the result is the same on every device.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modelbatch.layers import register_substitution
from modelbatch.layers.settings import (
    PerModelAttribute,
    attach_per_model,
    differing_values,
    read_per_model,
)

__all__ = ["PerModelDropout", "SeededDropout", "dropout_keep_mask"]

_M32 = 0xFFFFFFFF
_LAYER_COUNTER_KEY = "_seeded_dropout_layers"
# SELU's alpha, as in torch's alpha dropout.
_ALPHA = 1.7580993408473766
# Per dropout class: (feature_dims, alpha). feature_dims: 0 = one mask entry per element;
# 1/2/3 = the mask rules of Dropout1d/2d/3d (FeatureAlphaDropout uses Dropout2d's).
_DROPOUT_KINDS: dict[type[nn.Module], tuple[int, bool]] = {
    nn.Dropout: (0, False),
    nn.Dropout1d: (1, False),
    nn.Dropout2d: (2, False),
    nn.Dropout3d: (3, False),
    nn.AlphaDropout: (0, True),
    nn.FeatureAlphaDropout: (2, True),
}
# Backwards-compatible name: the dropout classes that get a seeded replacement.
_FEATURE_DIMS = {cls: kind[0] for cls, kind in _DROPOUT_KINDS.items()}
# The torch function whose input checks (errors and warnings) each kind reproduces, and the
# input ranks for which that function neither warns nor raises.
_TORCH_FN: dict[tuple[int, bool], tuple[Any, tuple[int, ...] | None]] = {
    (0, False): (F.dropout, None),
    (1, False): (F.dropout1d, (2, 3)),
    (2, False): (F.dropout2d, (4,)),
    (3, False): (F.dropout3d, (4, 5)),
    (0, True): (F.alpha_dropout, None),
    (2, True): (F.feature_alpha_dropout, None),
}


def _mul32(x: Tensor, c: int) -> Tensor:
    """``(x * c) mod 2**32`` for int64 ``x`` in ``[0, 2**32)``, without int64 overflow."""
    c_lo, c_hi = c & 0xFFFF, c >> 16
    return (x * c_lo + (((x * c_hi) & 0xFFFF) << 16)) & _M32


def _mix32(x: Tensor) -> Tensor:
    """A bijective 32-bit integer hash (the "lowbias32" finaliser of C. Wellons)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def dropout_keep_mask(
    seed: Tensor,
    counter: Tensor,
    layer: int,
    shape: torch.Size | tuple[int, ...],
    p: float | Tensor,
) -> Tensor:
    """Boolean keep-mask of ``shape`` for one model: ``True`` with probability ``1 - p``.

    A pure function of ``(seed, counter, layer, element index)``, built from vmappable
    integer tensor ops only (``seed`` and ``counter`` may be batched 0-dim tensors).

    Args:
        seed: 0-dim int64 tensor, the model's seed.
        counter: 0-dim int64 tensor, how many times this layer ran in training mode before.
        layer: index of the dropout layer within the model (a salt).
        shape: shape of the mask.
        p: drop probability in ``[0, 1]``: a float, or a 0-dim float64 tensor (under vmap,
            each model's own); both give the same mask for the same value.
    """
    s_lo = seed & _M32
    s_hi = (seed >> 32) & _M32
    key = _mix32(s_lo ^ _mix32(s_hi ^ 0x9E3779B9))
    key = _mix32(key ^ (layer & _M32))
    key = _mix32(key ^ (counter & _M32))
    key = _mix32(key ^ ((counter >> 32) & _M32) ^ 0x85EBCA6B)
    key2 = _mix32(key ^ 0xC2B2AE35)
    numel = 1
    for d in shape:
        numel *= int(d)
    j = torch.arange(numel, dtype=torch.int64, device=seed.device).view(tuple(shape))
    h = _mix32(_mix32((j & _M32) ^ key) ^ key2)
    if isinstance(p, Tensor):  # p * 2**24 is exact; torch.round rounds half to even as round()
        threshold: int | Tensor = torch.round(p.to(torch.float64) * (1 << 24)).to(torch.int64)
    else:
        threshold = round(p * (1 << 24))
    return (h >> 8) >= threshold


def _mask_shape(x: Tensor, feature_dims: int, alpha: bool) -> tuple[int, ...]:
    """Shape of the dropout mask for input ``x`` (one model), with torch's errors and
    warnings for the same input alone."""
    shape = tuple(x.shape)
    dim = len(shape)
    fn, quiet = _TORCH_FN[(feature_dims, alpha)]
    if quiet is not None and dim not in quiet:
        # torch's own checks: Dropout1d raises, Dropout2d/3d warn. A meta tensor costs nothing.
        fn(torch.empty(shape, device="meta", dtype=x.dtype), 0.5, False)
    if feature_dims == 0:
        return shape
    if feature_dims == 1:  # [C, L] or [B, C, L]: one entry per channel
        return (*shape[:-1], 1)
    if feature_dims == 2:  # torch's feature noise on the input as given: [d0, d1, 1, ...]
        if dim < 2:
            raise RuntimeError("Feature dropout requires at least 2 dimensions in the input")
        return (*shape[:2], *(1,) * (dim - 2))
    # Dropout3d: a 5-D input is batched; any other is one sample (torch unsqueezes it).
    if dim == 5:
        return (*shape[:2], 1, 1, 1)
    if dim < 1:
        raise RuntimeError("Feature dropout requires at least 2 dimensions in the input")
    return (shape[0], *(1,) * (dim - 1))


def _times(t: Tensor, s: Tensor) -> Tensor:
    """``t * s`` for a per-model 0-dim float64 ``s``, rounded as torch rounds ``t * float``:
    the scalar in the op's compute type (float32 for half/bfloat16), one rounding to
    ``t.dtype``."""
    if t.dtype in (torch.float16, torch.bfloat16):
        return (t.float() * s.float()).to(t.dtype)
    return t * s.to(t.dtype)


def _plus(t: Tensor, s: Tensor) -> Tensor:
    """``t + s``, rounded as :func:`_times` rounds."""
    if t.dtype in (torch.float16, torch.bfloat16):
        return (t.float() + s.float()).to(t.dtype)
    return t + s.to(t.dtype)


def _alpha_mask(x: Tensor, noise: Tensor, p: Tensor) -> Tensor:
    """torch's alpha-dropout formula for a keep-``noise`` of 0/1 and a 0-dim float64 rate
    ``p < 1``: kept entries become ``a * x + alpha * a * p``, dropped ones
    ``alpha * a * (p - 1)``, with ``a = 1 / sqrt((alpha^2 p + 1)(1 - p))``. The same tensor
    arithmetic for a plain float rate (a CPU 0-dim tensor) and a per-model one, so a model
    alone and inside a batch agree bit for bit in every dtype."""
    a = 1.0 / torch.sqrt((_ALPHA * _ALPHA * p + 1) * (1 - p))
    b = _plus(_times(noise.add(-1), _ALPHA * a), _ALPHA * a * p)
    return x * _times(noise, a) + b


def _apply_mask(x: Tensor, keep: Tensor, p: float | Tensor, alpha: bool) -> Tensor:
    """torch's dropout arithmetic with a given keep-mask and rate ``p`` (a float below 1, or
    model i's 0-dim float64 rate; both give bit-identical results for the same value)."""
    noise = keep.to(x.dtype)
    if not isinstance(p, Tensor):
        if alpha:
            return _alpha_mask(x, noise, torch.tensor(p, dtype=torch.float64))
        return x * noise * (1.0 / (1.0 - p))
    dropped = p == 1.0  # torch returns input * 0 for p == 1
    if alpha:
        out = _alpha_mask(x, noise, torch.where(dropped, torch.zeros_like(p), p))
        return torch.where(dropped, x * 0.0, out)
    scale = torch.where(dropped, torch.zeros_like(p), 1.0 / (1.0 - p))
    return _times(x * noise, scale)


def _output(x: Tensor, out: Tensor, inplace: bool) -> Tensor:
    """``out``, written into ``x`` when the layer is in-place (as torch's dropout with
    ``inplace=True``: the caller's tensor is overwritten and returned)."""
    return x.copy_(out) if inplace else out


def _check_p(p: float) -> float:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    return float(p)


def _check_kind(feature_dims: int, alpha: bool) -> None:
    if (int(feature_dims), bool(alpha)) not in _TORCH_FN:
        raise ValueError(
            f"no dropout of torch has feature_dims={feature_dims}, alpha={alpha}; use "
            "feature_dims 0-3 without alpha, or 0 (AlphaDropout) / 2 (FeatureAlphaDropout) "
            "with alpha"
        )


class SeededDropout(nn.Module):
    """Dropout whose masks depend only on a seed and a per-layer call counter.

    Works as a plain module (``seed`` an int: 0-dim buffers) and, inside a ModelBatch, with
    stacked ``[N]`` buffers, one seed and one counter per model. The counter advances by one
    at every forward in training mode. Both are buffers, so checkpoints keep them; they do
    not exist in the original model, so ``batch.extract(model_id)`` gives back a plain
    ``nn.Dropout`` and its ``state_dict`` is unchanged.

    Args:
        p: drop probability, or one per model (a sequence of N floats: then kept as
            ``per_model_p`` and an ``[N]`` non-persistent buffer, and ``p`` is model 0's).
        seed: the model's seed (int) or an ``[N]`` int64 tensor of per-model seeds.
        feature_dims: 0 for ``nn.Dropout``/``nn.AlphaDropout``; 1/2/3 for
            ``nn.Dropout1d/2d/3d`` (whole channels are dropped, as torch does on the same
            input; 2 with ``alpha`` for ``nn.FeatureAlphaDropout``).
        layer: index of this dropout layer in the model, so that layers get different masks.
        alpha: alpha dropout (``nn.AlphaDropout``/``nn.FeatureAlphaDropout``): dropped
            entries take SELU's negative saturation value and the output keeps zero mean
            and unit variance, with torch's formula.
        inplace: write the result into the input and return it, as torch's dropout with
            ``inplace=True`` does (a model may rely on its input being overwritten).
    """

    seed: Tensor
    counter: Tensor
    per_model_p: list[float] | None
    p = PerModelAttribute("p")

    def __init__(
        self,
        p: float | list[float] | tuple[float, ...] = 0.5,
        seed: int | Tensor = 0,
        *,
        feature_dims: int = 0,
        layer: int = 0,
        alpha: bool = False,
        inplace: bool = False,
    ) -> None:
        super().__init__()
        _check_kind(feature_dims, alpha)
        rates = [_check_p(v) for v in p] if isinstance(p, (list, tuple)) else [_check_p(p)]
        self.inplace = bool(inplace)
        self.p = rates[0]
        self.per_model_p = None
        self.feature_dims = int(feature_dims)
        self.layer = int(layer)
        self.alpha = bool(alpha)
        seed_t = torch.as_tensor(seed, dtype=torch.int64)
        if bool((seed_t < 0).any()):
            raise ValueError(f"dropout seeds must be non-negative, got {seed}")
        self.register_buffer("seed", seed_t.clone())
        self.register_buffer("counter", torch.zeros_like(self.seed))
        if isinstance(p, (list, tuple)):
            if seed_t.dim() != 1 or len(rates) != seed_t.shape[0]:
                raise ValueError(
                    f"per-model rates need one seed per model: {len(rates)} rates, "
                    f"seed of shape {tuple(seed_t.shape)}"
                )
            attach_per_model(self, "p", rates, seed_t.device)

    def forward(self, x: Tensor) -> Tensor:
        """Apply dropout to ``x`` (per model: ``[B, ...]``); the identity in eval mode."""
        shape = _mask_shape(x, self.feature_dims, self.alpha)
        if not self.training:
            return x
        counter = self.counter.clone()
        self.counter.add_(1)
        p: float | Tensor
        if self.per_model_p is not None:
            p = read_per_model(self._per_model_p)  # type: ignore[arg-type]
        elif (p := self.p) == 0.0:
            return x
        elif self.p == 1.0:
            return _output(x, x * 0.0, self.inplace)
        keep = dropout_keep_mask(self.seed, counter, self.layer, shape, p)
        return _output(x, _apply_mask(x, keep, p, self.alpha), self.inplace)

    def extra_repr(self) -> str:
        p = self.per_model_p if self.per_model_p is not None else self.p
        alpha = ", alpha=True" if self.alpha else ""
        inplace = ", inplace=True" if self.inplace else ""
        return f"p={p}, feature_dims={self.feature_dims}, layer={self.layer}{alpha}{inplace}"


class PerModelDropout(nn.Module):
    """A dropout layer with one rate per model, random numbers from vmap's randomness.

    Used inside a ModelBatch built without ``seeds=`` when the models' rates differ. Model
    i computes torch's dropout formula with its own rate ``per_model_p[i]``; its mask is
    ``uniform < 1 - p_i`` with the uniform numbers drawn under ``vmap`` (different per model
    with ``randomness="different"``, shared with ``"same"``), so the masks, like torch's
    own dropout under vmap, depend on N and cannot equal a model trained alone draw for
    draw. Use ``seeds=`` for masks that do.

    Args:
        rates: the N drop probabilities.
        feature_dims, alpha, inplace: as for :class:`SeededDropout`.
        device: where the ``[N]`` rate buffer lives.
    """

    per_model_p: list[float]
    _per_model_p: Tensor
    p = PerModelAttribute("p")

    def __init__(
        self,
        rates: list[float] | tuple[float, ...],
        *,
        feature_dims: int = 0,
        alpha: bool = False,
        device: Any = None,
        inplace: bool = False,
    ) -> None:
        super().__init__()
        _check_kind(feature_dims, alpha)
        checked = [_check_p(v) for v in rates]
        self.p = checked[0]
        self.inplace = bool(inplace)
        self.feature_dims = int(feature_dims)
        self.alpha = bool(alpha)
        attach_per_model(self, "p", checked, device)

    def forward(self, x: Tensor) -> Tensor:
        """Apply model i's dropout to ``x`` (per model: ``[B, ...]``); identity in eval."""
        shape = _mask_shape(x, self.feature_dims, self.alpha)
        if not self.training or x.numel() == 0:
            return x
        p = read_per_model(self._per_model_p)
        u_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        keep = torch.rand(shape, dtype=u_dtype, device=x.device) < (1.0 - p).to(u_dtype)
        return _output(x, _apply_mask(x, keep, p, self.alpha), self.inplace)

    def extra_repr(self) -> str:
        alpha = ", alpha=True" if self.alpha else ""
        return f"p={self.per_model_p}, feature_dims={self.feature_dims}{alpha}"


def _substitute(module: nn.Module, context: dict[str, Any]) -> nn.Module:
    feature_dims, alpha = _DROPOUT_KINDS[type(module)]
    rates = differing_values(context.get("peers") or [], "p")
    seeds = context.get("seeds")
    if seeds is None:
        if rates is None:
            return module  # torch's dropout, randomness from vmap
        new: nn.Module = PerModelDropout(
            rates,
            feature_dims=feature_dims,
            alpha=alpha,
            device=context.get("device"),
            inplace=bool(getattr(module, "inplace", False)),
        )
        new.train(module.training)
        return new
    layer = int(context.get(_LAYER_COUNTER_KEY, 0))
    context[_LAYER_COUNTER_KEY] = layer + 1
    seed_t = torch.as_tensor(list(seeds), dtype=torch.int64, device=context.get("device"))
    return _seeded_replacement(module, seed_t, layer, rates)


def _seeded_replacement(
    module: nn.Module, seed: int | Tensor, layer: int, rates: list[float] | None = None
) -> SeededDropout:
    """The :class:`SeededDropout` standing in for ``module`` (a layer of the dropout
    family): same ``p`` (or the N per-model ``rates``), kind and mode."""
    feature_dims, alpha = _DROPOUT_KINDS[type(module)]
    new = SeededDropout(
        rates if rates is not None else float(module.p),  # type: ignore[arg-type]
        seed,
        feature_dims=feature_dims,
        layer=layer,
        alpha=alpha,
        inplace=bool(getattr(module, "inplace", False)),
    )
    new.train(module.training)
    return new


for _cls in _DROPOUT_KINDS:
    register_substitution(_cls, _substitute)
