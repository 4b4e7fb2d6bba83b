"""The batching rule for scaled_dot_product_attention on CPU equals the attention of each
model alone (forward and gradients), for every way the mask can be given."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import vmap
from torch.utils._python_dispatch import TorchDispatchMode

import modelbatch.layers.attention  # noqa: F401  (registers the rule)

N, B, H, L, S, E = 3, 2, 2, 5, 4, 6


def _rand(*shape: int, grad: bool = True) -> Tensor:
    return torch.randn(*shape, dtype=torch.float64, requires_grad=grad)


MASKS = {
    "none": lambda: None,
    "shared_bool_LS": lambda: torch.rand(L, S) > 0.3,
    "shared_float_B1LS": lambda: torch.randn(B, 1, L, S, dtype=torch.float64),
    "per_model_float_LS": lambda: torch.randn(N, L, S, dtype=torch.float64),
    "per_model_bool_BHLS": lambda: torch.rand(N, B, H, L, S) > 0.3,
}


@pytest.mark.parametrize("mask_kind", list(MASKS))
@pytest.mark.parametrize("q_dim", [0, None], ids=["per_model_q", "shared_q"])
def test_rule_equals_each_model_alone(mask_kind: str, q_dim: int | None) -> None:
    torch.manual_seed(0)
    q = _rand(N, B, H, L, E) if q_dim == 0 else _rand(B, H, L, E)
    k, v = _rand(N, B, H, S, E), _rand(N, B, H, S, E)
    mask = MASKS[mask_kind]()
    if mask is not None and mask.dtype == torch.bool:
        mask[..., 0] = True  # no fully masked row
    m_dim = 0 if mask_kind.startswith("per_model") else None
    out = vmap(F.scaled_dot_product_attention, in_dims=(q_dim, 0, 0, m_dim))(q, k, v, mask)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    for i in range(N):
        qi = q[i] if q_dim == 0 else q
        mi = mask[i] if m_dim == 0 else mask  # type: ignore[index]
        ref = F.scaled_dot_product_attention(qi, k[i], v[i], mi)
        torch.testing.assert_close(out[i], ref, rtol=1e-12, atol=1e-12)
        ref_grads = torch.autograd.grad(ref.square().sum(), (k, v))
        torch.testing.assert_close(grads[1][i], ref_grads[0][i], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grads[2][i], ref_grads[1][i], rtol=1e-12, atol=1e-12)


def test_causal_and_scale() -> None:
    q, k, v = _rand(N, B, H, L, E), _rand(N, B, H, L, E), _rand(N, B, H, L, E)

    def attn(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)

    out = vmap(attn)(q, k, v)
    for i in range(N):
        torch.testing.assert_close(out[i], attn(q[i], k[i], v[i]), rtol=1e-12, atol=1e-12)


def test_learned_mask_gets_its_gradient() -> None:
    # T5-style: the additive mask is a learned position bias (requires grad).
    q, k, v = _rand(N, B, H, L, E), _rand(N, B, H, S, E), _rand(N, B, H, S, E)
    bias = _rand(N, 1, H, L, S)
    out = vmap(F.scaled_dot_product_attention)(q, k, v, bias)
    (g,) = torch.autograd.grad(out.square().sum(), bias)
    for i in range(N):
        ref = F.scaled_dot_product_attention(q[i], k[i], v[i], bias[i])
        torch.testing.assert_close(out[i], ref, rtol=1e-12, atol=1e-12)
        (gi,) = torch.autograd.grad(ref.square().sum(), bias)
        torch.testing.assert_close(g[i], gi[i], rtol=1e-12, atol=1e-12)


def test_attention_dropout_follows_vmap_randomness() -> None:
    q = _rand(B, H, L, E, grad=False).expand(N, B, H, L, E)

    def attn(q: Tensor) -> Tensor:
        return F.scaled_dot_product_attention(q, q, q, dropout_p=0.5)

    same = vmap(attn, randomness="same")(q)
    different = vmap(attn, randomness="different")(q)
    assert torch.equal(same[0], same[1])
    assert not torch.equal(different[0], different[1])


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = str(func.overloadpacket)
        self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def test_one_kernel_call_for_all_models() -> None:
    # The point of the rule: the N models' attention is one call of the CPU kernel (and one
    # of its backward), not N (vmap's per-model fallback).
    q, k, v = _rand(N, B, H, L, E), _rand(N, B, H, S, E), _rand(N, B, H, S, E)
    with _CountOps() as counter:
        out = vmap(F.scaled_dot_product_attention)(q, k, v)
        out.sum().backward()
    flash = {n: c for n, c in counter.calls.items() if "flash" in n}
    assert flash == {
        "aten._scaled_dot_product_flash_attention_for_cpu": 1,
        "aten._scaled_dot_product_flash_attention_for_cpu_backward": 1,
    }


def test_rules_keep_torch_func_per_sample_gradients_right() -> None:
    # The rules are registered for the aten operators, so they also serve other torch.func
    # code in the process: vmap(grad(...)) (per-sample gradients) must stay exact. The
    # kernel's backward (and embedding_bag under grad) have no rule of their own: allow
    # vmap's fallback here.
    from torch.func import grad

    import modelbatch.layers.embedding
    import modelbatch.layers.parametrize  # noqa: F401

    torch._C._functorch._set_vmap_fallback_enabled(True)
    q = torch.randn(N, B, H, L, E, dtype=torch.float64)
    w = torch.randn(N, 10, 3, dtype=torch.float64)
    idx = torch.tensor([[1, 2, 3], [0, 0, 4]])

    def attn(q: Tensor) -> Tensor:
        return F.scaled_dot_product_attention(q, q, q).square().sum()

    def bag(w: Tensor) -> Tensor:
        return F.embedding_bag(idx, w, mode="mean", padding_idx=0).square().sum()

    def norm(v: Tensor) -> Tensor:
        return torch._weight_norm(v, torch.ones(10, 1, dtype=v.dtype), 0).sin().sum()

    with warnings.catch_warnings():  # vmap's "performance drop" warnings of the fallback
        warnings.simplefilter("ignore", UserWarning)
        got = [vmap(grad(f))(x) for f, x in ((attn, q), (bag, w), (norm, w))]
    for f, x, g in zip((attn, bag, norm), (q, w, w), got, strict=True):
        for i in range(N):
            xi = x[i].clone().requires_grad_()
            (expected,) = torch.autograd.grad(f(xi), xi)
            torch.testing.assert_close(g[i], expected, rtol=1e-12, atol=1e-12)
