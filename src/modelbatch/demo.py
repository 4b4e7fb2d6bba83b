"""``modelbatch demo``: a learning-rate x weight-decay x seed sweep of MLPs on the digits data.

Trains the whole sweep as one ModelBatch, prints a leaderboard, writes a plot, then trains
the same models one after another with plain PyTorch and reports the measured speedup, how
many models' weights agree with their one-by-one twins, and how their accuracies compare.
"""

from __future__ import annotations

import copy
import itertools
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import modelbatch
from modelbatch.core import ModelBatch

__all__ = ["main", "run_demo"]

_DESCRIPTION = """\
Train a learning-rate x weight-decay x seed sweep of MLPs (64-64-64-10, AdamW) on
scikit-learn's digits data as one ModelBatch, print a leaderboard, write a plot, then train
the same models one after another with plain PyTorch and report the speedup, how many models'
weights agree with their one-by-one twins, and how their validation accuracies compare."""


def _require_demo_extra(progress: bool = True) -> None:
    """Raise a one-line ImportError naming every missing package of the ``demo`` extra
    (tqdm only when progress bars are wanted)."""
    missing = []
    packages = {"sklearn": "scikit-learn", "matplotlib": "matplotlib"}
    if progress:
        packages["tqdm"] = "tqdm"
    for mod, name in packages.items():
        try:
            __import__(mod)
        except ImportError:
            missing.append(name)
    if missing:
        hint = " (or pass --no-progress)" if missing == ["tqdm"] else ""
        raise ImportError(
            f"the demo needs {', '.join(missing)}{hint}; install the demo extra from the "
            "ModelBatch repository: pip install -e '.[demo]'"
        )


class _NoBar:
    """Stands in for a tqdm bar when progress bars are off (no tqdm needed)."""

    def __init__(self, iterable: Iterable[int]) -> None:
        self.iterable = iterable

    def __iter__(self) -> Iterator[int]:
        return iter(self.iterable)

    def set_postfix(self, **kwargs: object) -> None:
        pass


def _progress(iterable: Iterable[int], desc: str, enabled: bool) -> Any:
    if not enabled:
        return _NoBar(iterable)
    from tqdm import tqdm

    return tqdm(iterable, desc=desc)


@dataclass
class SweepPoint:
    """One model of the sweep."""

    lr: float
    weight_decay: float
    seed: int


def make_mlp(seed: int, d_in: int = 64, hidden: int = 64, classes: int = 10) -> nn.Module:
    """The demo's MLP (64-64-64-10), initialised from ``seed`` alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Linear(d_in, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, classes),
        )


def load_digits_split(device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's bundled digits: 1,797 8x8 images, standardised, 80/20 split.

    Returns ``x_train [1437, 64]``, ``y_train [1437]``, ``x_val [360, 64]``, ``y_val [360]``.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    n_train = int(0.8 * len(x))
    mean, std = x[:n_train].mean(0), x[:n_train].std(0).clamp_min(1e-3)
    x = (x - mean) / std
    return (
        x[:n_train].to(device),
        y[:n_train].to(device),
        x[n_train:].to(device),
        y[n_train:].to(device),
    )


def _batches(n: int, batch_size: int, epoch: int) -> list[Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1000 + epoch))
    return [perm[i : i + batch_size] for i in range(0, n, batch_size)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_demo(
    lrs: Sequence[float],
    weight_decays: Sequence[float],
    seeds: Sequence[int],
    epochs: int = 15,
    batch_size: int = 64,
    out_dir: str | Path = "demo_out",
    device: str | None = None,
    sequential: bool = True,
    progress: bool = True,
    dtype: torch.dtype = torch.float32,
) -> dict[str, object]:
    """Run the sweep (one model per ``lrs x weight_decays x seeds`` point) and report it.

    Returns a summary dict: ``val_acc [N]`` (batched models), ``val_acc_sequential [N]``
    (NaN without ``sequential``), ``loss_curves [epochs, N]``, ``time_batched_s``,
    ``time_sequential_s``, ``speedup``, ``rel_weight_diffs [N]`` (largest relative
    difference of each model's parameters from its one-by-one twin),
    ``max_rel_weight_diff``, ``plot`` (path) and ``points`` (the sweep points).
    """
    _require_demo_extra(progress)
    from modelbatch.cli import parse_device

    dev = parse_device(device)
    points = [SweepPoint(lr, wd, s) for lr, wd, s in itertools.product(lrs, weight_decays, seeds)]
    n = len(points)
    x_tr, y_tr, x_val, y_val = load_digits_split(dev)
    x_tr, x_val = x_tr.to(dtype), x_val.to(dtype)
    initial = [make_mlp(p.seed).to(device=dev, dtype=dtype) for p in points]
    dtype_name = str(dtype).replace("torch.", "")

    # ------------------------------------------------ all models at once
    batch = ModelBatch([copy.deepcopy(m) for m in initial])
    opt = modelbatch.optim.AdamW(
        batch, lr=[p.lr for p in points], weight_decay=[p.weight_decay for p in points]
    )
    loss_curves = torch.zeros(epochs, n)
    _sync(dev)
    t0 = time.perf_counter()
    bar = _progress(range(epochs), f"ModelBatch ({n} models, {dev.type})", progress)
    for epoch in bar:
        total = torch.zeros(n, device=dev)
        for idx in _batches(len(x_tr), batch_size, epoch):
            x, y = x_tr[idx], y_tr[idx]
            loss = batch.compute_loss(batch(x), y, F.cross_entropy)
            opt.zero_grad()
            loss.backward()
            opt.step()
            assert batch.latest_losses is not None
            total += batch.latest_losses * len(idx)
        loss_curves[epoch] = (total / len(x_tr)).cpu()
        bar.set_postfix(best_loss=f"{loss_curves[epoch].min():.3f}")
    _sync(dev)
    t_batch = time.perf_counter() - t0
    with torch.no_grad():
        batch.eval()
        val_acc = (batch(x_val).argmax(-1) == y_val).float().mean(1).cpu()
    batched_models = batch.extract_all()

    # ------------------------------------------------ the same models, one after another
    t_seq = math.nan
    max_diff = math.nan
    rel_diffs = torch.full((n,), math.nan)
    val_acc_seq = torch.full((n,), math.nan)
    if sequential:
        _sync(dev)
        t0 = time.perf_counter()
        seq_models = []
        for i in _progress(range(n), "plain PyTorch, one by one", progress):
            m = copy.deepcopy(initial[i])
            o = torch.optim.AdamW(
                m.parameters(), lr=points[i].lr, weight_decay=points[i].weight_decay
            )
            for epoch in range(epochs):
                for idx in _batches(len(x_tr), batch_size, epoch):
                    o.zero_grad()
                    F.cross_entropy(m(x_tr[idx]), y_tr[idx]).backward()
                    o.step()
            seq_models.append(m)
        _sync(dev)
        t_seq = time.perf_counter() - t0
        with torch.no_grad():
            rel_diffs = torch.tensor(
                [
                    max(
                        float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
                        for a, b in zip(ma.parameters(), mb.parameters(), strict=False)
                    )
                    for ma, mb in zip(batched_models, seq_models, strict=False)
                ]
            )
            val_acc_seq = torch.stack(
                [(m.eval()(x_val).argmax(-1) == y_val).float().mean().cpu() for m in seq_models]
            )
        max_diff = float(rel_diffs.max())

    # ------------------------------------------------ report
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    order = torch.argsort(val_acc, descending=True, stable=True).tolist()  # ties: as argmax
    print(f"\nLeaderboard: {n} MLPs on digits, {epochs} epochs, AdamW (validation accuracy)")
    print(
        f"{'rank':>4}  {'model':>5}  {'lr':>9}  {'weight_decay':>12}  {'seed':>4}  "
        f"{'val_acc':>7}  {'train_loss':>10}"
    )
    shown = order[:10] + (order[-3:] if n > 13 else [])
    for rank, i in enumerate(order):
        if i not in shown:
            continue
        if rank == len(order) - 3 and n > 13:
            print("   ...")
        p = points[i]
        print(
            f"{rank + 1:>4}  {i:>5}  {p.lr:>9.2e}  {p.weight_decay:>12.1e}  {p.seed:>4}  "
            f"{val_acc[i]:>7.2%}  {loss_curves[-1, i]:>10.4f}"
        )
    plot_path = out / "demo_sweep.png"
    _plot(points, val_acc, loss_curves, plot_path, epochs)
    print(f"\nPlot written to {plot_path}")
    print(f"ModelBatch: {n} models in {t_batch:.2f} s on {dev.type} ({dtype_name})")
    if sequential:
        print(f"Plain PyTorch, one by one: {t_seq:.2f} s  ->  speedup {t_seq / t_batch:.1f}x")
        if dev.type == "cpu":
            print(
                "  (On a CPU the gain is modest and timings vary with the machine's load: a "
                "CPU has little idle capacity to fill. The large gain comes on a GPU, which "
                "one small model leaves mostly idle.)"
            )
        agree = rel_diffs <= 1e-4
        print(
            f"Weights equal to the one-by-one run within 1e-4 (relative): {int(agree.sum())}/{n} "
            f"models (median difference {rel_diffs.median():.1e})."
        )
        if not bool(agree.all()):
            off = sorted(points[i].lr for i in range(n) if not agree[i])
            by_lr = ", ".join(f"{lr:.1e}: {off.count(lr)}" for lr in sorted(set(off)))
            print(
                f"  The other {len(off)} (by learning rate: {by_lr}) started from the same "
                f"weights and saw the same batches, but {dtype_name} rounding differences (the "
                "size of those between two plain PyTorch runs on different hardware) grow from "
                "step to step where training is unstable, mostly at high learning rates."
            )
        acc_gap = (val_acc - val_acc_seq).abs()
        print(
            f"Validation accuracy, batched vs one by one: best {val_acc.max():.2%} vs "
            f"{val_acc_seq.max():.2%}; per model, median gap {acc_gap.median():.2%}, "
            f"{int((acc_gap == 0).sum())}/{n} identical."
        )
    return {
        "val_acc": val_acc,
        "loss_curves": loss_curves,
        "time_batched_s": t_batch,
        "time_sequential_s": t_seq,
        "speedup": t_seq / t_batch,
        "val_acc_sequential": val_acc_seq,
        "max_rel_weight_diff": max_diff,
        "rel_weight_diffs": rel_diffs,
        "plot": plot_path,
        "points": points,
    }


def _plot(
    points: list[SweepPoint], val_acc: Tensor, loss_curves: Tensor, path: Path, epochs: int
) -> None:
    """Two panels, one colour map for one quantity (validation accuracy) on both.

    Left: validation accuracy of every (learning rate, weight decay) cell, the mean over the
    seeds written in the cell, the best model's cell outlined. Right: the training loss per
    epoch of the best model at each learning rate (one curve per learning rate, labelled at
    its end, coloured by its validation accuracy); the best model's curve in black.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lrs = sorted({p.lr for p in points})
    wds = sorted({p.weight_decay for p in points})
    seeds = sorted({p.seed for p in points})
    acc = val_acc.double()
    best = int(acc.argmax())
    grid = torch.full((len(wds), len(lrs)), math.nan, dtype=torch.float64)
    for r, wd in enumerate(wds):
        for c, lr in enumerate(lrs):
            idx = [i for i, p in enumerate(points) if p.lr == lr and p.weight_decay == wd]
            grid[r, c] = acc[idx].mean()
    # viridis without its palest yellow, so that every curve stands out on white
    cmap = matplotlib.colors.ListedColormap(
        plt.get_cmap("viridis")(torch.linspace(0, 0.85, 256).numpy()), name="viridis_dark"
    )
    lo = float(acc.min())
    hi = float(acc.max())
    norm = matplotlib.colors.Normalize(vmin=lo, vmax=hi if hi > lo else lo + 1e-3)

    fig, (ax1, ax2) = plt.subplots(
        1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [1.1, 1]}, layout="constrained"
    )
    ax1.imshow(grid.numpy(), cmap=cmap, norm=norm, aspect="auto", origin="lower")
    for r in range(len(wds)):
        for c in range(len(lrs)):
            v = float(grid[r, c])
            dark = norm(v) < 0.6
            ax1.text(
                c, r, f"{v:.1%}", ha="center", va="center", fontsize=8,
                color="white" if dark else "black",
            )  # fmt: skip
    bp = points[best]
    br, bc = wds.index(bp.weight_decay), lrs.index(bp.lr)
    ax1.add_patch(
        matplotlib.patches.Rectangle(
            (bc - 0.5, br - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.5
        )
    )
    ax1.set_xticks(range(len(lrs)), [f"{lr:.1e}" for lr in lrs], rotation=45)
    ax1.set_yticks(range(len(wds)), [f"{wd:.0e}" if wd else "0" for wd in wds])
    ax1.set_xlabel("learning rate")
    ax1.set_ylabel("weight decay")
    seed_note = f"mean of {len(seeds)} seeds" if len(seeds) > 1 else "one seed"
    ax1.set_title(f"Validation accuracy ({seed_note}); red box: best model", fontsize=10)

    epochs_axis = range(1, loss_curves.shape[0] + 1)
    last = epochs_axis[-1]
    ends: list[tuple[float, str, bool]] = []  # (final loss, label, is best)
    for lr in lrs:
        idx = [i for i, p in enumerate(points) if p.lr == lr]
        i = max(idx, key=lambda k: float(acc[k]))
        curve = loss_curves[:, i].numpy()
        ends.append((float(curve[-1]), f"lr {lr:.1e}", i == best))
        if i != best:
            ax2.plot(epochs_axis, curve, color=cmap(norm(float(acc[i]))), linewidth=1.8)
    curve = loss_curves[:, best].numpy()
    wd_text = f"{bp.weight_decay:.0e}" if bp.weight_decay else "0"
    ax2.plot(
        epochs_axis, curve, color="black", linewidth=3, linestyle="--",
        label=f"best model: lr {bp.lr:.1e}, weight decay {wd_text}, seed {bp.seed}",
    )  # fmt: skip
    # Curve labels at the right end, spread apart so that none covers another.
    finite = [e for e in ends if math.isfinite(e[0]) and e[0] > 0]
    if finite:
        logs = sorted((math.log10(v), text, is_best) for v, text, is_best in finite)
        span = max(logs[-1][0] - logs[0][0], 1.0)
        gap = span / max(12, 2 * len(logs))
        placed: list[float] = []
        for y, _, _ in logs:
            placed.append(max(y, placed[-1] + gap) if placed else y)
        for (y, text, is_best), y_text in zip(logs, placed, strict=True):
            ax2.annotate(
                text, (last, 10**y), xytext=(last + 0.4 + 0.04 * last, 10**y_text),
                va="center", fontsize=7, fontweight="bold" if is_best else "normal",
                arrowprops={"arrowstyle": "-", "color": "0.6", "linewidth": 0.6},
            )  # fmt: skip
    ax2.set_yscale("log")
    ax2.set_xlim(1, last + 1.5 + 0.2 * last)
    ax2.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("training loss")
    ax2.set_title("Training loss of the best model at each learning rate", fontsize=10)
    ax2.legend(fontsize=8, loc="upper right")
    fig.colorbar(
        matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap),
        ax=[ax1, ax2],
        label="validation accuracy (colour, both panels)",
        format=matplotlib.ticker.PercentFormatter(1.0),
    )
    fig.suptitle(
        f"{len(points)} MLPs on scikit-learn digits trained as one ModelBatch ({epochs} epochs, "
        f"AdamW): best validation accuracy {float(acc[best]):.1%}",
        fontsize=12,
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point of ``modelbatch demo``."""
    from modelbatch.cli import OneLineParser, parse_device

    parser = OneLineParser(prog="modelbatch demo", description=_DESCRIPTION)
    parser.add_argument(
        "--lrs", type=int, default=8, help="number of learning rates (log grid 1e-4..3e-1)"
    )
    parser.add_argument(
        "--wds", type=int, default=4, help="number of weight decays (0 and a log grid)"
    )
    parser.add_argument("--seeds", type=int, default=2, help="number of seeds")
    parser.add_argument("--epochs", type=int, default=15, help="epochs per model")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per step and model")
    parser.add_argument("--out", default="demo_out", help="folder for the plot")
    parser.add_argument(
        "--device", default=None, help="cpu, cuda or cuda:K (None: cuda when present)"
    )
    parser.add_argument("--no-sequential", action="store_true", help="skip the one-by-one baseline")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--dtype",
        choices=["float32", "float64"],
        default="float32",
        help="dtype of the models and data",
    )
    args = parser.parse_args(argv)
    for flag in ("lrs", "wds", "seeds", "epochs", "batch_size"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    try:
        parse_device(args.device)
    except ValueError as e:
        parser.error(str(e))
    _require_demo_extra(not args.no_progress)
    lrs = torch.logspace(-4, math.log10(0.3), args.lrs).tolist() if args.lrs > 1 else [1e-2]
    wds = [0.0, *torch.logspace(-4, -1, args.wds - 1).tolist()] if args.wds > 1 else [0.0]
    run_demo(
        lrs,
        wds,
        list(range(args.seeds)),
        epochs=args.epochs,
        batch_size=args.batch_size,
        out_dir=args.out,
        device=args.device,
        sequential=not args.no_sequential,
        progress=not args.no_progress,
        dtype=getattr(torch, args.dtype),
    )
    return 0
