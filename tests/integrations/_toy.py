"""Tiny data and models shared by the sweep, Optuna and Ray Tune tests.

Module-level (importable) so that Ray workers can unpickle ``make_mlp`` by reference.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def make_loader(
    n: int = 96, batch_size: int = 32, seed: int = 0, dtype: torch.dtype = torch.float32
) -> DataLoader:
    """A 3-class problem on 4 features, labels from a random linear teacher."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = (x @ torch.randn(4, 3, generator=g, dtype=torch.float64)).argmax(dim=1)
    return DataLoader(TensorDataset(x.to(dtype), y), batch_size=batch_size)


def make_mlp(config: Mapping[str, Any]) -> nn.Module:
    """A 4-h-3 MLP, seeded by ``config["seed"]`` (default 0)."""
    torch.manual_seed(int(config.get("seed", 0)))
    hidden = int(config.get("hidden", 8))
    model = nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 3))
    return model.to(config.get("dtype", torch.float32))


def make_mlp64(config: Mapping[str, Any]) -> nn.Module:
    """:func:`make_mlp` in float64."""
    return make_mlp({**config, "dtype": torch.float64})


class FailOnce:
    """A cross-entropy loss that raises once, in whichever process first reaches its
    ``at``-th call, and never again once ``marker`` exists (picklable, for Ray workers)."""

    def __init__(self, marker: str, at: int) -> None:
        self.marker = marker
        self.at = at
        self.calls = 0

    def __call__(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        import os

        self.calls += 1
        if self.calls == self.at and not os.path.exists(self.marker):
            try:
                fd = os.open(self.marker, os.O_CREAT | os.O_EXCL)
            except FileExistsError:
                pass
            else:
                os.close(fd)
                raise RuntimeError("worker lost (simulated)")
        return torch.nn.functional.cross_entropy(out, y)
