"""Per-model metrics of a ModelBatch to CSV (long format) and JSON Lines: no extra needed.

Run:  python examples/csv_example.py [out_dir]
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import modelbatch
from modelbatch.integrations.logging import CSVLogger, JSONLLogger, log_batch_metrics

out = Path(sys.argv[1] if len(sys.argv) > 1 else "logs")
torch.manual_seed(0)
x = torch.randn(256, 8)
loader = DataLoader(TensorDataset(x, (x.sum(1) > 0).long()), batch_size=64)
batch = modelbatch.ModelBatch([nn.Linear(8, 2) for _ in range(4)], model_ids=["a", "b", "c", "d"])
optimizer = modelbatch.optim.SGD(batch, lr=[0.01, 0.03, 0.1, 0.3])

with CSVLogger(out / "metrics.csv") as csv_log, JSONLLogger(out / "metrics.jsonl") as jsonl_log:
    for epoch in range(3):
        losses = modelbatch.train_one_epoch(batch, loader, optimizer, F.cross_entropy)
        batch.log_metric("train_loss", losses)
        for logger in (csv_log, jsonl_log):
            log_batch_metrics(logger, batch, step=epoch)
        if epoch == 0:
            batch.drop("a")  # rows for "a" simply stop: the long format needs no fixed columns
print((out / "metrics.csv").read_text().splitlines()[:3])
