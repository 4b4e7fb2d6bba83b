"""Quickstart: a learning-rate sweep of 16 MLPs trained as one model, the best picked on
held-out data."""

import torch
import torch.nn.functional as F
from torch import nn

import modelbatch

torch.manual_seed(0)
x = torch.randn(1280, 64)
y = (x @ torch.randn(64, 10)).argmax(dim=1)  # 10 classes that a model can learn
x_train, y_train, x_val, y_val = x[:1024], y[:1024], x[1024:], y[1024:]

models = [nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)) for _ in range(16)]
batch = modelbatch.ModelBatch(models)  # parameters stacked to [16, ...]
lrs = torch.logspace(-4, -1, 16).tolist()
opt = modelbatch.optim.AdamW(batch, lr=lrs, weight_decay=0.01)  # one lr per model
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100)  # stock scheduler

for _step in range(100):
    out = batch(x_train)  # shared input [B, 64] -> [16, B, 10]
    loss = batch.compute_loss(out, y_train, F.cross_entropy)  # sum of per-model losses
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()

with torch.no_grad():  # choose on held-out data, not on the training loss
    val_acc = (batch(x_val).argmax(-1) == y_val).float().mean(dim=1)  # [16]
best = int(val_acc.argmax())
print(f"best lr {lrs[best]:.1e}: validation accuracy {val_acc[best]:.1%}")
model = batch.extract(best)  # a plain nn.Sequential with the trained weights
