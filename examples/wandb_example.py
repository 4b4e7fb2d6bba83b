"""Per-model metrics of a ModelBatch in one Weights & Biases run (offline: no account needed).

Run:  python examples/wandb_example.py [wandb_dir]   (later: wandb sync <dir>/wandb/offline-run-*)
Needs: pip install -e '.[wandb]'.  per_model_runs=True gives one run per model in a group.
"""

import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import modelbatch
from modelbatch.integrations.logging import WandbLogger, log_batch_metrics

wandb_dir = sys.argv[1] if len(sys.argv) > 1 else "."
torch.manual_seed(0)
x = torch.randn(256, 8)
loader = DataLoader(TensorDataset(x, (x.sum(1) > 0).long()), batch_size=64)
lrs = [1e-3, 3e-3, 1e-2, 3e-2]
models = [nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)) for _ in lrs]
batch = modelbatch.ModelBatch(models)
optimizer = modelbatch.optim.Adam(batch, lr=lrs)

logger = WandbLogger(project="modelbatch-demo", mode="offline", dir=wandb_dir, config={"lrs": lrs})
with logger:  # keys: train_loss/model_0 ... val_accuracy/model_3
    for epoch in range(5):
        losses = modelbatch.train_one_epoch(batch, loader, optimizer, F.cross_entropy)
        batch.log_metric("train_loss", losses)
        batch.log_metric("val_accuracy", modelbatch.evaluate(batch, loader)["accuracy"])
        log_batch_metrics(logger, batch, step=epoch)
