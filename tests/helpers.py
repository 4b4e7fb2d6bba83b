"""Reference training for equivalence tests: the same models trained one by one with
plain ``torch.optim``. Tolerances live here, in one place."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

# Relative tolerances for "trained in a ModelBatch" vs "trained alone".
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def rel_err(a: Tensor, b: Tensor) -> float:
    """||a - b|| / max(||b||, tiny), in float64."""
    a64, b64 = a.detach().double(), b.detach().double()
    return float((a64 - b64).norm() / b64.norm().clamp_min(1e-30))


def assert_close_models(
    batched: Sequence[nn.Module], alone: Sequence[nn.Module], dtype: torch.dtype, what: str = ""
) -> None:
    """Every parameter and floating buffer of ``batched[i]`` equals ``alone[i]``'s."""
    tol = TOL[dtype]
    for i, (mb_model, ref) in enumerate(zip(batched, alone, strict=True)):
        ref_state = ref.state_dict()
        for name, value in mb_model.state_dict().items():
            expected = ref_state[name]
            if not value.is_floating_point():
                assert torch.equal(value, expected), f"{what} model {i} {name}"
                continue
            err = rel_err(value, expected)
            assert err <= tol, f"{what} model {i} {name}: relative error {err:.3g} > {tol:g}"


def train_alone(
    models: Sequence[nn.Module],
    make_optimizer: Callable[[int, nn.Module], torch.optim.Optimizer],
    data: Sequence[tuple[Tensor, Tensor]],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    make_scheduler: Callable[[int, torch.optim.Optimizer], object] | None = None,
) -> list[nn.Module]:
    """Train a deep copy of each model on its own with ``make_optimizer(i, model)``.

    ``data`` is a list of ``(x, y)``; ``x`` may be ``[B, ...]`` (shared) or a list with
    one tensor per model.
    """
    out = []
    for i, model in enumerate(models):
        m = copy.deepcopy(model)
        opt = make_optimizer(i, m)
        sched = make_scheduler(i, opt) if make_scheduler is not None else None
        for x, y in data:
            xi = x[i] if isinstance(x, (list, tuple)) else x
            yi = y[i] if isinstance(y, (list, tuple)) else y
            opt.zero_grad()
            loss_fn(m(xi), yi).backward()
            opt.step()
            if sched is not None:
                sched.step()  # type: ignore[attr-defined]
        out.append(m)
    return out
