"""CheckpointManager: save every k steps, keep K versions, resume the latest exactly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modelbatch import CheckpointError, CheckpointManager, ModelBatch, seeded_models
from modelbatch.optim import Adam


def build(seed: int) -> tuple[ModelBatch, Any, Any]:
    def make() -> nn.Module:
        return nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.2), nn.Linear(4, 2)).double()

    batch = ModelBatch(seeded_models(make, [seed, seed + 1]), seeds=[seed, seed + 1])
    opt = Adam(batch, lr=[0.01, 0.03])
    return batch, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)


def train(
    manager: CheckpointManager | None, objs: tuple[ModelBatch, Any, Any], steps: range
) -> None:
    batch, opt, sched = objs
    for step in steps:
        x = torch.randn(5, 3, dtype=torch.float64)
        y = torch.randint(0, 2, (5,))
        opt.zero_grad()
        batch.compute_loss(batch(x), y, F.cross_entropy).backward()
        opt.step()
        sched.step()
        if manager is not None:
            manager.save(batch, step, optimizer=opt, scheduler=sched)


def test_save_every_keep_and_resume(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "run", every=2, keep=2)
    fresh = build(10)
    assert manager.restore(fresh[0], optimizer=fresh[1], scheduler=fresh[2]) is None
    assert manager.latest_step() is None and manager.steps() == []

    torch.manual_seed(0)
    straight = build(0)
    train(manager, straight, range(7))  # saves at steps 0, 2, 4, 6
    assert manager.steps() == [4, 6]
    train(None, straight, range(7, 10))

    # A new process: same manager folder, other initial weights and RNG state.
    torch.manual_seed(123)
    resumed = build(50)
    info = CheckpointManager(tmp_path / "run", every=2, keep=2).restore(
        resumed[0], optimizer=resumed[1], scheduler=resumed[2]
    )
    assert info is not None and info["step"] == 6
    train(None, resumed, range(info["step"] + 1, 10))
    for (name, a), b in zip(
        straight[0].state_dict().items(), resumed[0].state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    assert straight[2].state_dict() == resumed[2].state_dict()

    assert manager.save(straight[0], 11) is None  # not a multiple of every
    assert manager.save(straight[0], 11, force=True) is not None
    assert manager.steps() == [6, 11]


def test_restore_after_a_first_save_killed_before_its_commit(tmp_path: Path) -> None:
    """No ``latest.json``: nothing was committed, the run starts afresh (and its first save
    removes the uncommitted version), while ``load_all`` says there is no checkpoint."""
    manager = CheckpointManager(tmp_path / "run", keep=1)
    batch = build(0)[0]
    manager.save(batch, 0)
    (tmp_path / "run" / "latest.json").unlink()  # the state right before the first commit
    assert manager.restore(batch) is None and manager.steps() == []
    with pytest.raises(CheckpointError, match=r"latest\.json is missing"):
        batch.load_all(tmp_path / "run")
    manager.save(batch, 1)
    assert manager.steps() == [1]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        ".lock",
        "latest.json",
        "v00000002",
    ]
    with pytest.raises(ValueError, match="every must be a positive int"):
        CheckpointManager(tmp_path, every=0)
