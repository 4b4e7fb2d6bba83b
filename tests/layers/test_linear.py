"""``nn.Linear`` as one ``baddbmm`` (``modelbatch.layers.linear``): outputs and gradients equal
each model alone for every input form, the weights' gradients come out contiguous (no copy
into the flat storage's layout), and every case the fast path does not take (outer
transforms, forward-mode AD, torch.compile, mismatched dtypes) still equals the model alone."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad, jvp, vmap

from modelbatch import ModelBatch
from modelbatch.bench.profile import KernelCounter
from modelbatch.layers.linear import VmapLinear, batched_linear
from tests.helpers import TOL, assert_close_models, rel_err, train_alone

N = 3


def mlp(dtype: torch.dtype = torch.float64, bias: bool = True) -> nn.Module:
    return nn.Sequential(
        nn.Linear(5, 7, bias=bias), nn.ReLU(), nn.Linear(7, 4), nn.Tanh(), nn.Linear(4, 3)
    ).to(dtype)


def make_models(dtype: torch.dtype = torch.float64, bias: bool = True) -> list[nn.Module]:
    torch.manual_seed(0)
    return [mlp(dtype, bias) for _ in range(N)]


def alone_outputs(models: list[nn.Module], xs: list[Tensor]) -> Tensor:
    return torch.stack([m(x) for m, x in zip(models, xs, strict=True)])


def test_every_linear_of_the_mirror_is_swapped_and_extract_gives_nn_linear() -> None:
    batch = ModelBatch(make_models())
    assert all(type(m) is VmapLinear for m in batch.stacked if isinstance(m, nn.Linear))
    assert all(type(m) is nn.Linear for m in batch.extract(1) if isinstance(m, nn.Linear))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize(
    "shape", [(6, 5), (2, 3, 5), (5,), (0, 5)], ids=["BxIn", "BxTxIn", "In", "empty"]
)
@pytest.mark.parametrize("per_model", [False, True], ids=["shared", "per-model"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_outputs_and_gradients_equal_each_model_alone(
    dtype: torch.dtype, shape: tuple[int, ...], per_model: bool, bias: bool
) -> None:
    models = make_models(dtype, bias)
    batch = ModelBatch(copy.deepcopy(models))
    g = torch.Generator().manual_seed(1)
    if per_model:
        x = torch.randn(N, *shape, generator=g, dtype=dtype, requires_grad=True)
        xs = [x[i].detach().clone().requires_grad_() for i in range(N)]
    else:
        x = torch.randn(*shape, generator=g, dtype=dtype, requires_grad=True)
        xs = [x.detach().clone().requires_grad_() for _ in range(N)]
    out = batch(x, per_model=per_model)
    ref = alone_outputs(models, xs)
    assert out.shape == ref.shape and out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=TOL[dtype], atol=TOL[dtype])
    w = torch.randn(ref.shape, generator=g, dtype=dtype)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    for name, p in batch.stacked.named_parameters():
        for i, m in enumerate(models):
            expected = m.get_parameter(name).grad
            assert expected is not None and p.grad is not None
            assert rel_err(p.grad[i], expected) <= TOL[dtype] or expected.abs().max() == 0, name
    x_grad = torch.stack([xi.grad for xi in xs])  # type: ignore[misc]
    assert x.grad is not None
    expected_x = x_grad if per_model else x_grad.sum(0)
    torch.testing.assert_close(x.grad, expected_x, rtol=TOL[dtype], atol=TOL[dtype])


def test_weight_gradients_are_contiguous_and_not_copied() -> None:
    """The gradient is the backward's own contiguous [N, out, in] (autograd steals it): no
    clone per weight in backward, as vmap's own rule needed."""
    batch = ModelBatch(make_models())
    out = batch(torch.randn(4, 5, dtype=torch.float64))
    loss = out.square().sum()
    with KernelCounter() as k, k.phase("backward"):
        loss.backward()
    assert k.ops["backward"].get("clone", 0) == 0 and k.ops["backward"].get("copy_", 0) == 0
    assert k.ops["backward"]["bmm"] == 5  # 3 weights, 2 inputs (the first input is data)
    for name, p in batch.stacked.named_parameters():
        assert p.grad is not None and p.grad.is_contiguous(), name


def test_trains_like_torch_optim_alone() -> None:
    models = make_models()
    g = torch.Generator().manual_seed(2)
    data = [
        (
            torch.randn(6, 5, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (6,), generator=g),
        )
        for _ in range(4)
    ]
    batch = ModelBatch(copy.deepcopy(models))
    opt = torch.optim.SGD(batch.parameters(), lr=0.1, momentum=0.9)
    for x, y in data:
        opt.zero_grad()
        batch.compute_loss(batch(x), y, F.cross_entropy).backward()
        opt.step()
    alone = train_alone(
        models,
        lambda i, m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
        data,
        F.cross_entropy,
    )
    assert_close_models(batch.extract_all(), alone, torch.float64)


def test_gradient_penalty_double_backward_equals_alone() -> None:
    """create_graph through the layer's own backward: a per-model input-gradient penalty."""
    models = make_models()
    batch = ModelBatch(copy.deepcopy(models))
    x = torch.randn(N, 4, 5, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(batch(x, per_model=True).sum(), x, create_graph=True)
    gx.square().sum().backward()
    for i, m in enumerate(models):
        xi = x[i].detach().clone().requires_grad_()
        (gi,) = torch.autograd.grad(m(xi).sum(), xi, create_graph=True)
        gi.square().sum().backward()
        for name, p in batch.stacked.named_parameters():
            expected = m.get_parameter(name).grad  # None: a bias the penalty cannot see
            got = None if p.grad is None or not p.grad[i].any() else p.grad[i]
            if expected is None:
                assert got is None, name
            else:
                torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def test_under_outer_transforms_the_default_rule_runs_and_agrees() -> None:
    """An outer vmap, torch.func.grad and jvp around the batch's forward: vmap's own
    F.linear rule (the fast path needs plain autograd); same values as the models alone."""
    models = make_models()
    batch = ModelBatch(copy.deepcopy(models))
    xs = torch.randn(2, 4, 5, dtype=torch.float64)
    out = vmap(batch)(xs)  # [2, N, 4, 3]
    ref = torch.stack([alone_outputs(models, [x] * N) for x in xs])
    torch.testing.assert_close(out, ref)
    x = torch.randn(4, 5, dtype=torch.float64)
    gx = grad(lambda t: batch(t).sum())(x)
    torch.testing.assert_close(gx, sum(grad(lambda t, m=m: m(t).sum())(x) for m in models))
    t = torch.randn_like(x)
    _, tangent = jvp(batch, (x,), (t,))
    expected = torch.stack([jvp(m, (x,), (t,))[1] for m in models])
    torch.testing.assert_close(tangent, expected)


def test_forward_mode_ad_levels_take_the_default_rule() -> None:
    import torch.autograd.forward_ad as fwAD

    models = make_models()
    batch = ModelBatch(copy.deepcopy(models))
    x, t = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    with fwAD.dual_level():
        out = batch(fwAD.make_dual(x, t))
        tangent = fwAD.unpack_dual(out).tangent
    expected = torch.stack([jvp(m, (x,), (t,))[1] for m in models])
    torch.testing.assert_close(tangent, expected)


def test_compiled_forward_equals_eager() -> None:
    torch._dynamo.reset()
    models = make_models(torch.float32)
    batch = ModelBatch(copy.deepcopy(models)).enable_compile()
    x = torch.randn(4, 5)
    out = batch(x)
    out.sum().backward()
    torch.testing.assert_close(out, alone_outputs(models, [x] * N), rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def test_autocast_gives_the_dtype_and_values_of_nn_linear_under_autocast() -> None:
    models = make_models(torch.float32)
    batch = ModelBatch(copy.deepcopy(models))
    x = torch.randn(4, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = batch(x)
        ref = alone_outputs(models, [x] * N)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)


def test_autocast_dtype_of_every_layer_equals_nn_linear_alone() -> None:
    """A Linear whose input already is bfloat16 (an earlier Linear's output under autocast)
    and whose weight is float32: nn.Linear alone casts the weight and bias and returns
    bfloat16. The layer sent that case to vmap's F.linear rule, which adds the float32 bias
    after a bfloat16 bmm: a float32 output (and different values) from the second layer
    on. Checked on the plain path and under an outer vmap (vmap's own rule)."""
    models = make_models(torch.float32)
    batch = ModelBatch(copy.deepcopy(models))
    x = torch.randn(4, 5)
    seen: list[torch.dtype] = []
    for m in batch.stacked.modules():
        if isinstance(m, nn.Linear):
            m.register_forward_hook(lambda mod, a, out: seen.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = batch(x)
        ref = alone_outputs(models, [x] * N)
        outer = vmap(batch)(x.unsqueeze(0).expand(2, 4, 5))
    assert seen[:3] == [torch.bfloat16] * 3
    assert out.dtype == ref.dtype == outer.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(outer[1].float(), ref.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("per_model", [False, True], ids=["shared", "per-model"])
def test_zero_input_features_equals_nn_linear(per_model: bool) -> None:
    """nn.Linear(0, k) returns its bias for each sample; the rule's reshape to [N, -1, 0]
    of an empty input raised "the unspecified dimension size -1 can be any value"."""
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="zero-element"):  # (torch's init of the weight)
        models: list[nn.Module] = [nn.Linear(0, 3).double() for _ in range(N)]
    batch = ModelBatch(copy.deepcopy(models))
    x = torch.zeros(N, 4, 0, dtype=torch.float64) if per_model else torch.zeros(4, 0).double()
    out = batch(x, per_model=per_model)
    torch.testing.assert_close(out, alone_outputs(models, list(x) if per_model else [x] * N))
    out.sum().backward()
    assert batch.stacked.bias.grad is not None
    torch.testing.assert_close(batch.stacked.bias.grad, torch.full((N, 3), 4.0).double())


def test_wrong_dtype_or_width_raises_f_linear_s_own_error() -> None:
    batch = ModelBatch(make_models())
    with pytest.raises(RuntimeError, match=r"dtype|scalar type"):
        batch(torch.randn(4, 5, dtype=torch.float32))
    with pytest.raises(RuntimeError, match=r"\(4, 6\)"):  # the input's shape is named
        batch(torch.randn(4, 6, dtype=torch.float64))


def test_complex_gradients_follow_autograd_s_convention() -> None:
    torch.manual_seed(0)
    models = [nn.Linear(3, 2, dtype=torch.complex128) for _ in range(N)]
    batch = ModelBatch(copy.deepcopy(models))
    x = torch.randn(5, 3, dtype=torch.complex128, requires_grad=True)
    batch(x).abs().sum().backward()
    xs = [x.detach().clone().requires_grad_() for _ in range(N)]
    for m, xi in zip(models, xs, strict=True):
        m(xi).abs().sum().backward()
    for i, m in enumerate(models):
        for name, p in batch.stacked.named_parameters():
            torch.testing.assert_close(p.grad[i], m.get_parameter(name).grad)  # type: ignore[index]
    torch.testing.assert_close(x.grad, sum(xi.grad for xi in xs))  # type: ignore[arg-type]


def test_batched_linear_operator_equals_per_model_linear() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N, 6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(N, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(N, 4, generator=g, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(batched_linear, (x, w, b))
    torch.autograd.gradcheck(lambda x, w: batched_linear(x, w, None), (x, w))
    out = batched_linear(x, w, b)
    torch.testing.assert_close(out, torch.stack([F.linear(x[i], w[i], b[i]) for i in range(N)]))
