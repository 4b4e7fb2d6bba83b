"""Architecture zoo: third-party architectures at tiny sizes, each trained for a few steps
as N=3 models in one ModelBatch and as the same 3 models alone with ``torch.optim``, in
float64 and float32; every parameter and buffer (and the first step's outputs) must agree
within 1e-10 (float64) / 1e-5 (float32) relative. vmap's slow-path fallback is an error
here (tests/conftest.py), so an op that would run once per model in a Python loop fails the
case.

The cases live in the modules listed in :data:`tests.zoo.cases.CASE_MODULES`.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

import modelbatch
from tests.helpers import rel_err
from tests.zoo.cases import Case, all_cases

# torch's own notice when a float32 LSTM with proj_size runs alone on CPU.
pytestmark = pytest.mark.filterwarnings(
    "ignore:LSTM with projections is not supported with oneDNN:UserWarning"
)

N = 3
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
CASES, SKIPPED = all_cases()


def _build(case: Case, seed: int, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(seed)
    model = case.build().to(dtype)
    return model.train(case.train)


def _cast(x: Any, dtype: torch.dtype) -> Any:
    return x.to(dtype) if isinstance(x, Tensor) and x.is_floating_point() else x


def _inputs(case: Case, seed: int, dtype: torch.dtype) -> tuple[Any, ...]:
    g = torch.Generator().manual_seed(seed)
    if not case.per_model:
        return tuple(_cast(x, dtype) for x in case.inputs(g))
    draws = [case.inputs(g) for _ in range(N)]
    return tuple(_cast(torch.stack(parts), dtype) for parts in zip(*draws, strict=True))


def _loss(out: Tensor) -> Tensor:
    """A fixed, generic training signal: squared error to a fixed pseudo-random target."""
    g = torch.Generator().manual_seed(7)
    target = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    return ((out - target) ** 2).mean()


def _optimizer(case: Case, params: Any, batch: modelbatch.ModelBatch | None = None) -> Any:
    if case.optimizer == "adam":
        if batch is not None:
            return modelbatch.optim.Adam(batch, lr=1e-2)
        return torch.optim.Adam(params, lr=1e-2)
    if batch is not None:
        return modelbatch.optim.SGD(batch, lr=0.05, momentum=0.9)
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_zoo_case_trains_as_alone(case: Case, dtype: torch.dtype) -> None:
    tol = TOL[dtype]
    models = [_build(case, seed, dtype) for seed in range(N)]
    alone = [_build(case, seed, dtype) for seed in range(N)]
    batch = modelbatch.ModelBatch(models).train(case.train)
    opt = _optimizer(case, None, batch)
    opts = [_optimizer(case, m.parameters()) for m in alone]
    for step in range(case.steps):
        inputs = _inputs(case, 100 + step, dtype)
        out = case.select(batch(*inputs, per_model=case.per_model, **case.kwargs))
        assert out.shape[0] == N
        loss = sum(_loss(out[i]) for i in range(N))
        opt.zero_grad()
        loss.backward()
        opt.step()
        for i, (m, o) in enumerate(zip(alone, opts, strict=True)):
            xi = tuple(x[i] for x in inputs) if case.per_model else inputs
            out_i = case.select(m(*xi, **case.kwargs))
            if step == 0:
                err = rel_err(out[i], out_i)
                assert err <= tol, f"{case.name}: model {i} output differs by {err:.3g}"
            o.zero_grad()
            _loss(out_i).backward()
            o.step()
    for i, (mb_model, ref) in enumerate(zip(batch.extract_all(), alone, strict=True)):
        ref_state = ref.state_dict()
        for name, value in mb_model.state_dict().items():
            expected = ref_state[name]
            if not value.is_floating_point():
                assert torch.equal(value, expected), f"{case.name} model {i} {name}"
                continue
            # Relative to the tensor's norm, or absolute for tensors near 0: attention key
            # biases start at 0 and have a true gradient of 0 (softmax ignores a shift), so
            # they hold nothing but rounding noise, in a batch and alone.
            diff = (value.double() - expected.double()).norm()
            err = float(diff) / max(float(expected.double().norm()), 1.0)
            assert err <= tol, f"{case.name} model {i} {name}: error {err:.3g} > {tol:g}"


def test_zoo_has_at_least_30_architectures() -> None:
    assert len(CASES) >= 30, [c.name for c in CASES]


@pytest.mark.parametrize("name", sorted(SKIPPED))
def test_zoo_skipped_architectures_say_why(name: str) -> None:
    pytest.skip(SKIPPED[name])
