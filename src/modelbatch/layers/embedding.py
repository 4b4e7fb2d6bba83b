"""Batching rules for ``embedding_bag`` and ``embedding_renorm_``.

Neither op has a vmap batching rule, so under vmap they ran once per model in a slow Python
loop: ``nn.EmbeddingBag`` (every mode, with or without ``padding_idx``) and ``nn.Embedding``
/ ``nn.EmbeddingBag`` with ``max_norm`` (which renormalises the looked-up rows in place
before the lookup). The rules registered here compute the same for the N models at once
with batched ops:

* ``embedding_bag``: rows gathered per model ``[N, T, D]``, each position assigned to its
  bag (from ``offsets``), positions equal to ``padding_idx`` left out, then one
  ``scatter_add`` (``sum``; ``mean`` divides by the number of non-padding entries) or
  ``scatter_reduce(amax)`` (``max``) into ``[N, bags, D]``; empty bags give zeros, as
  torch's. ``per_sample_weights`` is honoured; ``scale_grad_by_freq=True`` is refused (torch's
  own gradient for it is not the documented one; see the error). Only the first output (the bags) is
  computed; the three auxiliary outputs, which ``F.embedding_bag`` discards, are empty.
* ``embedding_renorm_``: rows looked up by any index whose norm exceeds ``max_norm`` are
  scaled by ``max_norm / (norm + 1e-7)`` (computed in float64, as torch does), in place in
  the stacked ``[N, V, D]`` weight.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__: list[str] = []


def _first(t: Tensor, bdim: int | None, n: int) -> Tensor:
    return t.movedim(bdim, 0) if bdim is not None else t.expand(n, *t.shape)


def _embedding_bag_vmap(
    info: Any,
    in_dims: tuple[int | None, ...],
    weight: Tensor,
    indices: Tensor,
    offsets: Tensor,
    scale_grad_by_freq: bool = False,
    mode: int = 0,
    sparse: bool = False,
    per_sample_weights: Tensor | None = None,
    include_last_offset: bool = False,
    padding_idx: int | None = None,
) -> tuple[tuple[Tensor, Tensor, Tensor, Tensor], tuple[int, None, None, None]]:
    """Per model: weight ``[V, D]``, indices ``[T]``, offsets ``[K]`` (bag starts),
    per_sample_weights ``[T]``. Returns bags ``[N, K (or K-1), D]`` (model dimension 0)."""
    del sparse  # a stacked weight gets a dense gradient (the same values)
    if scale_grad_by_freq:
        raise NotImplementedError(
            "EmbeddingBag / F.embedding_bag with scale_grad_by_freq=True is not supported in "
            "a ModelBatch: torch's embedding_bag backward does not scale each row's gradient "
            "by that row's count (F.embedding_bag(tensor([3, 1, 1]), w, tensor([0]), "
            "mode='sum', scale_grad_by_freq=True) gives row 3 the gradient 0.5), and that "
            "cannot be reproduced for N models at once. Way out: scale_grad_by_freq=False, "
            "or nn.Embedding(scale_grad_by_freq=True) followed by a sum or mean"
        )
    n = int(info.batch_size)
    w = _first(weight, in_dims[0], n)  # [N, V, D]
    idx = _first(indices, in_dims[1], n)  # [N, T]
    off = _first(offsets, in_dims[2], n).contiguous()  # [N, K]
    nv, d = w.shape[1], w.shape[2]
    t = idx.shape[1]
    num_bags = off.shape[1] - (1 if include_last_offset else 0)
    pos = torch.arange(t, device=idx.device, dtype=off.dtype).expand(n, t).contiguous()
    bag = torch.searchsorted(off, pos, right=True) - 1  # [N, T]
    valid = (bag >= 0) & (bag < num_bags)
    if padding_idx is not None:
        pad = padding_idx + nv if padding_idx < 0 else padding_idx
        valid = valid & (idx != pad)
    bag = torch.where(valid, bag, num_bags)  # left-out positions go to a spare bag
    rows = w.gather(1, idx.unsqueeze(-1).expand(n, t, d))  # [N, T, D]
    rows = torch.where(valid.unsqueeze(-1), rows, torch.zeros((), dtype=w.dtype, device=w.device))
    if per_sample_weights is not None:
        psw = _first(per_sample_weights, in_dims[6], n)
        rows = rows * psw.unsqueeze(-1)
    index = bag.unsqueeze(-1).expand(n, t, d)
    out = torch.zeros(n, num_bags + 1, d, dtype=rows.dtype, device=rows.device)
    if mode == 2:
        out = out.scatter_reduce(1, index, rows, "amax", include_self=False)
    else:
        out = out.scatter_add(1, index, rows)
        if mode == 1:
            count = torch.zeros(n, num_bags + 1, dtype=rows.dtype, device=rows.device)
            count = count.scatter_add(1, bag, valid.to(rows.dtype))
            out = out / count.clamp_min(1).unsqueeze(-1)
    empty = torch.empty(0, dtype=idx.dtype, device=idx.device)
    return (out[:, :num_bags], empty, empty, empty), (0, None, None, None)


def _embedding_renorm_vmap(
    info: Any,
    in_dims: tuple[int | None, ...],
    weight: Tensor,
    indices: Tensor,
    max_norm: float,
    norm_type: float,
) -> tuple[Tensor, int]:
    """In place, per model: rows of weight ``[V, D]`` looked up by ``indices`` (any shape)
    with a norm above ``max_norm`` are scaled to ``max_norm``."""
    n = int(info.batch_size)
    if in_dims[0] is None:
        raise RuntimeError(
            "embedding_renorm_ under vmap needs a per-model weight (it writes into it)"
        )
    w = weight.movedim(in_dims[0], 0)  # a view: writes reach the weight
    idx = _first(indices, in_dims[1], n).reshape(n, -1)
    hit = torch.zeros(w.shape[:2], dtype=torch.bool, device=w.device)
    hit = hit.scatter(1, idx, True)
    with torch.no_grad():
        norm = torch.linalg.vector_norm(w, ord=norm_type, dim=-1).double()
        scale = torch.where(hit & (norm > max_norm), max_norm / (norm + 1e-7), 1.0)
        w.mul_(scale.to(w.dtype).unsqueeze(-1))
    return weight, in_dims[0]


_LIB = torch.library.Library("aten", "IMPL")  # batching rules for aten ops
for _op in ("aten::embedding_bag", "aten::embedding_bag.padding_idx"):
    torch.library.register_vmap(_op, _embedding_bag_vmap, lib=_LIB)
torch.library.register_vmap("aten::embedding_renorm_", _embedding_renorm_vmap, lib=_LIB)
