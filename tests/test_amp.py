"""Mixed precision: the per-model gradient scaler equals ``torch.amp.GradScaler`` applied
to each model trained alone, skips only the overflowing model, and follows drops; whole
training steps run under bf16 / fp16 autocast, BatchNorm included."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import modelbatch
from modelbatch import BatchGradScaler, CallbackPack, ModelBatch, NaNGuard
from tests.helpers import rel_err

N = 3
# Model 1 sees 100x larger inputs and starts with a scale so large that its scaled
# gradients overflow float32 for a few steps (each overflow halves the scale); the others
# never overflow. growth_interval=2 makes the scales grow within the test.
INIT_SCALES = [2.0**10, 2.0**127, 2.0**12]
# Multiplies model 1's loss so that it overflows at the very first step.
BOOST = torch.tensor([1.0, 1e3, 1.0])


def make_models() -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)) for _ in range(N)]


def steps(k: int) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(k):
        x = torch.randn(N, 5, 4, generator=g)
        x[1] *= 100.0
        out.append((x, torch.randint(0, 3, (5,), generator=g)))
    return out


def test_batch_grad_scaler_equals_grad_scaler_per_model() -> None:
    models = make_models()
    data = steps(6)
    batch = ModelBatch(models)
    opt = modelbatch.optim.Adam(batch, lr=0.01)
    scaler = BatchGradScaler(batch, init_scale=INIT_SCALES, growth_interval=2)
    history = []
    for x, y in data:
        losses = batch.compute_loss(batch(x, per_model=True), y, F.cross_entropy,
                                    reduction="none")
        opt.zero_grad()
        scaler.scale(losses).backward()
        scaler.step(opt)
        scaler.update()
        history.append((scaler.get_scale().tolist(), scaler._growth_tracker.tolist(),
                        scaler.found_inf.tolist()))
    assert any(h[2][1] for h in history) and not any(h[2][0] or h[2][2] for h in history)
    for i, model in enumerate(models):
        m = copy.deepcopy(model)
        ref_opt = torch.optim.Adam(m.parameters(), lr=0.01)
        ref = torch.amp.GradScaler("cpu", init_scale=INIT_SCALES[i], growth_interval=2)
        for k, (x, y) in enumerate(data):
            ref_opt.zero_grad()
            ref.scale(F.cross_entropy(m(x[i]), y)).backward()
            ref.step(ref_opt)
            ref.update()
            assert history[k][0][i] == ref.get_scale(), (i, k)
            assert history[k][1][i] == ref._growth_tracker.item(), (i, k)
        mine = batch.extract(i)
        for (name, p), q in zip(mine.named_parameters(), m.parameters(), strict=True):
            assert rel_err(p, q) <= 1e-5, (i, name)


def test_overflow_skips_only_that_model() -> None:
    batch = ModelBatch(make_models())
    opt = modelbatch.optim.SGD(batch, lr=0.1, momentum=0.9)
    scaler = BatchGradScaler(batch, init_scale=INIT_SCALES)
    before = {k: v.detach().clone() for k, v in batch.stacked_parameters()}
    x, y = steps(1)[0]
    losses = batch.compute_loss(batch(x, per_model=True), y, F.cross_entropy, reduction="none")
    scaler.scale(losses * BOOST).backward()
    scaler.step(opt)
    scaler.update()
    assert batch.all_active  # the skip is for this step only, not a quarantine
    for k, p in batch.stacked_parameters():
        assert torch.equal(p[1], before[k][1])
        assert not torch.equal(p[0], before[k][0])
    assert float(opt.state["0.weight"]["step"][1]) == 0.0
    assert scaler.get_scale().tolist() == [2.0**10, 2.0**126, 2.0**12]


def test_scaler_api_errors_disabled_mode_and_state_dict() -> None:
    batch = ModelBatch(make_models())
    opt = modelbatch.optim.SGD(batch, lr=0.1)
    scaler = BatchGradScaler(batch)
    x, y = steps(1)[0]
    loss = batch.compute_loss(batch(x, per_model=True), y, F.cross_entropy)
    with pytest.raises(ValueError, match="reduction='none'"):
        scaler.scale(loss)
    losses = batch.compute_loss(batch(x, per_model=True), y, F.cross_entropy, reduction="none")
    scaler.scale(losses).backward()
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="already been called"):
        scaler.unscale_(opt)
    scaler.step(opt)
    with pytest.raises(RuntimeError, match="already been called"):
        scaler.step(opt)
    scaler.update()
    with pytest.raises(TypeError, match="built on its ModelBatch"):
        scaler.step(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1))
    with pytest.raises(ValueError, match="one value per model"):
        BatchGradScaler(batch, init_scale=[1.0, 2.0])
    sd = scaler.state_dict()
    other = BatchGradScaler(batch, init_scale=3.0)
    other.load_state_dict(sd)
    assert torch.equal(other.get_scale(), scaler.get_scale())
    off = BatchGradScaler(batch, enabled=False)
    assert torch.equal(off.scale(losses), losses.sum())


def test_scaler_follows_drop() -> None:
    batch = ModelBatch(make_models(), model_ids=["a", "b", "c"])
    scaler = BatchGradScaler(batch, init_scale=[1.0, 2.0, 4.0])
    batch.drop("b")
    assert scaler.get_scale().tolist() == [1.0, 4.0]
    assert scaler.state_dict()["model_ids"] == ["a", "c"]


def test_nan_guard_with_scaler_leaves_overflow_to_the_scaler() -> None:
    batch = ModelBatch(make_models())
    opt = modelbatch.optim.SGD(batch, lr=0.1)
    scaler = BatchGradScaler(batch, init_scale=INIT_SCALES)
    pack = CallbackPack(batch, [NaNGuard()], optimizer=opt, scaler=scaler)
    x, y = steps(1)[0]
    pack.on_step_begin()
    losses = batch.compute_loss(batch(x, per_model=True), y, F.cross_entropy, reduction="none")
    scaler.scale(losses * BOOST).backward()
    pack.on_before_optimizer_step()  # unscales; model 1 overflowed but is not quarantined
    scaler.step(opt)
    scaler.update()
    pack.on_step_end()
    assert batch.all_active and scaler.found_inf.tolist() == [False, True, False]


def conv_bn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 5 * 5, 3),
    )


def _autocast_training(device: str, dtype: torch.dtype, use_scaler: bool) -> None:
    torch.manual_seed(0)
    models = [conv_bn().to(device) for _ in range(N)]
    batch = ModelBatch(models)
    opt = modelbatch.optim.SGD(batch, lr=0.05, momentum=0.9)
    scaler = BatchGradScaler(batch, enabled=use_scaler)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(6, 2, 5, 5, generator=g).to(device),
             torch.randint(0, 3, (6,), generator=g).to(device)) for _ in range(3)]
    for x, y in data:
        with modelbatch.autocast(batch, dtype):
            losses = batch.compute_loss(batch(x), y, F.cross_entropy, reduction="none")
        opt.zero_grad()
        scaler.scale(losses).backward()
        scaler.step(opt)
        scaler.update()
    # Reference: each model alone under the same autocast (and its own GradScaler).
    for i, model in enumerate(models):
        m = copy.deepcopy(model)
        ref_opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
        ref = torch.amp.GradScaler(device, enabled=use_scaler)
        for x, y in data:
            with torch.autocast(device, dtype=dtype):
                loss = F.cross_entropy(m(x), y)
            ref_opt.zero_grad()
            ref.scale(loss).backward()
            ref.step(ref_opt)
            ref.update()
        mine = batch.extract(i).state_dict()
        for name, v in m.state_dict().items():
            if v.is_floating_point():
                # Within low-precision rounding: the batched and the single-model kernels
                # round differently (on CPU, vmap even runs some layers in float32).
                err = float((mine[name] - v).abs().max())
                assert torch.allclose(mine[name], v, rtol=2e-2, atol=1e-2), (i, name, err)
            else:
                assert torch.equal(mine[name], v)


@pytest.mark.parametrize(("dtype", "use_scaler"), [(torch.bfloat16, False),
                                                   (torch.float16, True)])
def test_autocast_training_with_batchnorm_cpu(dtype: torch.dtype, use_scaler: bool) -> None:
    _autocast_training("cpu", dtype, use_scaler)


@pytest.mark.cuda
@pytest.mark.parametrize(("dtype", "use_scaler"), [(torch.bfloat16, False),
                                                   (torch.float16, True)])
def test_autocast_training_with_batchnorm_cuda(dtype: torch.dtype, use_scaler: bool) -> None:
    _autocast_training("cuda", dtype, use_scaler)


def test_autocast_helper() -> None:
    batch = ModelBatch(make_models())
    ctx = modelbatch.autocast(batch, torch.float16)
    assert isinstance(ctx, torch.autocast) and ctx.device == "cpu"
    with pytest.raises(ValueError, match=r"bfloat16 or torch\.float16"):
        modelbatch.autocast("cpu", torch.float32)
