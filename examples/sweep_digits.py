"""24 configs (lr x weight decay x dropout rate) on scikit-learn's digits as one ModelBatch.

Needs pip install -e '.[demo]'. Run: python examples/sweep_digits.py [FOLDER]
"""

import sys

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from modelbatch.integrations import sweep

folder = sys.argv[1] if len(sys.argv) > 1 else "digits_sweep"
digits = load_digits()
x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
y = torch.tensor(digits.target)
perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
train, val = perm[:1400], perm[1400:]
train_loader = DataLoader(TensorDataset(x[train], y[train]), batch_size=64, shuffle=True)
val_loader = DataLoader(TensorDataset(x[val], y[val]), batch_size=512)


def make_model(config: dict) -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 64), nn.ReLU(), nn.Dropout(config["dropout"]), nn.Linear(64, 10)
    )


configs = [
    {"lr": lr, "weight_decay": wd, "dropout": p}
    for lr in (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
    for wd in (0.0, 1e-2)
    for p in (0.0, 0.3)
]
results = sweep(
    configs, make_model, train_loader=train_loader, val_loader=val_loader,
    loss_fn=F.cross_entropy, optimizer_cls=torch.optim.AdamW, epochs=10,
    metric="accuracy", seeds=0, folder=folder, top_k=3, progress=False,
)  # the 24 models differ in their dropout rate, yet train as one batch
for row in sorted(results.records(), key=lambda r: -r["best_val_accuracy"])[:5]:
    print({k: row[k] for k in ("lr", "weight_decay", "dropout", "best_val_accuracy", "epochs")})
results.plot(f"{folder}/sweep.png")  # accuracy against each hyper-parameter, best starred
best = results.best_models[0]  # a plain nn.Sequential with its best weights
