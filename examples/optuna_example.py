"""An Optuna study whose trials train 4 at a time as one ModelBatch; pruned trials leave it.

Run:  python examples/optuna_example.py [study.db]   (run it again and the study resumes)
Needs: pip install -e '.[optuna]'
"""

import sys

import optuna
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from modelbatch.integrations.optuna import create_sqlite_study, optimize_batched

torch.manual_seed(0)
x = torch.randn(512, 8)
y = (x[:, 0] * x[:, 1] > 0).long()
train = DataLoader(TensorDataset(x[:384], y[:384]), batch_size=64)
val = DataLoader(TensorDataset(x[384:], y[384:]), batch_size=128)


def make_model(trial):  # may also sample architecture settings
    torch.manual_seed(trial.number)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))


def make_hparams(trial):  # this trial's optimizer hyper-parameters
    return {
        "lr": trial.suggest_float("lr", 1e-4, 1e-1, log=True),
        "weight_decay": trial.suggest_float("weight_decay", 1e-6, 1e-2, log=True),
    }


study = create_sqlite_study(
    sys.argv[1] if len(sys.argv) > 1 else "modelbatch-optuna.db",
    study_name="modelbatch-example",
    direction="maximize",
    pruner=optuna.pruners.MedianPruner(n_startup_trials=4),
)
optimize_batched(
    study, make_model, make_hparams=make_hparams, n_trials=8, models_per_batch=4, epochs=5,
    train_loader=train, val_loader=val, loss_fn=F.cross_entropy, metric="accuracy",
    optimizer_cls=torch.optim.AdamW,
)
print(f"best accuracy {study.best_value:.3f} with {study.best_params}")
