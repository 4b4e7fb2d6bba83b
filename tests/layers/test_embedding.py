"""Batching rules for embedding_bag and embedding_renorm_: equal to each model alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import vmap

import modelbatch
import modelbatch.layers.embedding

N, V, D = 3, 10, 4


def _weights(dtype: torch.dtype = torch.float64) -> Tensor:
    torch.manual_seed(0)
    return (2 * torch.randn(N, V, D, dtype=dtype)).requires_grad_()


IDX_1D = torch.tensor([1, 0, 3, 3, 0, 0, 7, 2, 9])
OFFSETS = torch.tensor([0, 2, 2, 6])  # bags of 2, 0, 4 and 3 indices


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("padding_idx", [None, 0])
@pytest.mark.parametrize("layout", ["2d", "offsets", "offsets_last", "per_model_2d"])
def test_embedding_bag_equals_each_model_alone(
    mode: str, padding_idx: int | None, layout: str
) -> None:
    w = _weights()
    psw = None
    if layout == "2d":
        idx = torch.tensor([[1, 0, 3], [0, 0, 0], [4, 4, 2]])
        call = lambda w, i: F.embedding_bag(i, w, mode=mode, padding_idx=padding_idx)  # noqa: E731
        in_dims: tuple[int | None, ...] = (0, None)
    elif layout == "per_model_2d":
        idx = torch.randint(0, V, (N, 3, 4))
        idx[:, 0, :2] = 0
        call = lambda w, i: F.embedding_bag(i, w, mode=mode, padding_idx=padding_idx)  # noqa: E731
        in_dims = (0, 0)
    else:
        idx = IDX_1D
        last = layout == "offsets_last"
        # include_last_offset: the last offset is the number of indices (torch's contract)
        offs = torch.cat([OFFSETS, torch.tensor([len(IDX_1D)])]) if last else OFFSETS
        if mode == "sum":
            psw = torch.rand(len(IDX_1D), dtype=torch.float64)
        call = lambda w, i: F.embedding_bag(  # noqa: E731
            i,
            w,
            offs,
            mode=mode,
            padding_idx=padding_idx,
            include_last_offset=last,
            per_sample_weights=psw,
        )
        in_dims = (0, None)
    out = vmap(call, in_dims=in_dims)(w, idx)
    weight = torch.arange(out[0].numel(), dtype=out.dtype).view(out.shape[1:])  # per model
    (g,) = torch.autograd.grad((out * weight).sum(), w)
    for i in range(N):
        wi = w.detach()[i].clone().requires_grad_()
        ref = call(wi, idx[i] if in_dims[1] == 0 else idx)
        torch.testing.assert_close(out[i], ref, rtol=1e-12, atol=1e-12)
        (gi,) = torch.autograd.grad((ref * weight).sum(), wi)
        torch.testing.assert_close(g[i], gi, rtol=1e-12, atol=1e-12)


def test_embedding_bag_scale_grad_by_freq_is_refused_with_the_reason() -> None:
    w = _weights()
    with pytest.raises(NotImplementedError, match="scale_grad_by_freq=True is not supported"):
        vmap(lambda w: F.embedding_bag(IDX_1D, w, OFFSETS, scale_grad_by_freq=True))(w)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("norm_type", [2.0, 1.0])
def test_embedding_renorm_equals_each_model_alone(dtype: torch.dtype, norm_type: float) -> None:
    w = _weights(dtype).detach()
    idx = torch.tensor([[1, 3, 3], [9, 0, 1]])
    ref = w.clone()
    with torch.no_grad():
        out = vmap(lambda w: F.embedding(idx, w, max_norm=1.5, norm_type=norm_type))(w)
    tol = {"rtol": 1e-14 if dtype == torch.float64 else 1e-6, "atol": 0.0}
    for i in range(N):
        expected = F.embedding(idx, ref[i], max_norm=1.5, norm_type=norm_type)
        torch.testing.assert_close(out[i], expected, **tol)
    torch.testing.assert_close(w, ref, **tol)  # every row renormalised as alone (or not)
    assert not torch.equal(w, _weights(dtype).detach())  # and some row did change


def test_embedding_max_norm_trains_as_alone() -> None:
    torch.manual_seed(0)
    models = [torch.nn.Embedding(V, D, max_norm=1.0).double() for _ in range(N)]
    batch = modelbatch.ModelBatch(models)
    opt = modelbatch.optim.SGD(batch, lr=0.5)
    idx = torch.tensor([[1, 2, 2], [5, 1, 0]])
    for _ in range(3):
        opt.zero_grad()
        batch(idx).square().sum().backward()
        opt.step()
    for i, m in enumerate(models):
        o = torch.optim.SGD(m.parameters(), lr=0.5)
        for _ in range(3):
            o.zero_grad()
            m(idx).square().sum().backward()
            o.step()
        torch.testing.assert_close(batch.stacked.weight[i], m.weight, rtol=1e-12, atol=1e-12)
