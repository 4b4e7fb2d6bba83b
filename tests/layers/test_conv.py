"""Channels_last convolutions (``conv_layout="channels_last"``): the ``modelbatch::conv2d``
operator and its vmap rule equal ``F.conv2d`` (forward and backward), and a ResNet-like
batch trains exactly like the same models trained alone with ``torch.optim``."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vmap

import modelbatch
from modelbatch import ModelBatch
from modelbatch.layers.conv import VmapConv2d, conv2d
from tests.helpers import TOL, assert_close_models, rel_err, train_alone

N = 3
B = 4


class Block(nn.Module):
    """conv-bn-relu, conv(groups=2)-bn, a strided 1x1 shortcut conv with bias, residual add."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, groups=2, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class TinyResNet(nn.Module):
    """A stem conv (shared input), one residual block with stride 2, a biased grouped conv
    with dilation (no BatchNorm after it), and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.block = Block(4, 8, 2)
        self.mix = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2)
        self.head = nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn(self.stem(x)))
        h = self.block(h)
        h = F.relu(self.mix(h))
        return self.head(h.mean((2, 3)))


def make_models(dtype: torch.dtype = torch.float64) -> list[nn.Module]:
    torch.manual_seed(0)
    return [TinyResNet().to(dtype) for _ in range(N)]


def make_data(per_model: bool, dtype: torch.dtype, steps: int = 3) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1)
    shape = (N, B, 3, 8, 8) if per_model else (B, 3, 8, 8)
    y_shape = (N, B) if per_model else (B,)
    return [
        (torch.randn(*shape, generator=g, dtype=dtype), torch.randint(0, 5, y_shape, generator=g))
        for _ in range(steps)
    ]


# ---------------------------------------------------------------- the operator
CONV_CASES = {
    "plain": dict(stride=[1, 1], padding=[1, 1], dilation=[1, 1], groups=1),
    "strided": dict(stride=[2, 1], padding=[0, 1], dilation=[1, 1], groups=1),
    "groups_dilation": dict(stride=[1, 1], padding=[2, 2], dilation=[2, 2], groups=2),
}


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_operator_outside_vmap_is_conv2d(case: str) -> None:
    kw = CONV_CASES[case]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 6, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(
        6, 4 // kw["groups"], 3, 3, generator=g, dtype=torch.float64, requires_grad=True
    )
    b = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    args = (kw["stride"], kw["padding"], kw["dilation"], kw["groups"])
    out = conv2d(x, w, b, *args)
    ref = F.conv2d(x, w, b, *args)
    assert torch.equal(out, ref)
    grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(out, (x, w, b), grad_out)
    want = torch.autograd.grad(ref, (x, w, b), grad_out)
    for a, e in zip(got, want, strict=True):
        assert rel_err(a, e) <= 1e-12
    # No bias, and only some inputs needing gradients.
    got_w = torch.autograd.grad(conv2d(x.detach(), w, None, *args).sum(), w)[0]
    assert (
        rel_err(got_w, torch.autograd.grad(F.conv2d(x.detach(), w, None, *args).sum(), w)[0])
        <= 1e-12
    )


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", list(CONV_CASES))
@pytest.mark.parametrize("x_dim", [0, 1, None])  # batched at dim 0, at dim 1, shared
def test_vmap_rule_matches_vmap_of_conv2d(x_dim: int | None, case: str, bias: bool) -> None:
    """Forward and the gradients of ``.backward()`` taken outside vmap: the rule's plain ops
    are what autograd records."""
    kw = CONV_CASES[case]
    g = torch.Generator().manual_seed(0)
    x_shape = {0: (N, 2, 4, 6, 6), 1: (2, N, 4, 6, 6), None: (2, 4, 6, 6)}[x_dim]
    x = torch.randn(*x_shape, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(
        N, 6, 4 // kw["groups"], 3, 3, generator=g, dtype=torch.float64, requires_grad=True
    )
    b = torch.randn(N, 6, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    args = (kw["stride"], kw["padding"], kw["dilation"], kw["groups"])
    in_dims = (x_dim, 0, 0 if bias else None)
    out = vmap(lambda x_, w_, b_: conv2d(x_, w_, b_, *args), in_dims=in_dims)(x, w, b)
    ref = vmap(lambda x_, w_, b_: F.conv2d(x_, w_, b_, *args), in_dims=in_dims)(x, w, b)
    assert rel_err(out, ref) <= 1e-12
    # The output is a [N, B, ...] view of a channels_last [B, N*Cout, H, W] tensor.
    assert out.permute(1, 0, 2, 3, 4).flatten(1, 2).is_contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    inputs = (x, w) if b is None else (x, w, b)
    got = torch.autograd.grad(out, inputs, grad_out)
    want = torch.autograd.grad(ref, inputs, grad_out)
    for a, e in zip(got, want, strict=True):
        assert rel_err(a, e) <= 1e-12


def test_vmap_rule_with_a_shared_weight() -> None:
    """Not produced by a ModelBatch, but the rule must still be right: unbatched weight."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 2, 4, 5, 5, generator=g, dtype=torch.float64)
    w = torch.randn(6, 4, 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(N, 6, generator=g, dtype=torch.float64)
    args = ([1, 1], [1, 1], [1, 1], 1)
    out = vmap(lambda x_, b_: conv2d(x_, w, b_, *args))(x, b)
    ref = vmap(lambda x_, b_: F.conv2d(x_, w, b_, *args))(x, b)
    assert rel_err(out, ref) <= 1e-12


@pytest.mark.parametrize(
    "options",
    [
        dict(padding="same"),
        pytest.param(
            dict(padding="same", kernel_size=(2, 4), dilation=(1, 3)),
            marks=pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel"),
        ),
        dict(padding="valid", stride=2),
        dict(padding=1, padding_mode="reflect"),
        dict(padding=(1, 2), padding_mode="circular"),
        dict(padding=1, padding_mode="replicate", groups=2),
    ],
    ids=["same", "same_even", "valid", "reflect", "circular", "replicate"],
)
def test_vmap_conv2d_module_equals_nn_conv2d(options: dict[str, object]) -> None:
    kw: dict[str, object] = {"kernel_size": 3, **options}
    torch.manual_seed(0)
    convs = [nn.Conv2d(4, 6, **kw).double() for _ in range(N)]  # type: ignore[arg-type]
    x = torch.randn(B, 4, 7, 7, dtype=torch.float64)
    # Alone: the substituted class is still a correct single module.
    alone = copy.deepcopy(convs[0])
    alone.__class__ = VmapConv2d
    assert rel_err(alone(x), convs[0](x)) <= 1e-12
    batch = ModelBatch([nn.Sequential(c) for c in convs], conv_layout="channels_last")
    assert type(batch.stacked[0]) is VmapConv2d
    out = batch(x)
    for i, c in enumerate(convs):
        assert rel_err(out[i], c(x)) <= 1e-12


# ---------------------------------------------------------------- training in a ModelBatch
def _train_batch(
    models: list[nn.Module], opt_name: str, data: list[tuple[Tensor, Tensor]], per_model: bool
) -> ModelBatch:
    batch = ModelBatch(copy.deepcopy(models), conv_layout="channels_last")
    if opt_name == "sgd":
        opt: torch.optim.Optimizer = modelbatch.optim.SGD(batch, lr=0.1, momentum=0.9)
    else:
        opt = modelbatch.optim.AdamW(batch, lr=1e-2, weight_decay=0.1)
    for x, y in data:
        loss = batch.compute_loss(
            batch(x, per_model=per_model), y, F.cross_entropy, per_model_targets=per_model
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    return batch


def _reference(
    models: list[nn.Module], opt_name: str, data: list[tuple[Tensor, Tensor]], per_model: bool
) -> list[nn.Module]:
    if opt_name == "sgd":

        def make(i: int, m: nn.Module) -> torch.optim.Optimizer:
            return torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    else:

        def make(i: int, m: nn.Module) -> torch.optim.Optimizer:
            return torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)

    if per_model:
        data = [(list(x), list(y)) for x, y in data]  # type: ignore[misc]
    return train_alone(models, make, data, F.cross_entropy)


@pytest.mark.parametrize("per_model", [False, True], ids=["shared_input", "per_model_input"])
@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_float64_training_equals_training_alone(opt_name: str, per_model: bool) -> None:
    models = make_models()
    data = make_data(per_model, torch.float64)
    batch = _train_batch(models, opt_name, data, per_model)
    assert type(batch.stacked.block.conv2) is VmapConv2d
    ref = _reference(models, opt_name, data, per_model)
    extracted = batch.extract_all()
    assert type(extracted[0].block.conv2) is nn.Conv2d  # users get plain modules back
    assert_close_models(extracted, ref, torch.float64, f"{opt_name}")
    batch.eval()
    x = data[0][0]
    out = batch(x, per_model=per_model)
    for i, m in enumerate(ref):
        m.eval()
        assert rel_err(out[i], m(x[i] if per_model else x)) <= TOL[torch.float64]


def test_float32_training_equals_training_alone() -> None:
    models = make_models(torch.float32)
    data = make_data(False, torch.float32)
    batch = _train_batch(models, "adamw", data, per_model=False)
    ref = _reference(models, "adamw", data, per_model=False)
    assert_close_models(batch.extract_all(), ref, torch.float32, "adamw float32")


def test_bf16_autocast_matches_models_alone_under_autocast() -> None:
    """Under bf16 autocast the batch follows each model run alone under autocast (a
    convolution with its bias in bf16), up to bf16 rounding."""
    models = make_models(torch.float32)
    x, y = make_data(False, torch.float32, steps=1)[0]
    batch = ModelBatch(copy.deepcopy(models), conv_layout="channels_last")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = batch(x)
        loss = batch.compute_loss(out, y, F.cross_entropy)
    loss.backward()
    grads = {name: p.grad for name, p in batch.stacked_parameters()}
    for i, m in enumerate(copy.deepcopy(models)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref = m(x)
            F.cross_entropy(ref, y).backward()
        assert rel_err(out[i], ref) <= 1e-2
        for name, p in m.named_parameters():
            grad = grads[name]
            assert grad is not None and grad.dtype == torch.float32
            assert rel_err(grad[i], p.grad) <= 3e-2, f"model {i} {name}"  # type: ignore[arg-type]


def test_bf16_autocast_conv_output_is_bf16() -> None:
    torch.manual_seed(0)
    convs = [nn.Conv2d(3, 4, 3) for _ in range(N)]
    batch = ModelBatch([nn.Sequential(c) for c in convs], conv_layout="channels_last")
    x = torch.randn(B, 3, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        shared = batch(x)
        per_model = batch(x.expand(N, *x.shape), per_model=True)
        refs = [c(x) for c in convs]
    assert shared.dtype == per_model.dtype == refs[0].dtype == torch.bfloat16
    for i, ref in enumerate(refs):
        assert rel_err(shared[i], ref) <= 1e-2
        assert rel_err(per_model[i], ref) <= 1e-2


@pytest.mark.parametrize("layout", ["default", "channels_last"])
def test_meta_device_forward_gives_the_shapes(layout: str) -> None:
    """A batch on the ``meta`` device (shapes without data, as nn.Conv2d and nn.Linear
    allow): the layers asked torch whether autocast was enabled on ``meta``, which raises
    "unknown device type for autocast" (the batched Linear too, on every layout)."""
    models = [
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(64, 2)).to("meta")
        for _ in range(3)
    ]
    batch = ModelBatch(models, conv_layout=layout)
    out = batch(torch.empty(2, 3, 6, 6, device="meta"))
    assert out.shape == (3, 2, 2) and out.device.type == "meta"


def test_default_layout_keeps_vmap_s_convolution_and_bad_layout_is_refused() -> None:
    """Default layout: vmap's own convolution (only autocast's casts added), and extract
    still gives nn.Conv2d."""
    from modelbatch.layers.conv import AutocastConv2d

    models = make_models()
    batch = ModelBatch(models)
    assert type(batch.stacked.stem) is AutocastConv2d
    assert type(batch.extract(0).stem) is nn.Conv2d
    with pytest.raises(ValueError, match="conv_layout"):
        ModelBatch(models, conv_layout="nhwc")


# ---------------------------------------------------------------- views and unbatched inputs
class ViewFlatten(nn.Module):
    """A flatten written as ``x.view(x.size(0), -1)`` after channels_last convolutions."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv2(F.relu(self.bn(self.conv(x))))
        return self.fc(h.view(h.size(0), -1))


class Unbatched(nn.Module):
    """Convolutions on one unbatched ``[C, H, W]`` image."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 2, 3, groups=2)
        self.fc = nn.Linear(2 * 6 * 6, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(F.relu(self.conv2(F.relu(self.conv(x)))).view(-1))


@pytest.mark.parametrize("per_model", [False, True], ids=["shared_input", "per_model_input"])
@pytest.mark.parametrize("arch", ["view_flatten", "unbatched"])
def test_view_flatten_and_unbatched_input_train_as_alone(arch: str, per_model: bool) -> None:
    torch.manual_seed(0)
    cls = ViewFlatten if arch == "view_flatten" else Unbatched
    models = [cls().double() for _ in range(N)]
    g = torch.Generator().manual_seed(3)
    shape = (B, 3, 8, 8) if arch == "view_flatten" else (3, 8, 8)
    xs = [torch.randn(N, *shape, generator=g, dtype=torch.float64) for _ in range(3)]
    ys = [torch.randn(N, 5, generator=g, dtype=torch.float64) for _ in range(3)]
    if arch == "view_flatten":
        ys = [y.unsqueeze(1).expand(N, B, 5) for y in ys]

    def loss_fn(out: Tensor, y: Tensor) -> Tensor:
        return F.mse_loss(out, y)

    batch = ModelBatch(models, conv_layout="channels_last")
    opt = modelbatch.optim.SGD(batch, lr=0.1, momentum=0.9)
    for x, y in zip(xs, ys, strict=True):
        out = batch(x if per_model else x[0], per_model=per_model)
        loss = batch.compute_loss(out, y, loss_fn, per_model_targets=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
    data = [
        ([x[i] if per_model else x[0] for i in range(N)], list(y))
        for x, y in zip(xs, ys, strict=True)
    ]
    ref = train_alone(
        models, lambda i, m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), data, loss_fn
    )
    assert_close_models(batch.extract_all(), ref, torch.float64, arch)


def test_channels_last_views_fall_back_to_reshape_only_when_needed() -> None:
    from modelbatch.layers.conv import ChannelsLastViews

    x = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    y = torch.randn(2, 3, 4, 5)
    with ChannelsLastViews():
        for shape in ((2, -1), ((2, -1),), (torch.Size([2, 60]),)):
            assert torch.equal(x.view(*shape), x.reshape(2, 60))
        v = y.view(2, -1)  # possible as a view: still one
        assert v.data_ptr() == y.data_ptr()
        with pytest.raises(RuntimeError, match="shape"):
            x.view(7, -1)  # impossible shapes still fail
    with pytest.raises(RuntimeError, match="view size is not compatible"):
        x.view(2, -1)  # outside the batch's forward: torch's own behaviour


@pytest.mark.parametrize(
    ("make", "shape"),
    [
        (lambda: nn.Conv1d(3, 4, 3, padding=1), (2, 3, 7)),
        (lambda: nn.Conv2d(3, 4, 3, padding=1), (2, 3, 6, 6)),
        (lambda: nn.Conv3d(3, 4, 3, padding=1), (2, 3, 4, 4, 4)),
        (lambda: nn.ConvTranspose1d(3, 4, 3, stride=2), (2, 3, 5)),
        (lambda: nn.ConvTranspose2d(3, 4, 3, stride=2, output_padding=1), (2, 3, 5, 5)),
        (lambda: nn.ConvTranspose3d(3, 4, 3), (2, 3, 3, 3, 3)),
    ],
    ids=["conv1d", "conv2d", "conv3d", "convT1d", "convT2d", "convT3d"],
)
@pytest.mark.parametrize("layout", ["default", "channels_last"])
def test_cpu_autocast_convolutions_run_in_the_dtype_of_the_model_alone(
    make: Any, shape: tuple[int, ...], layout: str
) -> None:
    """Under vmap a convolution reaches CPU autocast as ``aten::convolution``, which it does
    not list: without the layers' own casts it ran in float32 where alone it runs in
    bfloat16. Values within bfloat16 rounding of the models alone; without autocast, exact."""
    torch.manual_seed(0)
    models = [nn.Sequential(make(), nn.ReLU()) for _ in range(N)]
    batch = ModelBatch(copy.deepcopy(models), conv_layout=layout)
    x = torch.randn(*shape)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = batch(x)
        ref = torch.stack([m(x) for m in models])
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=3e-2)
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == p.dtype for p in batch.parameters())
    plain = batch(x)
    assert plain.dtype == torch.float32
    torch.testing.assert_close(plain, torch.stack([m(x) for m in models]), rtol=1e-5, atol=1e-6)
