"""Vectorised SGD details that the equivalence suite does not reach: per-model momentum
switched on mid-training (a momentum warm-up), exactly as torch.optim.SGD per model."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import modelbatch
from tests.helpers import assert_close_models


def test_momentum_switched_on_mid_training_starts_from_the_raw_gradient() -> None:
    """Model 1 trains without momentum for 2 steps, then with 0.9; model 2 switches at step
    3; model 0 has momentum from the start. torch.optim.SGD creates a model's buffer from
    the raw gradient at its first step with momentum: so must the batch."""
    dtype = torch.float64
    torch.manual_seed(0)
    models = [
        nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype) for _ in range(3)
    ]
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(8, 5, generator=g, dtype=dtype), torch.randint(0, 3, (8,), generator=g))
            for _ in range(6)]  # fmt: skip
    schedule = {0: [0.9, 0.0, 0.0], 2: [0.9, 0.9, 0.0], 3: [0.9, 0.9, 0.5]}

    batch = modelbatch.ModelBatch([copy.deepcopy(m) for m in models])
    opt = modelbatch.optim.SGD(batch, lr=0.1, momentum=schedule[0], dampening=[0.0, 0.1, 0.2])
    for k, (x, y) in enumerate(data):
        for i, mom in enumerate(schedule.get(k, [])):
            opt.param_groups[i]["momentum"] = mom
        opt.zero_grad()
        batch.compute_loss(batch(x), y, F.cross_entropy).backward()
        opt.step()

    expected = []
    for i, m in enumerate(models):
        ref = copy.deepcopy(m)
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=schedule[0][i],
                                  dampening=[0.0, 0.1, 0.2][i])  # fmt: skip
        for k, (x, y) in enumerate(data):
            if k in schedule:
                ref_opt.param_groups[0]["momentum"] = schedule[k][i]
            ref_opt.zero_grad()
            F.cross_entropy(ref(x), y).backward()
            ref_opt.step()
        expected.append(ref)
    assert_close_models(batch.extract_all(), expected, dtype, "momentum warm-up")
    started = opt.state["0.weight"]["momentum_started"]
    assert started.tolist() == [1.0, 1.0, 1.0]
