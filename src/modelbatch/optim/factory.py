"""``OptimizerFactory``: build the fastest correct optimizer for a ModelBatch."""

from __future__ import annotations

import inspect
import warnings
from typing import TYPE_CHECKING, Any

import torch

from modelbatch.optim.adam import Adam, AdamW
from modelbatch.optim.base import BatchOptimizer
from modelbatch.optim.generic import PerModelOptimizer
from modelbatch.optim.sgd import SGD

if TYPE_CHECKING:
    from modelbatch.core import ModelBatch

__all__ = ["OptimizerFactory", "SlowOptimizerWarning"]

# torch.optim classes with a vectorised counterpart. Subclasses are not matched: they may
# change the update rule.
_VECTORISED: dict[type, type[BatchOptimizer]] = {
    torch.optim.SGD: SGD,
    torch.optim.Adam: Adam,
    torch.optim.AdamW: AdamW,
}
# torch.optim keyword arguments that only choose an implementation, not the maths.
_IMPLEMENTATION_KWARGS = ("foreach", "fused", "capturable", "differentiable")


class SlowOptimizerWarning(UserWarning):
    """The generic per-model optimizer path is in use (a Python loop over models)."""


_warned: set[type] = set()


class OptimizerFactory:
    """Build a per-model optimizer for a :class:`~modelbatch.ModelBatch`.

    ``OptimizerFactory(torch.optim.AdamW, lr=[1e-3, 3e-4], weight_decay=0.01).build(batch)``
    returns the vectorised :class:`modelbatch.optim.AdamW` when one exists for the class,
    otherwise a :class:`~modelbatch.optim.PerModelOptimizer` that runs the given
    ``torch.optim`` class per model (correct for any optimizer, slower; warns once per class).

    Args:
        optimizer_cls: a ``torch.optim.Optimizer`` subclass or a ``modelbatch.optim`` class.
        **hyperparams: keyword arguments of the optimizer, each a scalar or a length-N list.
    """

    def __init__(self, optimizer_cls: type[torch.optim.Optimizer], **hyperparams: Any) -> None:
        if not (
            isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)
        ):
            raise TypeError(
                f"optimizer_cls must be a torch.optim.Optimizer subclass, got {optimizer_cls!r}"
            )
        self.optimizer_cls = optimizer_cls
        self.hyperparams = hyperparams

    def build(self, batch: ModelBatch) -> torch.optim.Optimizer:
        """The optimizer for ``batch``: vectorised when possible, else the generic path."""
        cls = self.optimizer_cls
        hp = dict(self.hyperparams)
        if issubclass(cls, BatchOptimizer):
            return cls(batch, **hp)
        vectorised = _VECTORISED.get(cls)
        if vectorised is not None:
            for k in _IMPLEMENTATION_KWARGS:
                hp.pop(k, None)
            accepted = inspect.signature(vectorised).parameters
            unsupported = sorted(set(hp) - set(accepted))
            complex_params = not vectorised._supports_complex and any(
                p.is_complex() for _, p in batch.stacked_parameters()
            )
            if not unsupported and not complex_params:
                return vectorised(batch, **hp)
            if unsupported:
                reason = f"the vectorised {cls.__name__} does not support {unsupported}"
            else:
                reason = f"the vectorised {cls.__name__} does not support complex parameters"
        else:
            reason = f"no vectorised version of {cls.__name__}"
        if cls not in _warned:
            _warned.add(cls)
            warnings.warn(
                f"ModelBatch: {reason}; using the generic per-model path, which loops over the "
                f"{len(batch)} models in Python at every step (correct, but slower). Vectorised "
                f"optimizers: {', '.join(c.__name__ for c in _VECTORISED)}.",
                SlowOptimizerWarning,
                stacklevel=2,
            )
        return PerModelOptimizer(batch, cls, **hp)
