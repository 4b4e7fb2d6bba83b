"""A batching rule for ``scaled_dot_product_attention``.

``F.scaled_dot_product_attention`` (every ``nn.TransformerEncoder/Decoder`` layer,
``nn.MultiheadAttention`` with ``need_weights=False``, ViTs, HuggingFace's default "sdpa"
attention) has no vmap batching rule for the kernel it picks on CPU
(``_scaled_dot_product_flash_attention_for_cpu``), so under vmap it ran once per model in a
slow Python loop. The rule registered here (for that kernel) folds the model dimension into
the attention's batch dimension: the N models' ``[B, H, L, E]`` queries become one
``[N*B, H, L, E]`` call of the same kernel, and the output is unfolded again.

Per model the call is unchanged (same mask, causal flag, scale), so each model's result
is what it computes alone, up to the kernel's summation order. With ``dropout_p > 0`` vmap
runs the attention in its math form (batchable, with vmap's randomness modes) and this rule
is not used. A learned mask (one that requires grad, e.g. T5's position bias) takes the math
kernel, as it does for a model alone.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__: list[str] = []


def _first(t: Tensor, bdim: int | None, n: int) -> Tensor:
    """``t`` with the model dimension first (expanded when ``t`` is shared)."""
    return t.movedim(bdim, 0) if bdim is not None else t.expand(n, *t.shape)


def _flash_cpu_vmap(
    info: Any,
    in_dims: tuple[int | None, ...],
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
) -> tuple[tuple[Tensor, Tensor], tuple[int, int | None]]:
    """Batching rule of ``_scaled_dot_product_flash_attention_for_cpu`` (the kernel that
    ``F.scaled_dot_product_attention`` picks on CPU). Per model: query ``[B, H, L, E]``,
    key ``[B, H, S, E]``, value ``[B, H, S, Ev]``, ``attn_mask`` broadcastable to
    ``[B, H, L, S]``. One call on ``[N*B, H, ...]``; returns the output ``[N, B, H, L, Ev]``
    and the log-sum-exp ``[N, B, H, L]``."""
    n = int(info.batch_size)
    # (With dropout_p > 0, vmap decomposes scaled_dot_product_attention into its math
    # form, which handles randomness itself; this rule is then not reached.)
    q, k, v = (_first(t, d, n) for t, d in zip((query, key, value), in_dims[:3], strict=True))
    b = max(q.shape[1], k.shape[1], v.shape[1])
    q, k, v = (t.expand(n, b, *t.shape[2:]).reshape(n * b, *t.shape[2:]) for t in (q, k, v))
    mask = attn_mask
    if mask is not None:
        m_dim = in_dims[3]
        if m_dim is not None or (mask.dim() == 4 and mask.shape[0] != 1):
            # Per-model masks, or one [B, ...] mask: one [h, L, S] block per (model, sample).
            m = _first(mask, m_dim, n)
            m = m.reshape(n, *([1] * (5 - m.dim())), *m.shape[1:])
            m = m.expand(n, b, *m.shape[2:]).reshape(n * b, *m.shape[2:])
            mask = m
        # otherwise one mask for every model and sample: it broadcasts over N*B as it is
    if mask is not None and mask.requires_grad:
        # A learned mask (T5's relative position bias): the flash kernel has no gradient for
        # it, and a model alone takes the math path here too (its mask requires grad; under
        # vmap the batched mask does not say so, hence this kernel was picked).
        out, _ = torch.ops.aten._scaled_dot_product_attention_math(
            q, k, v, mask, dropout_p, is_causal, scale=scale
        )
        lse = torch.empty(0, dtype=out.dtype, device=out.device)  # unused by the caller
        return (out.unflatten(0, (n, b)), lse), (0, None)  # type: ignore[return-value]
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, dropout_p, is_causal, attn_mask=mask, scale=scale
    )
    return (out.unflatten(0, (n, b)), lse.unflatten(0, (n, b))), (0, 0)


def _flash_cpu_call(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
) -> Any:
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale
    )


def _flash_cpu_batched(
    keyset: Any,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    *,
    attn_mask: Tensor | None = None,
    scale: float | None = None,
) -> Any:
    # What torch.library.register_vmap installs, with the keyword-only attn_mask passed on
    # as a positional operand (register_vmap refuses keyword-only tensors).
    from torch._functorch.autograd_function import custom_function_call_vmap_helper
    from torch._functorch.pyfunctorch import retrieve_current_functorch_interpreter

    del keyset
    return custom_function_call_vmap_helper(
        retrieve_current_functorch_interpreter(),  # type: ignore[arg-type]
        _flash_cpu_vmap,
        _flash_cpu_call,
        query,
        key,
        value,
        attn_mask,
        dropout_p,
        is_causal,
        scale,
    )


_LIB = torch.library.Library("aten", "IMPL")  # batching rules for aten ops
_LIB.impl(
    "_scaled_dot_product_flash_attention_for_cpu",
    _flash_cpu_batched,
    "FuncTorchBatched",
    with_keyset=True,
)
