"""Vectorised optimizers: each model of a ModelBatch is updated with its own hyper-parameters,
in a number of kernels independent of the number of models."""

from modelbatch.optim.adam import Adam, AdamW
from modelbatch.optim.base import BatchOptimizer
from modelbatch.optim.factory import OptimizerFactory, SlowOptimizerWarning
from modelbatch.optim.generic import PerModelOptimizer
from modelbatch.optim.sgd import SGD

__all__ = [
    "SGD",
    "Adam",
    "AdamW",
    "BatchOptimizer",
    "OptimizerFactory",
    "PerModelOptimizer",
    "SlowOptimizerWarning",
]
