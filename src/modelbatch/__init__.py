"""ModelBatch: train many independent, structurally identical PyTorch models as one.

The public API is re-exported here; everything else is internal.
"""

from modelbatch import optim
from modelbatch._structure import ArchitectureMismatchError
from modelbatch.core import ModelBatch
from modelbatch.optim.factory import OptimizerFactory
from modelbatch.train import evaluate, train_one_epoch

__version__ = "0.1.0"

__all__ = [
    "ArchitectureMismatchError",
    "ModelBatch",
    "OptimizerFactory",
    "__version__",
    "evaluate",
    "optim",
    "train_one_epoch",
]
