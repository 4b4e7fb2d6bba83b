"""Per-model, N-independent dropout: masks drawn from a counter-based hash.

``vmap(randomness="different")`` gives each model its own dropout mask, but all masks come
from one stateful generator, so model i's mask depends on N and on the other models. When a
:class:`~modelbatch.ModelBatch` is built with ``seeds=``, every ``nn.Dropout`` /
``nn.Dropout1d`` / ``nn.Dropout2d`` / ``nn.Dropout3d`` in the stacked mirror is replaced by a
:class:`SeededDropout` whose mask element ``j`` at the ``c``-th training call of model ``i``
is a pure function of ``(seeds[i], layer index, c, j)``. Model i's masks are therefore the
same whatever N is and whichever models share the batch, and the same as those of a plain
module using :class:`SeededDropout` alone with ``seed=seeds[i]``.

The hash works on 32-bit lanes held in int64 tensors, so every multiplication stays below
2**63 (no reliance on integer overflow) and the result is the same on every device.
Without ``seeds`` the batch keeps torch's dropout (randomness from ``vmap``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from modelbatch.layers import register_substitution

__all__ = ["SeededDropout", "dropout_keep_mask"]

_M32 = 0xFFFFFFFF
_LAYER_COUNTER_KEY = "_seeded_dropout_layers"
# Number of trailing feature dimensions that share one mask entry, per dropout class.
_FEATURE_DIMS: dict[type[nn.Module], int] = {
    nn.Dropout: 0,
    nn.Dropout1d: 1,
    nn.Dropout2d: 2,
    nn.Dropout3d: 3,
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
    seed: Tensor, counter: Tensor, layer: int, shape: torch.Size | tuple[int, ...], p: float
) -> Tensor:
    """Boolean keep-mask of ``shape`` for one model: ``True`` with probability ``1 - p``.

    A pure function of ``(seed, counter, layer, element index)``, built from vmappable
    integer tensor ops only (``seed`` and ``counter`` may be batched 0-dim tensors).

    Args:
        seed: 0-dim int64 tensor, the model's seed.
        counter: 0-dim int64 tensor, how many times this layer ran in training mode before.
        layer: index of the dropout layer within the model (a salt).
        shape: shape of the mask.
        p: drop probability in ``[0, 1]``.
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
    threshold = round(p * (1 << 24))
    return (h >> 8) >= threshold


class SeededDropout(nn.Module):
    """Dropout whose masks depend only on a seed and a per-layer call counter.

    Works as a plain module (``seed`` an int: 0-dim buffers) and, inside a ModelBatch, with
    stacked ``[N]`` buffers, one seed and one counter per model. The counter advances by one
    at every forward in training mode. Both are buffers, so checkpoints keep them; they do
    not exist in the original model, so ``batch.extract(i)`` gives back a plain
    ``nn.Dropout`` and its ``state_dict`` is unchanged.

    Args:
        p: drop probability.
        seed: the model's seed (int) or an ``[N]`` int64 tensor of per-model seeds.
        feature_dims: trailing dimensions that share one mask entry: 0 for ``nn.Dropout``,
            1/2/3 for ``nn.Dropout1d/2d/3d`` (whole channels are dropped).
        layer: index of this dropout layer in the model, so that layers get different masks.
    """

    seed: Tensor
    counter: Tensor

    def __init__(
        self, p: float = 0.5, seed: int | Tensor = 0, *, feature_dims: int = 0, layer: int = 0
    ) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
        self.p = float(p)
        self.feature_dims = int(feature_dims)
        self.layer = int(layer)
        seed_t = torch.as_tensor(seed, dtype=torch.int64)
        if bool((seed_t < 0).any()):
            raise ValueError(f"dropout seeds must be non-negative, got {seed}")
        self.register_buffer("seed", seed_t.clone())
        self.register_buffer("counter", torch.zeros_like(self.seed))

    def forward(self, x: Tensor) -> Tensor:
        """Apply dropout to ``x`` (per model: ``[B, ...]``); the identity in eval mode."""
        if not self.training:
            return x
        counter = self.counter.clone()
        self.counter.add_(1)
        if self.p == 0.0:
            return x
        if self.p == 1.0:
            return x * 0.0
        k = self.feature_dims
        if k:
            if x.dim() not in (k + 1, k + 2):
                raise ValueError(
                    f"{k}d channel dropout expects a {k + 1}-D or {k + 2}-D input, "
                    f"got shape {tuple(x.shape)}"
                )
            mask_shape = tuple(x.shape[: x.dim() - k]) + (1,) * k
        else:
            mask_shape = tuple(x.shape)
        keep = dropout_keep_mask(self.seed, counter, self.layer, mask_shape, self.p)
        return x * keep.to(x.dtype) * (1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}, feature_dims={self.feature_dims}, layer={self.layer}"


def _substitute(module: nn.Module, context: dict[str, Any]) -> nn.Module:
    seeds = context.get("seeds")
    if seeds is None:
        return module
    layer = int(context.get(_LAYER_COUNTER_KEY, 0))  # type: ignore[call-overload]
    context[_LAYER_COUNTER_KEY] = layer + 1
    device = context.get("device")
    seed_t = torch.as_tensor(list(seeds), dtype=torch.int64, device=device)  # type: ignore[arg-type]
    return _seeded_replacement(module, seed_t, layer)


def _seeded_replacement(module: nn.Module, seed: int | Tensor, layer: int) -> SeededDropout:
    """The :class:`SeededDropout` standing in for ``module`` (an ``nn.Dropout`` /
    ``Dropout1d/2d/3d``): same ``p`` and mode, whole channels for the channel variants."""
    new = SeededDropout(
        module.p,  # type: ignore[arg-type]
        seed,
        feature_dims=_FEATURE_DIMS[type(module)],
        layer=layer,
    )
    new.train(module.training)
    return new


for _cls in _FEATURE_DIMS:
    register_substitution(_cls, _substitute)
