"""ModelBatch: train many independent, structurally identical PyTorch models as one.

The public API is re-exported here; everything else is internal.
"""

from modelbatch import optim
from modelbatch._structure import ArchitectureMismatchError
from modelbatch._version import __version__
from modelbatch.amp import BatchGradScaler, autocast
from modelbatch.callbacks import (
    Callback,
    CallbackPack,
    DivergenceGuard,
    EarlyStopping,
    GradClipping,
    LogMetrics,
    MetricsLogger,
    NaNGuard,
)
from modelbatch.checkpoint import CheckpointError, load_model
from modelbatch.checkpoint_manager import CheckpointManager
from modelbatch.core import ModelBatch
from modelbatch.data import DataRouter, IndexedDataset, evaluate_held_out
from modelbatch.isolation import (
    clip_grad_norm_,
    clip_grad_value_,
    diverged_models,
    grad_norms,
    nonfinite_grads,
    nonfinite_models,
)
from modelbatch.optim.factory import OptimizerFactory
from modelbatch.seeding import derive_seeds, seeded_models, use_seeded_dropout
from modelbatch.train import evaluate, train_one_epoch

__all__ = [
    "ArchitectureMismatchError",
    "BatchGradScaler",
    "Callback",
    "CallbackPack",
    "CheckpointError",
    "CheckpointManager",
    "DataRouter",
    "DivergenceGuard",
    "EarlyStopping",
    "GradClipping",
    "IndexedDataset",
    "LogMetrics",
    "MetricsLogger",
    "ModelBatch",
    "NaNGuard",
    "OptimizerFactory",
    "__version__",
    "autocast",
    "clip_grad_norm_",
    "clip_grad_value_",
    "derive_seeds",
    "diverged_models",
    "evaluate",
    "evaluate_held_out",
    "grad_norms",
    "load_model",
    "nonfinite_grads",
    "nonfinite_models",
    "optim",
    "seeded_models",
    "train_one_epoch",
    "use_seeded_dropout",
]
