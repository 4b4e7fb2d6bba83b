"""Parametrized weights in a ModelBatch: the _weight_norm batching rule, spectral_norm's
power iteration per model, the structure check and copying old-style weight_norm models."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.func import vmap
from torch.nn.utils import parametrizations as P

import modelbatch
from modelbatch import ArchitectureMismatchError
from modelbatch.layers.parametrize import VmapSpectralNorm, copy_model

N = 3


@pytest.mark.parametrize("dim", [0, 1, 2, -1])
@pytest.mark.parametrize("g_shared", [False, True])
def test_weight_norm_rule_equals_torch(dim: int, g_shared: bool) -> None:
    torch.manual_seed(0)
    v = torch.randn(N, 4, 3, 2, dtype=torch.float64, requires_grad=True)
    g_shape = (
        [1, 1, 1]
        if dim == -1
        else [4 if dim == 0 else 1, 3 if dim == 1 else 1, 2 if dim == 2 else 1]
    )
    g = torch.randn(*([] if g_shared else [N]), *g_shape, dtype=torch.float64, requires_grad=True)
    out = vmap(lambda v, g: torch._weight_norm(v, g, dim), in_dims=(0, None if g_shared else 0))(
        v, g
    )
    grads = torch.autograd.grad(out.sin().sum(), (v, g))
    for i in range(N):
        gi = g if g_shared else g[i]
        ref = torch._weight_norm(v[i], gi, dim)
        torch.testing.assert_close(out[i], ref, rtol=1e-13, atol=1e-13)
        (ref_gv,) = torch.autograd.grad(ref.sin().sum(), v)
        torch.testing.assert_close(grads[0][i], ref_gv[i], rtol=1e-12, atol=1e-12)


def test_spectral_norm_power_iteration_runs_per_model() -> None:
    torch.manual_seed(0)
    models = [P.spectral_norm(nn.Linear(4, 5)).double() for _ in range(N)]
    batch = modelbatch.ModelBatch(models)
    assert type(batch.stacked.parametrizations.weight[0]) is VmapSpectralNorm
    x = torch.randn(2, 4, dtype=torch.float64)
    out = batch(x)
    for i, m in enumerate(models):
        torch.testing.assert_close(out[i], m(x), rtol=1e-12, atol=1e-12)
        u = m.parametrizations.weight[0]._u
        torch.testing.assert_close(batch.stacked.parametrizations.weight[0]._u[i], u)
    extracted = batch.extract(0)
    assert type(extracted.parametrizations.weight[0]).__name__ == "_SpectralNorm"


def test_parametrized_models_are_compared_by_their_original_class() -> None:
    same = [P.weight_norm(nn.Linear(3, 2)) for _ in range(N)]
    modelbatch.ModelBatch(same)
    mixed = [P.weight_norm(nn.Linear(3, 2)), P.spectral_norm(nn.Linear(3, 2))]
    with pytest.raises(ArchitectureMismatchError, match="model 1"):
        modelbatch.ModelBatch(mixed)
    with pytest.raises(ArchitectureMismatchError, match="model 1"):
        modelbatch.ModelBatch([P.weight_norm(nn.Linear(3, 2)), nn.Linear(3, 2)])


def test_copy_model_copies_old_style_weight_norm() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = nn.utils.weight_norm(nn.Linear(3, 2))
    with pytest.raises(RuntimeError, match="deepcopy"):
        copy.deepcopy(model)
    twin = copy_model(model)
    x = torch.randn(4, 3)
    torch.testing.assert_close(twin(x), model(x))
    assert twin.weight_v is not model.weight_v


def test_old_style_weight_norm_extract_and_insert() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        models = [nn.utils.weight_norm(nn.Linear(3, 2)) for _ in range(N)]
        newcomer = nn.utils.weight_norm(nn.Linear(3, 2))
    batch = modelbatch.ModelBatch(models)
    extracted = batch.extract(1)
    # The computed weight is model 1's (as weight_norm() and its hook compute it).
    torch.testing.assert_close(extracted.weight, models[1].weight)
    assert extracted.weight.grad_fn is not None
    batch.insert(0, newcomer)  # the structure check accepts a fresh weight-normed model
    batch.insert(2, extracted)
    x = torch.randn(4, 3)
    out = batch(x)
    torch.testing.assert_close(out[0], newcomer(x))
    torch.testing.assert_close(out[2], models[1](x))
    copy.deepcopy(batch)


def _old_spectral_net() -> nn.Module:
    # A GAN discriminator's layers with the older torch.nn.utils.spectral_norm (a hook that
    # keeps the computed weight as a plain attribute, set from weight.data when applied).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return nn.Sequential(
            nn.utils.spectral_norm(nn.Linear(4, 6)),
            nn.LeakyReLU(0.2),
            nn.Unflatten(1, (6, 1)),
            nn.utils.spectral_norm(nn.Conv1d(6, 3, 1), n_power_iterations=2),
            nn.Flatten(1),
        ).double()


def test_old_style_spectral_norm_trains_like_alone() -> None:
    """The older torch.nn.utils.spectral_norm: models with different weights share a batch
    (its computed weight is not a setting), its power iteration runs per model, and each
    model ends as alone; extract and insert see a plain spectral-normed model."""
    import torch.nn.functional as F

    from tests.helpers import assert_close_models

    torch.manual_seed(0)
    models = [_old_spectral_net() for _ in range(N)]

    batch = modelbatch.ModelBatch(copy_model_list(models))
    opt = modelbatch.optim.SGD(batch, lr=0.1)
    alone = copy_model_list(models)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in alone]
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(5, 4, generator=g, dtype=torch.float64)
        y = torch.randn(5, 3, generator=g, dtype=torch.float64)
        opt.zero_grad()
        batch.compute_loss(batch(x), y, F.mse_loss).backward()
        opt.step()
        for m, o in zip(alone, opts, strict=True):
            o.zero_grad()
            F.mse_loss(m(x), y).backward()
            o.step()
    assert_close_models(batch.extract_all(), alone, torch.float64, "old spectral_norm")
    x = torch.randn(2, 4, dtype=torch.float64)
    batch.eval()
    out = batch(x)
    for i, m in enumerate(alone):
        m.eval()
        torch.testing.assert_close(out[i], m(x), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(batch.extract(i)[0].weight, m[0].weight)
    batch.insert(0, alone[2])
    torch.testing.assert_close(batch(x)[0], alone[2](x), rtol=1e-10, atol=1e-12)


def copy_model_list(models: list[nn.Module]) -> list[nn.Module]:
    return [copy_model(m) for m in models]
