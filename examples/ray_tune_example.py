"""A sweep of 8 configs as 2 Ray Tune trials, each training a bundle of 4 models as one ModelBatch.

Run:  python examples/ray_tune_example.py [results_dir]     Needs: pip install -e '.[ray]'
On a GPU cluster give each bundle its own GPU: resources_per_trial={"cpu": 4, "gpu": 1}.
"""

import sys

import ray
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from modelbatch.integrations.ray_tune import tune_bundles


def make_model(config):
    torch.manual_seed(config["seed"])
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))


if __name__ == "__main__":
    torch.manual_seed(0)
    x = torch.randn(512, 8)
    y = (x[:, 0] * x[:, 1] > 0).long()
    train = DataLoader(TensorDataset(x[:384], y[:384]), batch_size=64)
    val = DataLoader(TensorDataset(x[384:], y[384:]), batch_size=128)
    configs = [{"seed": s, "lr": lr} for s in range(2) for lr in (1e-3, 3e-3, 1e-2, 3e-2)]
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False)
    results = tune_bundles(
        make_model, configs, models_per_trial=4, train_loader=train, val_loader=val,
        loss_fn=F.cross_entropy, epochs=3, metric="accuracy", optimizer_cls=torch.optim.AdamW,
        storage_path=sys.argv[1] if len(sys.argv) > 1 else None,  # default: ~/ray_results
    )
    best = max(results, key=lambda i: results[i].value)
    print(f"best: config {results[best].config}, accuracy {results[best].value:.3f}")
