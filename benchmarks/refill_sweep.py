"""Configs finished per second in a Hyperband-like sweep: refill vs drop-and-shrink vs one by one.

A sweep of M configs (MLP 64-h-10, lr x seed grid) under asynchronous successive halving
(:class:`modelbatch.integrations.SuccessiveHalving`, rungs at 1 and 3 epochs, reduction
factor 3, at most ``--epochs`` epochs), three ways:

* ``refill``: :func:`modelbatch.integrations.sweep` with N models in flight; a pruned or
  finished model's slot takes the next config at once (the batch stays at N until the
  queue is empty).
* ``drop``: the same with ``refill=False``: pruned models leave the batch, which shrinks;
  the next N configs start when the whole batch is done.
* ``one-by-one``: each config alone, plain PyTorch (``torch.optim.Adam``), the same pruner.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/refill_sweep.py --configs 48 --n 8 --epochs 9

Prints one line per method: wall seconds (fastest of ``--repeats`` runs), configs finished
per second, model-epochs trained
(the work done; the pruning decisions may differ a little with the order configs finish in)
and sequential passes over the training data (rounds: what bounds the time on an
accelerator, where one round of N small models costs about what one model's round costs).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from modelbatch.integrations.sweeping import ConfigResult, SuccessiveHalving, sweep


def make_model(config: Mapping[str, Any]) -> nn.Module:
    torch.manual_seed(int(config["seed"]))
    h = int(config["hidden"])
    return nn.Sequential(nn.Linear(64, h), nn.ReLU(), nn.Linear(h, 10))


def make_data(n: int, batch_size: int) -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(64, 10, generator=g)
    x = torch.randn(2 * n, 64, generator=g)
    y = (x @ teacher).argmax(1)
    train = DataLoader(TensorDataset(x[:n], y[:n]), batch_size=batch_size)
    val = DataLoader(TensorDataset(x[n:], y[n:]), batch_size=n)
    return train, val


class CountingLoader:
    """Counts the passes over the training data: the sequential rounds a device runs (on
    an accelerator a round of N small models costs about what one model's round costs)."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader
        self.passes = 0

    def __iter__(self) -> Any:
        self.passes += 1
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)


def one_by_one(configs: list[dict[str, Any]], train: CountingLoader, val: DataLoader,
               epochs: int, pruner: SuccessiveHalving) -> dict[int, ConfigResult]:
    results: dict[int, ConfigResult] = {}
    for i, c in enumerate(configs):
        model = make_model(c)
        opt = torch.optim.Adam(model.parameters(), lr=c["lr"])
        res = results[i] = ConfigResult(config=c)
        for epoch in range(epochs):
            model.train()
            for x, y in train:
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
            model.eval()
            with torch.no_grad():
                v = sum(float(F.cross_entropy(model(x), y)) for x, y in val) / len(val)
            res.history.append(v)
            if pruner(i, epoch, results):
                res.status = "pruned"
                break
        else:
            res.status = "completed"
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", type=int, default=48)
    ap.add_argument("--n", type=int, default=8, help="models in flight")
    ap.add_argument("--epochs", type=int, default=9)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--samples", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="report the fastest of these runs")
    ap.add_argument("--json", help="also write the numbers to this file")
    args = ap.parse_args()
    torch.set_num_threads(1)
    train, val = make_data(args.samples, args.batch_size)
    lrs = [10 ** (-4 + 3 * k / 7) for k in range(8)]
    configs = [{"seed": s, "hidden": args.hidden, "lr": lrs[s % 8]} for s in range(args.configs)]
    rungs = (1, 3)
    # Warm-up outside the timings: the first optimizer built in a process pays torch's lazy
    # imports (seconds), which would otherwise land on whichever method runs first.
    sweep(configs[:2], make_model, train_loader=train, loss_fn=F.cross_entropy, epochs=1,
          progress=False)
    one_by_one(configs[:1], CountingLoader(train), val, 1, SuccessiveHalving(rungs, mode="min"))
    rows = []
    for method in ("refill", "drop", "one-by-one"):
        walls = []
        for _ in range(args.repeats):
            pruner = SuccessiveHalving(rungs, reduction_factor=3, mode="min")
            counted = CountingLoader(train)
            t0 = time.perf_counter()
            if method == "one-by-one":
                res: Mapping[Any, ConfigResult] = one_by_one(
                    configs, counted, val, args.epochs, pruner
                )
            else:
                res = sweep(configs, make_model, train_loader=counted, val_loader=val,
                            loss_fn=F.cross_entropy, epochs=args.epochs,
                            models_per_batch=args.n, pruner=pruner,
                            refill=method == "refill", progress=False)
            walls.append(time.perf_counter() - t0)
        wall = min(walls)
        work = sum(r.epochs for r in res.values())
        best = min(min(r.history) for r in res.values())
        row = {"method": method, "wall_s": round(wall, 2),
               "wall_s_all": [round(w, 2) for w in walls],
               "configs_per_s": round(len(configs) / wall, 2), "model_epochs": work,
               "sequential_passes": counted.passes, "best_val_loss": round(best, 4)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
