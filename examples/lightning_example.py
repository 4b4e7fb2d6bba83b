"""Train 8 classifiers, each with its own learning rate, in one PyTorch Lightning run."""

import functools

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import modelbatch
from modelbatch.integrations.lightning import BatchLightningModule

torch.manual_seed(0)
x = torch.randn(512, 20)
y = (x[:, :3] + 0.5 * torch.randn(512, 3)).argmax(dim=1)  # 3 noisy classes
loader = DataLoader(TensorDataset(x, y), batch_size=64)

models = [nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 3)) for _ in range(8)]
batch = modelbatch.ModelBatch(models)
module = BatchLightningModule(
    batch,
    F.cross_entropy,
    optimizer=functools.partial(modelbatch.optim.Adam, lr=[1e-4 * 2**i for i in range(8)]),
    scheduler=lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5),
    metrics={"acc": lambda out, target: (out.argmax(-1) == target).float().mean()},
)
trainer = pl.Trainer(max_epochs=5, gradient_clip_val=1.0, logger=False, enable_progress_bar=False)
trainer.fit(module, loader)
results = trainer.validate(module, loader, verbose=False)[0]  # {"val/acc/model_0": ..., ...}
accuracy = module.per_model_logged("val", "acc")  # {model id: accuracy}
best = max(accuracy, key=accuracy.__getitem__)
print(f"best model {best}: accuracy {accuracy[best]:.3f}")
best_model = batch.extract(best)  # a plain nn.Sequential (extract takes the id)
