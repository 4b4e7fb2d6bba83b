"""Quickstart: a learning-rate sweep of 16 MLPs trained as one model."""

import torch
import torch.nn.functional as F
from torch import nn

import modelbatch

torch.manual_seed(0)
models = [nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)) for _ in range(16)]
batch = modelbatch.ModelBatch(models)  # parameters stacked to [16, ...]
lrs = torch.logspace(-4, -1, 16).tolist()
opt = modelbatch.optim.AdamW(batch, lr=lrs, weight_decay=0.01)  # one lr per model
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100)  # stock scheduler

x, y = torch.randn(256, 64), torch.randint(0, 10, (256,))
for _step in range(100):
    out = batch(x)  # shared input [B, 64] -> [16, B, 10]
    loss = batch.compute_loss(out, y, F.cross_entropy)  # sum of per-model losses
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()

best = int(batch.latest_losses.argmin())
print(f"best lr {lrs[best]:.1e}, loss {batch.latest_losses[best]:.4f}")
model = batch.extract(best)  # a plain nn.Sequential with the trained weights
