"""Per-model metrics of a ModelBatch in ONE TensorBoard run: a curve per model.

Run:  python examples/tensorboard_example.py [log_dir]   then   tensorboard --logdir runs
Needs: pip install -e '.[tensorboard]'
"""

import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import modelbatch
from modelbatch.integrations.logging import TensorBoardLogger, log_batch_metrics

log_dir = sys.argv[1] if len(sys.argv) > 1 else "runs/modelbatch"
torch.manual_seed(0)
x = torch.randn(256, 8)
loader = DataLoader(TensorDataset(x, (x.sum(1) > 0).long()), batch_size=64)
models = [nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)) for _ in range(4)]
batch = modelbatch.ModelBatch(models)
optimizer = modelbatch.optim.Adam(batch, lr=[1e-3, 3e-3, 1e-2, 3e-2])  # one lr per model

with TensorBoardLogger(log_dir) as logger:  # tags: train_loss/model_0 ... val_accuracy/model_3
    for epoch in range(5):
        losses = modelbatch.train_one_epoch(batch, loader, optimizer, F.cross_entropy)
        batch.log_metric("train_loss", losses)
        batch.log_metric("val_accuracy", modelbatch.evaluate(batch, loader)["accuracy"])
        log_batch_metrics(logger, batch, step=epoch)
