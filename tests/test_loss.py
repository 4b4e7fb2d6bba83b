"""compute_loss: the flat path of the known losses equals the general (vmap) path and each
model alone (float64); masks equal training alone on the selected samples for any loss; the
targets rule never guesses; errors name the shapes."""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modelbatch import ModelBatch
from modelbatch.loss import recognise

N, B, C = 3, 6, 4
G = torch.Generator().manual_seed(0)


def _batch(n: int = N) -> ModelBatch:
    torch.manual_seed(0)
    return ModelBatch([nn.Linear(5, C).double() for _ in range(n)])


def _general(loss_fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    """The same loss, hidden from the flat path (runs under vmap)."""
    return lambda o, t: loss_fn(o, t)


W = torch.rand(C, generator=G, dtype=torch.float64) + 0.5


def _ce_targets(shape: tuple[int, ...]) -> Tensor:
    t = torch.randint(0, C, shape, generator=G)
    t.view(-1)[::4] = 2  # some ignored when ignore_index=2
    return t


# name -> (loss_fn, make output [B, ...] -> target maker, output transform)
def _float_targets(out: Tensor) -> Tensor:
    return torch.randn(out.shape, generator=G, dtype=out.dtype)


def _prob_targets(out: Tensor) -> Tensor:
    return torch.rand(out.shape, generator=G, dtype=out.dtype).clamp(0.05, 0.95)


def _class_targets(out: Tensor) -> Tensor:
    return _ce_targets((out.shape[0], *out.shape[2:]))


def _soft_targets(out: Tensor) -> Tensor:
    return torch.softmax(torch.randn(out.shape, generator=G, dtype=out.dtype), 1)


def _sigmoid(o: Tensor) -> Tensor:
    return torch.sigmoid(o)


def _log_softmax(o: Tensor) -> Tensor:
    return torch.log_softmax(o, 1)


LOSSES: dict[
    str, tuple[Callable[..., Tensor], Callable[[Tensor], Tensor], Callable[[Tensor], Tensor] | None]
] = {
    "ce": (F.cross_entropy, _class_targets, None),
    "ce_module_all": (
        nn.CrossEntropyLoss(weight=W, ignore_index=2, label_smoothing=0.1),
        _class_targets,
        None,
    ),
    "ce_weight": (nn.CrossEntropyLoss(weight=W), _class_targets, None),
    "ce_ignore_sum": (nn.CrossEntropyLoss(ignore_index=2, reduction="sum"), _class_targets, None),
    "ce_partial_smooth": (
        functools.partial(F.cross_entropy, label_smoothing=0.2),
        _class_targets,
        None,
    ),
    "ce_soft": (nn.CrossEntropyLoss(weight=W, label_smoothing=0.1), _soft_targets, None),
    "nll_weight_ignore": (nn.NLLLoss(weight=W, ignore_index=2), _class_targets, _log_softmax),
    "mse": (F.mse_loss, _float_targets, None),
    "mse_sum": (nn.MSELoss(reduction="sum"), _float_targets, None),
    "l1": (nn.L1Loss(), _float_targets, None),
    "smooth_l1": (nn.SmoothL1Loss(beta=0.5), _float_targets, None),
    "huber": (nn.HuberLoss(delta=0.7), _float_targets, None),
    "bce_weight": (nn.BCELoss(weight=W), _prob_targets, _sigmoid),
    "bce_logits_pos_weight": (
        nn.BCEWithLogitsLoss(weight=W, pos_weight=W.flip(0)),
        _prob_targets,
        None,
    ),
    "kl_batchmean": (nn.KLDivLoss(reduction="batchmean"), _soft_targets, _log_softmax),
    "soft_margin": (
        nn.SoftMarginLoss(),
        lambda o: torch.randint(0, 2, o.shape, generator=G).to(o.dtype) * 2 - 1,
        None,
    ),
    "poisson_full": (
        nn.PoissonNLLLoss(full=True),
        lambda o: torch.randint(0, 5, o.shape, generator=G).to(o.dtype),
        None,
    ),
    "poisson_rate_partial": (
        functools.partial(F.poisson_nll_loss, log_input=False, reduction="sum"),
        lambda o: torch.randint(0, 5, o.shape, generator=G).to(o.dtype),
        torch.exp,
    ),
    "kl_log_target_sum": (
        functools.partial(F.kl_div, reduction="sum", log_target=True),
        lambda o: torch.log_softmax(torch.randn(o.shape, generator=G, dtype=o.dtype), 1),
        _log_softmax,
    ),
}


def _outputs(spatial: bool, transform: Callable[[Tensor], Tensor] | None) -> Tensor:
    shape = (N, B, C, 3) if spatial else (N, B, C)
    out = torch.randn(shape, generator=G, dtype=torch.float64).requires_grad_()
    return out


def _same(a: Tensor, b: Tensor) -> bool:
    """Equal within 1e-12 (relative to max(1, |b|)); nan where the model alone gets nan (all
    of its selected targets ignored)."""
    return torch.allclose(a, b, rtol=1e-12, atol=1e-12, equal_nan=True)


def _check(name: str, spatial: bool, per_model: bool, mask: Tensor | None) -> None:
    G.manual_seed(zlib.crc32(f"{name}{spatial}{per_model}{mask}".encode()))
    loss_fn, make_target, transform = LOSSES[name]
    assert recognise(loss_fn) is not None, name
    raw = _outputs(spatial, transform)
    out = transform(raw.flatten(0, 1)).view(raw.shape) if transform else raw
    t = torch.stack([make_target(out[0]) for _ in range(N)]) if per_model else make_target(out[0])
    batch = _batch()
    flat = batch.compute_loss(out, t, loss_fn, mask, reduction="none")
    (g_flat,) = torch.autograd.grad(flat.sum(), raw, retain_graph=True)
    error = ""
    try:
        general = batch.compute_loss(out, t, _general(loss_fn), mask, reduction="none")
    except RuntimeError as e:
        error, general = str(e), None
    if general is None:  # losses that vmap cannot run (the flat path can)
        expected = ("masked_select" in error and name == "ce_module_all") or any(
            f"{op} hit the vmap fallback" in error for op in ("kl_div", "soft_margin_loss")
        )
        assert expected, error
    g_gen = (
        g_flat if general is None else torch.autograd.grad(general.sum(), raw, retain_graph=True)[0]
    )
    general = flat if general is None else general
    for i in range(N):
        ti = t[i] if per_model else t
        oi = out[i]
        if mask is not None:
            idx = torch.repeat_interleave(torch.arange(B), mask[i].long())
            oi, ti = oi[idx], ti[idx]
        alone = loss_fn(oi, ti)
        (g_alone,) = torch.autograd.grad(alone, raw, retain_graph=True)
        assert _same(flat[i], alone) and _same(general[i], alone), (name, i)
        assert _same(g_flat[i], g_alone[i]) and _same(g_gen[i], g_alone[i]), (name, i)


@pytest.mark.parametrize("per_model", [False, True])
@pytest.mark.parametrize("name", list(LOSSES))
def test_flat_equals_general_and_alone(name: str, per_model: bool) -> None:
    _check(name, spatial=False, per_model=per_model, mask=None)


@pytest.mark.parametrize("name", ["ce", "ce_module_all", "ce_soft", "nll_weight_ignore", "mse"])
def test_flat_spatial_outputs(name: str) -> None:
    """[N, B, C, d] outputs (class dim 1 per model, e.g. segmentation or [B, C, T] tokens)."""
    _check(name, spatial=True, per_model=False, mask=None)


MASKS = {
    "bool": torch.tensor([[1, 0, 1, 1, 0, 1], [0, 0, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]]).bool(),
    "counts": torch.tensor([[2, 0, 1, 3, 0, 1], [0, 0, 1, 0, 0, 2], [1, 1, 1, 1, 1, 1]]),
}


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize(
    "name",
    [
        "ce",
        "ce_module_all",
        "ce_ignore_sum",
        "ce_soft",
        "nll_weight_ignore",
        "mse_sum",
        "bce_logits_pos_weight",
        "kl_batchmean",
    ],
)
def test_mask_equals_alone_on_selected_samples(name: str, mask: str) -> None:
    _check(name, spatial=name in ("ce_module_all", "mse_sum"), per_model=True, mask=MASKS[mask])


def test_float_counts_equal_integer_counts_and_empty_model_gets_zero() -> None:
    batch = _batch()
    out = torch.randn(N, B, C, generator=G, dtype=torch.float64, requires_grad=True)
    t = _ce_targets((B,))
    counts = MASKS["counts"].clone()
    counts[1] = 0
    loss_fn = nn.CrossEntropyLoss(weight=W, ignore_index=2)
    a = batch.compute_loss(out, t, loss_fn, counts, reduction="none")
    b = batch.compute_loss(out, t, loss_fn, counts.double(), reduction="none")
    assert torch.equal(a, b) and a[1].item() == 0.0
    (g,) = torch.autograd.grad(a.sum(), out)
    assert torch.all(g[1] == 0)


def test_token_level_unknown_loss_with_mask_equals_alone() -> None:
    """[N, B, T, C] outputs, [B, T] targets with padding: a user's loss that flattens tokens
    (mean over non-padded tokens) is applied per model to its own samples."""
    t_len = 5
    out = torch.randn(N, B, t_len, C, generator=G, dtype=torch.float64, requires_grad=True)
    tgt = torch.randint(0, C, (B, t_len), generator=G)
    tgt[:, 3:] = -100

    def token_loss(o: Tensor, t: Tensor) -> Tensor:
        return F.cross_entropy(o.reshape(-1, o.shape[-1]), t.reshape(-1), label_smoothing=0.1)

    mask = MASKS["counts"]
    losses = _batch().compute_loss(out, tgt, token_loss, mask, reduction="none")
    (g,) = torch.autograd.grad(losses.sum(), out)
    for i in range(N):
        idx = torch.repeat_interleave(torch.arange(B), mask[i])
        alone = token_loss(out[i][idx], tgt[idx])
        (ga,) = torch.autograd.grad(alone, out)
        assert abs(losses[i].item() - alone.item()) < 1e-12
        assert torch.allclose(g[i], ga[i], rtol=0, atol=1e-12)


def test_unknown_loss_with_fractional_weights_is_refused() -> None:
    out = torch.randn(N, B, C, dtype=torch.float64)
    with pytest.raises(ValueError, match="fractional or negative weights cannot be applied"):
        _batch().compute_loss(out, _ce_targets((B,)), _general(F.cross_entropy), torch.rand(N, B))


def test_known_loss_with_fractional_weights_weights_each_sample() -> None:
    out = torch.randn(N, B, C, dtype=torch.float64)
    t = torch.randint(0, C, (B,), generator=G)
    w = torch.rand(N, B, generator=G, dtype=torch.float64)
    losses = _batch().compute_loss(out, t, F.cross_entropy, w, reduction="none")
    per = torch.stack([F.cross_entropy(out[i], t, reduction="none") for i in range(N)])
    assert torch.allclose(losses, (per * w).sum(1) / w.sum(1), rtol=1e-13, atol=0)


# ---------------------------------------------------------------------------- targets rule
def test_ambiguous_targets_are_an_error_and_explicit_choice_works() -> None:
    batch = _batch(4)
    out = torch.randn(4, 4, C, dtype=torch.float64)  # N = B = 4
    y = torch.randint(0, C, (4, 4), generator=G)
    with pytest.raises(
        ValueError,
        match=r"ambiguous targets: shape \[4, 4\] reads both as shared "
        r"\[B, \.\.\.\] targets and as per-model \[N, B, \.\.\.\] targets, since "
        r"N = B = 4 .*Pass per_model_targets=True",
    ):
        batch.compute_loss(out, y, F.cross_entropy)
    pm = batch.compute_loss(out, y, F.cross_entropy, per_model_targets=True, reduction="none")
    assert torch.allclose(pm, torch.stack([F.cross_entropy(out[i], y[i]) for i in range(4)]))
    # Binary labels [N, B] for [N, B] logits (the case the old rule read as shared): only the
    # per-model reading gives targets of the outputs' rank.
    logits = torch.randn(4, 4, dtype=torch.float64)
    labels = torch.randint(0, 2, (4, 4), generator=G).double()
    got = batch.compute_loss(logits, labels, F.binary_cross_entropy_with_logits, reduction="none")
    expect = [F.binary_cross_entropy_with_logits(logits[i], labels[i]) for i in range(4)]
    assert torch.allclose(got, torch.stack(expect), rtol=1e-13, atol=0)
    # Shared [B, C] and per-model [N, B, C] soft targets: the rank decides too.
    soft = torch.softmax(torch.randn(4, 4, C, dtype=torch.float64), -1)
    got = batch.compute_loss(out, soft, F.cross_entropy, reduction="none")
    expect = [F.cross_entropy(out[i], soft[i]) for i in range(4)]
    assert torch.allclose(got, torch.stack(expect), rtol=1e-13, atol=0)
    # Unambiguous shapes need no argument.
    batch.compute_loss(out, y[0], F.cross_entropy)  # [B]: shared
    batch3 = _batch(3)
    batch3.compute_loss(torch.randn(3, 4, C, dtype=torch.float64), y[:3], F.cross_entropy)


def test_targets_that_fit_neither_reading_say_what_was_expected() -> None:
    out = torch.randn(N, B, C, dtype=torch.float64)
    with pytest.raises(
        ValueError,
        match=r"targets of shape \[5\] fit neither \[B, \.\.\.\] = "
        r"\[6, \.\.\.\] shared nor \[N, B, \.\.\.\] = \[3, 6, \.\.\.\] per model",
    ):
        _batch().compute_loss(out, torch.zeros(5, dtype=torch.long), F.cross_entropy)
    with pytest.raises(
        ValueError,
        match=r"per_model_targets=True expects targets \[N, B, \.\.\.\]"
        r" with N=3 models, got shape \[6\]",
    ):
        _batch().compute_loss(
            out, torch.zeros(6, dtype=torch.long), F.cross_entropy, per_model_targets=True
        )


def test_loss_fn_error_names_what_one_model_was_given() -> None:
    out = torch.randn(N, B, C, dtype=torch.float64)
    y = torch.zeros(B, 2)  # float [B, 2] targets for [B, C=4] logits
    with pytest.raises(
        AssertionError,
        match=r"loss_fn raised this on one model's output \[6, 4\] and "
        r"targets \[6, 2\]: the targets \[6, 2\] were read as shared \[B, \.\.\.\]",
    ):
        _batch().compute_loss(out, y.double(), F.cross_entropy)


# ---------------------------------------------------------------------------- kernels
def test_flat_loss_phase_is_one_loss_call_plus_reduction_and_independent_of_n() -> None:
    from modelbatch.bench.profile import KernelCounter

    def count(n: int, loss_fn: Callable[[Tensor, Tensor], Tensor]) -> int:
        batch = _batch(n)
        out = torch.randn(n, 32, C, requires_grad=True)
        y = torch.randint(0, C, (32,))
        with KernelCounter() as k:
            batch.compute_loss(out, y, loss_fn).backward()
        return k.total

    def one_call() -> int:  # the recipe: one cross-entropy over all models' samples
        out = torch.randn(N, 32, C, requires_grad=True)
        y = torch.randint(0, C, (32,))
        with KernelCounter() as k:
            (N * F.cross_entropy(out.flatten(0, 1), y.repeat(N))).backward()
        return k.total

    flat = count(N, F.cross_entropy)
    assert flat == count(64, F.cross_entropy)
    # One loss call over all N*B samples, plus the per-model reduction: the count of the
    # non-ignored targets (ne, sum), the [N] sums and the division, and in backward the
    # division and one copy of the expanded gradient (all [N]- or [B]-sized).
    assert flat <= one_call() + 5
    assert flat < count(N, _general(F.cross_entropy))


@pytest.mark.parametrize("name", ["ce", "ce_module_all", "mse", "bce_logits_pos_weight"])
def test_float32_flat_equals_alone(name: str) -> None:
    loss_fn, make_target, _ = LOSSES[name]
    if isinstance(loss_fn, nn.Module):
        loss_fn = type(loss_fn)(  # the same options with float32 weights
            **{
                k: (v.float() if isinstance(v, Tensor) else v)
                for k, v in _module_options(loss_fn).items()
            }
        )
    out = torch.randn(N, B, C, generator=G).requires_grad_()
    t = make_target(out[0].detach().double())
    t = t.float() if t.is_floating_point() else t
    losses = _batch().compute_loss(out, t, loss_fn, reduction="none")
    (g,) = torch.autograd.grad(losses.sum(), out)
    for i in range(N):
        alone = loss_fn(out[i], t)
        (ga,) = torch.autograd.grad(alone, out)
        assert abs(losses[i].item() - alone.item()) <= 1e-5 * max(1.0, abs(alone.item()))
        assert torch.allclose(g[i], ga[i], rtol=1e-5, atol=1e-7)


def _module_options(loss: nn.Module) -> dict[str, object]:
    names = ("weight", "pos_weight", "ignore_index", "label_smoothing", "reduction")
    return {k: getattr(loss, k) for k in names if hasattr(loss, k)}


def test_selected_samples_all_ignored_give_nan_as_alone() -> None:
    out = torch.randn(N, B, C, dtype=torch.float64)
    t = torch.tensor([0, 2, 2, 1, 3, 2])
    mask = torch.zeros(N, B, dtype=torch.bool)
    mask[0, [1, 2]] = True  # only ignored targets
    mask[1, [0, 1]] = True
    ce = nn.CrossEntropyLoss(ignore_index=2)
    losses = _batch().compute_loss(out, t, ce, mask, reduction="none")
    assert torch.isnan(ce(out[0][mask[0]], t[mask[0]])) and torch.isnan(losses[0])
    assert _same(losses[1], ce(out[1][mask[1]], t[mask[1]])) and losses[2] == 0


def _hooked_ce() -> nn.Module:
    loss = nn.CrossEntropyLoss()
    loss.register_forward_hook(lambda module, args, out: out * 3)
    return loss


def _pre_hooked_ce() -> nn.Module:
    loss = nn.CrossEntropyLoss()
    loss.register_forward_pre_hook(lambda module, args: (args[0] * 2, args[1]))
    return loss


def _forward_replaced_ce() -> nn.Module:
    loss = nn.CrossEntropyLoss()
    loss.forward = lambda o, t: F.cross_entropy(o, t) * 5  # type: ignore[method-assign]
    return loss


@pytest.mark.parametrize("make", [_hooked_ce, _pre_hooked_ce, _forward_replaced_ce])
@pytest.mark.parametrize("masked", [False, True])
def test_a_loss_module_with_hooks_or_its_own_forward_is_called_as_it_is(
    make: Callable[[], nn.Module], masked: bool
) -> None:
    """A known loss module whose call does something else (hooks, a forward set on the
    instance) must not take the flat path, which would skip that: each model's loss is what
    the module returns alone."""
    batch = _batch()
    loss_fn = make()
    assert recognise(loss_fn) is None
    out = torch.randn(N, B, C, dtype=torch.float64, generator=G)
    tgt = torch.randint(0, C, (N, B), generator=G)
    mask = torch.tensor([[1, 0, 2, 1, 0, 1]] * N) if masked else None
    got = batch.compute_loss(out, tgt, loss_fn, mask=mask, reduction="none")
    for i in range(N):
        idx = torch.arange(B) if mask is None else torch.repeat_interleave(torch.arange(B), mask[i])
        expected = loss_fn(out[i][idx], tgt[i][idx])
        assert torch.allclose(got[i], expected, rtol=1e-12, atol=0), (i, got[i], expected)


@pytest.mark.parametrize(
    ("loss_fn", "kind"),
    [
        (F.mse_loss, "nan"),
        (nn.HuberLoss(reduction="sum"), "nan"),
        (nn.CrossEntropyLoss(weight=torch.rand(C, dtype=torch.float64, generator=G)), "label"),
        (nn.CrossEntropyLoss(label_smoothing=0.1), "label"),
        (nn.NLLLoss(ignore_index=2), "label"),
        (nn.CrossEntropyLoss(), "nan-output"),
    ],
)
def test_a_sample_outside_a_models_selection_does_not_reach_its_loss(
    loss_fn: Callable[[Tensor, Tensor], Tensor], kind: str
) -> None:
    """Model i's masked loss is the loss on its selected samples alone: a NaN target, an
    unlabelled sample (label -1, not the ignore_index) or a non-finite output on a sample
    it does not select must not reach its loss or gradient (the flat path multiplied them
    by 0: NaN, or an out-of-bounds error)."""
    batch = _batch()
    out = torch.randn(N, B, C, dtype=torch.float64, generator=G)
    if kind == "nan":
        tgt = torch.randn(B, C, dtype=torch.float64, generator=G)
        tgt[0, 1] = float("nan")
    else:
        tgt = torch.randint(0, C, (B,), generator=G)
        if kind == "label":
            tgt[0] = -1
        else:
            out[1, 0, 2] = float("inf")
    mask = torch.ones(N, B, dtype=torch.bool)
    mask[1:, 0] = False  # models 1 and 2 do not select sample 0
    mask[0, 0] = kind == "nan-output"  # model 0 selects it only where it is finite
    out.requires_grad_(True)
    losses = batch.compute_loss(out, tgt, loss_fn, mask=mask, reduction="none")
    losses.sum().backward()
    assert out.grad is not None
    for i in range(N):
        idx = mask[i].nonzero().flatten()
        o = out.detach()[i][idx].requires_grad_(True)
        expected = loss_fn(o, tgt[idx])
        expected.backward()
        assert torch.allclose(losses[i], expected, rtol=1e-12, atol=0), (i, losses[i], expected)
        assert torch.equal(out.grad[i][~mask[i]], torch.zeros_like(out.grad[i][~mask[i]]))
        assert torch.allclose(out.grad[i][idx], o.grad, rtol=1e-12, atol=1e-15), i
