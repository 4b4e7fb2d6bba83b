"""Batching rules run directly from the layers' forward (``modelbatch.layers._direct``): only
in the plain case, and with exactly the numbers of the operator path they bypass."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad, vmap

import modelbatch.layers._direct as direct
from modelbatch import ModelBatch

N = 3


class ConvNet(nn.Module):
    """conv (bias), BatchNorm, ReLU, conv (no bias), BatchNorm, pooled linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.b1 = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(4, momentum=None)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.b1(self.c1(x)))
        return self.head(self.b2(self.c2(h)).mean((2, 3)))


def models() -> list[nn.Module]:
    torch.manual_seed(0)
    return [ConvNet().double() for _ in range(N)]


def test_plain_level_only_for_the_batch_s_own_vmap() -> None:
    seen: list[int | None] = []
    w = torch.zeros(N, 2)

    def probe(t: Tensor) -> Tensor:
        seen.append(direct.plain_level(t))
        return t.sum()

    probe(w)  # no transform
    vmap(probe)(w)  # the plain case
    vmap(lambda t: vmap(probe)(t.expand(2, 2)).sum())(w)  # nested
    grad(lambda t: vmap(probe)(t).sum())(w)  # grad around
    vmap(lambda t: probe(torch.ones(2)))(w)  # anchor not batched at the level
    assert seen[0] is None and isinstance(seen[1], int)
    assert seen[2:] == [None, None, None]


def step(batch: ModelBatch, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    out = batch(x)
    out.square().sum().backward()
    grads = {k: p.grad.clone() for k, p in batch.stacked.named_parameters()}  # type: ignore[union-attr]
    return out.detach(), grads


@pytest.mark.parametrize("layout", ["default", "channels_last"])
def test_direct_rules_equal_the_operators_bit_for_bit(
    layout: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outputs, gradients and running statistics (two training steps, then eval) are the
    same bits whether the rules run directly or through their operators."""
    x = torch.randn(5, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    fast = ModelBatch(models(), conv_layout=layout)
    slow = ModelBatch(models(), conv_layout=layout)
    calls = {"direct": 0}
    real = direct.call_rule

    def counting(*args: object) -> Tensor:
        calls["direct"] += 1
        return real(*args)  # type: ignore[arg-type]

    for batch, patched in ((fast, False), (slow, True)):
        with monkeypatch.context() as m:
            if patched:
                for mod in ("linear", "batchnorm", "conv"):
                    m.setattr(f"modelbatch.layers.{mod}.plain_level", lambda t: None)
            else:
                for mod in ("linear", "batchnorm", "conv"):
                    m.setattr(f"modelbatch.layers.{mod}.call_rule", counting)
            results = [step(batch, x) for _ in range(2)]
            batch.eval()
            results.append((batch(x).detach(), {}))
        if patched:
            slow_results = results
        else:
            fast_results = results
    convs = 2 if layout == "channels_last" else 0
    assert calls["direct"] == 3 * (2 + 1 + convs)  # per forward: BN x2, linear, convs
    for (a, ga), (b, gb) in zip(fast_results, slow_results, strict=True):
        assert torch.equal(a, b)
        assert ga.keys() == gb.keys() and all(torch.equal(ga[k], gb[k]) for k in ga)
    slow_buffers = dict(slow.stacked.named_buffers())
    for name, u in fast.stacked.named_buffers():
        assert torch.equal(u, slow_buffers[name]), name


def test_outer_vmap_takes_the_operators_and_equals_the_models_alone() -> None:
    alone = models()
    batch = ModelBatch(copy.deepcopy(alone))
    batch.eval()
    for m in alone:
        m.eval()
    xs = torch.randn(2, 5, 3, 6, 6, dtype=torch.float64)
    out = vmap(batch)(xs)
    expected = torch.stack([torch.stack([m(x) for m in alone]) for x in xs])
    torch.testing.assert_close(out, expected)


def test_rule_with_only_the_anchor_batched_gets_the_batch_size() -> None:
    """A BatchNorm without affine or running statistics on a shared input: nothing passed to
    the rule is batched (only ``mb_slot``, the anchor), yet every model gets its output."""
    torch.manual_seed(0)
    ms = [nn.BatchNorm1d(3, affine=False, track_running_stats=False) for _ in range(N)]
    batch = ModelBatch(copy.deepcopy(ms))
    x = torch.randn(4, 3)
    out = batch(x)
    assert out.shape == (N, 4, 3)
    torch.testing.assert_close(out, torch.stack([m(x) for m in ms]))
