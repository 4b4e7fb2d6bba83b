"""BatchNorm substitution: identical to ``nn.BatchNorm`` in full precision (float64 within
1e-10), working under vmap with low-precision inputs (what autocast produces), and with
``momentum=None``."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import modelbatch
from modelbatch import ModelBatch
from modelbatch.layers.batchnorm import VmapBatchNorm1d, VmapBatchNorm2d, VmapBatchNorm3d
from tests.helpers import assert_close_models, rel_err, train_alone

N = 3

BN_CASES = {
    "1d": (nn.BatchNorm1d, VmapBatchNorm1d, (6, 4)),
    "1d_seq": (nn.BatchNorm1d, VmapBatchNorm1d, (6, 4, 5)),
    "2d": (nn.BatchNorm2d, VmapBatchNorm2d, (6, 4, 3, 3)),
    "3d": (nn.BatchNorm3d, VmapBatchNorm3d, (6, 4, 2, 2, 2)),
}
OPTIONS = {
    "default": {},
    "cumulative": {"momentum": None},
    "no_affine": {"affine": False},
    "no_running_stats": {"track_running_stats": False},
}


class Net(nn.Module):
    def __init__(self, bn: nn.Module, dims: int) -> None:
        super().__init__()
        self.bn = bn
        self.dims = dims
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.bn(x)
        if h.dim() > 2:
            h = h.flatten(2).mean(2)
        return self.head(h)


def make(case: str, option: str, dtype: torch.dtype = torch.float64) -> list[nn.Module]:
    cls, _, shape = BN_CASES[case]
    torch.manual_seed(0)
    models = []
    for _ in range(N):
        m = Net(cls(4, **OPTIONS[option]), len(shape)).to(dtype)
        if m.bn.affine:
            with torch.no_grad():
                m.bn.weight.uniform_(0.5, 1.5)
                m.bn.bias.uniform_(-0.5, 0.5)
        models.append(m)
    return models


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("case", list(BN_CASES))
def test_float64_training_equals_nn_batchnorm(case: str, option: str) -> None:
    models = make(case, option)
    batch = ModelBatch(models)
    _, vcls, shape = BN_CASES[case]
    assert type(batch.stacked.bn) is vcls
    assert batch.state_dict().keys() == {f"stacked.{k}" for k in models[0].state_dict()} | {
        "active",
        "model_ids",
    }
    opt = modelbatch.optim.SGD(batch, lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(*shape, generator=g, dtype=torch.float64),
             torch.randint(0, 2, (shape[0],), generator=g)) for _ in range(3)]
    for x, y in data:
        loss = batch.compute_loss(batch(x), y, F.cross_entropy)
        opt.zero_grad()
        loss.backward()
        opt.step()
    ref = train_alone(models, lambda i, m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
                      data, F.cross_entropy)
    extracted = batch.extract_all()
    assert type(extracted[0].bn) is BN_CASES[case][0]  # users get plain nn.BatchNorm back
    assert_close_models(extracted, ref, torch.float64, f"{case}/{option}")
    # Eval mode (running statistics) too.
    batch.eval()
    x = data[0][0]
    out = batch(x)
    for i, m in enumerate(ref):
        m.eval()
        assert rel_err(out[i], m(x)) <= 1e-10


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["1d", "2d"])
def test_low_precision_input_matches_single_module(case: str, dtype: torch.dtype) -> None:
    """A bf16/fp16 input with float32 weights and statistics (what a layer under autocast
    hands to BatchNorm) fails in plain vmap; the substitute matches nn.BatchNorm alone."""
    cls, _, shape = BN_CASES[case]
    torch.manual_seed(0)
    bns = [cls(4) for _ in range(N)]
    for bn in bns:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    batch = ModelBatch([nn.Sequential(copy.deepcopy(bn)) for bn in bns])
    x = (torch.randn(*shape) * 3 + 1).to(dtype)
    xb = x.clone().requires_grad_()
    out = batch(xb)
    assert out.dtype == dtype
    grad_out = torch.randn(out.shape).to(dtype)
    out.backward(grad_out)
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    params = dict(batch.stacked_parameters())
    buffers = dict(batch.stacked_buffers())
    x_grad = torch.zeros_like(x, dtype=torch.float32)
    for i, bn in enumerate(bns):
        xi = x.clone().requires_grad_()
        ref = bn(xi)
        assert ref.dtype == dtype
        ref.backward(grad_out[i])
        x_grad += xi.grad.float()
        assert rel_err(out[i], ref) <= tol
        assert rel_err(params["0.weight"].grad[i], bn.weight.grad) <= tol
        assert rel_err(params["0.bias"].grad[i], bn.bias.grad) <= tol
        # Statistics are accumulated in float32 from the same low-precision values.
        assert rel_err(buffers["0.running_mean"][i], bn.running_mean) <= 1e-5
        assert rel_err(buffers["0.running_var"][i], bn.running_var) <= 1e-5
    assert xb.grad is not None and rel_err(xb.grad, x_grad) <= 5 * tol
