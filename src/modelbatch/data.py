"""Data routing: per-model sample weights over one shared batch (bagging, k-fold CV).

All N models get the same input batch (copied to the device once); a :class:`DataRouter`
decides, per model, which samples count in its loss. It holds an ``[N, D]`` weight table
over the ``D`` samples of the dataset; for a batch with dataset indices ``idx`` ``[B]`` it
returns the ``[N, B]`` weights that :meth:`ModelBatch.compute_loss` takes as ``mask``.
Model i's loss is then ``sum_b w_ib * l_ib / sum_b w_ib``: exactly its loss when trained
alone on its selected samples of that batch (bool weights) or on the batch with each sample
repeated ``w_ib`` times (bootstrap counts). Steps in which a model has no sample are skipped
for that model (see :func:`skip_models_without_samples`), as they would be alone.

Isolation: a model only ever sees the values of its own samples. With
``isolate_inputs=True`` (the default), :func:`train_one_epoch` and :func:`evaluate_held_out`
feed per-model inputs ``[N, B, ...]`` built by :func:`route_inputs`: sample b's values for
the models routed to it, zeros for the others (floating targets alike, see
:func:`route_targets`). A non-finite sample that only model 0 trains on then reaches model
0 alone; every other model stays bit-identical to a run without it. Without the masking, a
weight of 0 does not stop a NaN: ``0 * NaN`` is NaN, in the loss and in every gradient of
the shared forward. The cost is one ``[N, B, ...]`` copy of the inputs per step.

What BatchNorm sees: within :func:`routed_batch_norm` (entered by :func:`train_one_epoch`
around each routed forward) a training-mode BatchNorm computes model i's batch and running
statistics over its routed samples only, each counted by its weight: exactly model i
trained alone on its selected (repeated) samples.

``DataRouter(..., isolate_inputs=False)`` restores the shared forward (every model sees all
B real samples, one wide matmul instead of a batched one), at the price of isolation.

The loader must yield the dataset index of each sample: wrap a dataset in
:class:`IndexedDataset` so it yields ``(x, y, index)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from modelbatch.seeding import derive_seeds

if TYPE_CHECKING:
    from modelbatch.core import ModelBatch

__all__ = [
    "DataRouter",
    "IndexedDataset",
    "bootstrap_counts",
    "evaluate_held_out",
    "kfold_assignments",
    "route_inputs",
    "route_targets",
    "routed_batch_norm",
    "skip_models_without_samples",
]


class IndexedDataset(Dataset):  # type: ignore[type-arg]
    """Wrap a map-style dataset so each item also carries its index: ``(*item, index)``.

    A dataset returning ``(x, y)`` becomes one returning ``(x, y, index)``; the default
    collate function turns the indices into a ``[B]`` int64 tensor.
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        item = self.dataset[index]
        if isinstance(item, tuple):
            return (*item, index)
        return (item, index)


def bootstrap_counts(n_models: int, dataset_size: int, seed: int = 0) -> Tensor:
    """``[N, D]`` int64 bootstrap resample counts: row i counts how often each sample was
    drawn in model i's resample (``D`` draws with replacement).

    Row i depends only on ``(seed, i)`` (not on ``n_models``), so growing an ensemble keeps
    the existing members' resamples.
    """
    _check_positive(n_models=n_models, dataset_size=dataset_size)
    rows = []
    for s in derive_seeds(seed, n_models):
        g = torch.Generator().manual_seed(s)
        draws = torch.randint(0, dataset_size, (dataset_size,), generator=g)
        rows.append(torch.bincount(draws, minlength=dataset_size))
    return torch.stack(rows)


def kfold_assignments(k: int, dataset_size: int, *, shuffle: bool = True, seed: int = 0) -> Tensor:
    """``[D]`` int64 fold of each sample, for k-fold cross-validation.

    Fold sizes follow scikit-learn's ``KFold``: the first ``D % k`` folds have one sample
    more. Without shuffling, fold f is a contiguous block of indices; with it, the samples
    are permuted first (``torch.randperm`` seeded with ``seed``).
    """
    _check_positive(k=k, dataset_size=dataset_size)
    if k < 2 or k > dataset_size:
        raise ValueError(f"k-fold needs 2 <= k <= dataset_size ({dataset_size}), got k={k}")
    order = (
        torch.randperm(dataset_size, generator=torch.Generator().manual_seed(seed))
        if shuffle
        else torch.arange(dataset_size)
    )
    folds = torch.empty(dataset_size, dtype=torch.int64)
    sizes = [dataset_size // k + (1 if f < dataset_size % k else 0) for f in range(k)]
    start = 0
    for f, size in enumerate(sizes):
        folds[order[start : start + size]] = f
        start += size
    return folds


def _check_positive(**values: int) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")


class DataRouter:
    """Per-model sample weights over a dataset, looked up per batch by sample index.

    Args:
        train_weights: ``[N, D]`` weights (bool masks or non-negative counts/weights) used
            for training: model i trains on sample d with weight ``train_weights[i, d]``.
        eval_weights: optional ``[N, D]`` weights of each model's held-out samples (the
            k-fold validation fold, or the bootstrap out-of-bag samples).
        isolate_inputs: mask the inputs per model before the forward (see the module
            docstring), so no model sees a sample it is not routed. Default True.

    Build one with :meth:`kfold`, :meth:`bootstrap` or from your own masks. Move it to the
    batch's device once with :meth:`to`; lookups then cost one small gather per batch.
    """

    def __init__(
        self,
        train_weights: Tensor,
        eval_weights: Tensor | None = None,
        *,
        isolate_inputs: bool = True,
    ) -> None:
        self.isolate_inputs = bool(isolate_inputs)
        self.train_weights = self._check("train_weights", train_weights)
        if eval_weights is not None:
            eval_weights = self._check("eval_weights", eval_weights)
            if eval_weights.shape != self.train_weights.shape:
                raise ValueError(
                    f"eval_weights has shape {tuple(eval_weights.shape)}, train_weights "
                    f"{tuple(self.train_weights.shape)}; they must match ([N, D])"
                )
        self.eval_weights = eval_weights
        self.folds: Tensor | None = None

    @staticmethod
    def _check(name: str, w: Tensor) -> Tensor:
        if not isinstance(w, Tensor):
            raise TypeError(f"{name} must be a tensor [N, D], got {type(w).__name__}")
        if w.dim() != 2:
            raise ValueError(f"{name} must have shape [N, D], got {tuple(w.shape)}")
        if w.dtype != torch.bool and bool((w < 0).any()):
            bad = int((w < 0).any(dim=1).nonzero()[0])
            raise ValueError(f"{name} has negative weights for model {bad}")
        return w

    # ------------------------------------------------------------------ constructors
    @classmethod
    def kfold(
        cls,
        k: int,
        dataset_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        isolate_inputs: bool = True,
    ) -> DataRouter:
        """k models for k-fold cross-validation: model f trains on every fold but f and is
        evaluated on fold f. ``router.folds`` holds the ``[D]`` fold of each sample."""
        folds = kfold_assignments(k, dataset_size, shuffle=shuffle, seed=seed)
        held_out = folds.unsqueeze(0) == torch.arange(k).unsqueeze(1)  # [k, D]
        router = cls(~held_out, held_out, isolate_inputs=isolate_inputs)
        router.folds = folds
        return router

    @classmethod
    def bootstrap(
        cls, n_models: int, dataset_size: int, seed: int = 0, *, isolate_inputs: bool = True
    ) -> DataRouter:
        """``n_models`` bagging members: model i weights sample d by how often it was drawn
        in its bootstrap resample (:func:`bootstrap_counts`); its out-of-bag samples (never
        drawn) are its evaluation set."""
        counts = bootstrap_counts(n_models, dataset_size, seed)
        return cls(counts, counts == 0, isolate_inputs=isolate_inputs)

    # ------------------------------------------------------------------ properties
    @property
    def num_models(self) -> int:
        """N, the number of models routed."""
        return int(self.train_weights.shape[0])

    @property
    def dataset_size(self) -> int:
        """D, the number of samples in the dataset."""
        return int(self.train_weights.shape[1])

    def to(self, device: torch.device | str) -> DataRouter:
        """Move the weight tables to ``device`` (in place); returns ``self``."""
        self.train_weights = self.train_weights.to(device)
        if self.eval_weights is not None:
            self.eval_weights = self.eval_weights.to(device)
        return self

    def subset(self, positions: Sequence[int]) -> DataRouter:
        """A router for the models at ``positions`` (e.g. after ``batch.keep_positions``)."""
        index = torch.as_tensor(list(positions), dtype=torch.long)
        sub = DataRouter(
            self.train_weights[index.to(self.train_weights.device)],
            None
            if self.eval_weights is None
            else self.eval_weights[index.to(self.eval_weights.device)],
            isolate_inputs=self.isolate_inputs,
        )
        sub.folds = self.folds
        return sub

    # ------------------------------------------------------------------ lookups
    def _lookup(self, table: Tensor, indices: Tensor) -> Tensor:
        if not isinstance(indices, Tensor) or indices.dim() != 1:
            raise ValueError(
                "sample indices must be a [B] tensor of dataset indices (wrap the dataset in "
                f"modelbatch.data.IndexedDataset), got {indices!r}"
            )
        if indices.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"sample indices must be integers, got dtype {indices.dtype}")
        indices = indices.to(table.device, non_blocking=True)
        return table.index_select(1, indices.long())

    def train_mask(self, indices: Tensor) -> Tensor:
        """``[N, B]`` training weights of the samples with dataset indices ``[B]``."""
        return self._lookup(self.train_weights, indices)

    def eval_mask(self, indices: Tensor) -> Tensor:
        """``[N, B]`` held-out weights of the samples with dataset indices ``[B]``."""
        if self.eval_weights is None:
            raise ValueError("this router has no eval_weights (held-out samples)")
        return self._lookup(self.eval_weights, indices)

    def check_batch(self, batch: ModelBatch) -> None:
        """Raise a ValueError unless the router has one row per model of ``batch``."""
        if self.num_models != len(batch):
            raise ValueError(
                f"the router has weights for {self.num_models} models, the batch holds "
                f"{len(batch)}; use router.subset(positions) after dropping models"
            )

    def __repr__(self) -> str:
        kind = self.train_weights.dtype
        return f"DataRouter(N={self.num_models}, D={self.dataset_size}, weights={kind})"


def _keep_mask(mask: Tensor, like: Tensor) -> Tensor:
    """``[N, B, 1, ...]`` bool: where model i is routed sample b, broadcastable over ``like``
    (``[N, B, ...]`` or ``[1, B, ...]``)."""
    if mask.dim() != 2:
        raise ValueError(f"mask must have shape [N, B], got {tuple(mask.shape)}")
    keep = mask.ne(0).to(like.device, non_blocking=True)
    return keep.view(*keep.shape, *([1] * (like.dim() - 2)))


def route_inputs(x: Any, mask: Tensor, *, per_model: bool = False) -> Any:
    """Per-model inputs ``[N, B, ...]`` in which model i sees sample b only if it is routed
    to it (``mask[i, b] != 0``) and zeros otherwise.

    Args:
        x: shared inputs ``[B, ...]`` (or per-model ``[N, B, ...]`` with ``per_model``).
            Anything but a tensor is returned unchanged (it cannot be masked).
        mask: ``[N, B]`` routing weights (bool, counts or floats).
        per_model: whether ``x`` already has the leading N dimension.

    Returns:
        ``[N, B, ...]`` tensor to pass with ``per_model=True`` (``x`` itself if not a tensor).
    """
    if not isinstance(x, Tensor):
        return x
    xs = x if per_model else x.unsqueeze(0)
    if xs.dim() < 2 or xs.shape[1] != mask.shape[-1]:
        raise ValueError(
            f"inputs of shape {tuple(x.shape)} do not match the [N, B] = "
            f"{list(mask.shape)} routing mask (per_model={per_model})"
        )
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    return torch.where(_keep_mask(mask, xs), xs, zero)


def route_targets(
    outputs: Tensor, targets: Any, mask: Tensor, per_model_targets: bool | None = None
) -> tuple[Any, bool | None]:
    """Floating targets masked per model like :func:`route_inputs` (a NaN target of a
    sample model i is not routed cannot reach model i's loss or gradient).

    Returns ``(targets, per_model_targets)`` to pass on to
    :meth:`ModelBatch.compute_loss`: ``[N, B, ...]`` targets and ``True`` for floating
    targets; integer targets (class indices) unchanged.
    """
    if not isinstance(targets, Tensor) or not targets.is_floating_point():
        return targets, per_model_targets
    from modelbatch.core import _targets_are_per_model

    per = _targets_are_per_model(outputs, targets, per_model_targets)
    ys = targets if per else targets.unsqueeze(0)
    zero = torch.zeros((), dtype=targets.dtype, device=targets.device)
    return torch.where(_keep_mask(mask, ys), ys, zero), True


@contextmanager
def skip_models_without_samples(batch: ModelBatch, mask: Tensor) -> Iterator[None]:
    """Within the block, models whose ``[N, B]`` mask row is all zero are inactive.

    Wrap ``optimizer.step()`` in it: a model with no sample in a batch does not step (its
    parameters, optimizer state and step count stay unchanged), as when trained alone it
    never sees that batch. The ``active`` mask is restored on exit.
    """
    has_data = mask.ne(0).any(dim=1).to(batch.active.device)
    saved = batch.active.clone()
    batch.active.copy_(saved & has_data)
    try:
        yield
    finally:
        batch.active.copy_(saved)


@contextmanager
def routed_batch_norm(mask: Tensor) -> Iterator[None]:
    """Within the block, training-mode BatchNorm layers of a ModelBatch compute each model's
    statistics over its routed samples only.

    Args:
        mask: the step's ``[N, B]`` routing weights (bool, counts or float weights), on the
            batch's device: ``router.train_mask(index)``.

    For model i, a BatchNorm layer in training mode then normalises with the mean and
    (biased) variance of the samples with ``mask[i, b] != 0``, each counted ``mask[i, b]``
    times, and updates its running statistics with them (unbiased variance with
    ``n = sum_b mask[i, b] * spatial size``): exactly as model i trained alone on its
    selected samples (repeated by their counts). Models whose row is all zero keep their
    running statistics and ``num_batches_tracked``. Outputs of samples a model is not
    routed are finite and meaningless (their loss weight is 0). Eval mode is unaffected.
    :func:`modelbatch.train_one_epoch` enters it around the forward of every routed step;
    a hand-written loop wraps its forward the same way. The layer's batch dimension must
    be the loader's B (a model that reshapes ``[B, T, C]`` to ``[B*T, C]`` before a
    BatchNorm is refused with an error).
    """
    from modelbatch.layers.batchnorm import _ROUTING, RoutedWeights

    token = _ROUTING.set(RoutedWeights(mask))
    try:
        yield
    finally:
        _ROUTING.reset(token)


def _to_device(x: Any, device: torch.device) -> Any:
    """Tensors, and lists/tuples of them, copied to ``device`` (asynchronously if possible)."""
    if isinstance(x, Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, (list, tuple)):
        return type(x)(_to_device(v, device) for v in x)
    return x


@torch.no_grad()
def evaluate_held_out(
    batch: ModelBatch,
    loader: Iterable[Any],
    router: DataRouter,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    *,
    per_model: bool = False,
) -> dict[str, Tensor]:
    """Evaluate each model on its own held-out samples (k-fold validation fold, or
    bootstrap out-of-bag samples), in eval mode.

    Args:
        batch: the ModelBatch (its N must match the router's).
        loader: yields ``(x, y, index)`` (see :class:`IndexedDataset`); usually over the
            whole dataset, unshuffled.
        router: gives the ``[N, B]`` held-out weights (:meth:`DataRouter.eval_mask`).
        loss_fn: optional single-model loss with mean reduction.
        per_model: whether ``x`` is ``[N, B, ...]``.

    Returns:
        ``{"accuracy": [N], "count": [N], "loss": [N]}`` CPU float64 tensors: the weighted
        fraction of held-out samples whose argmax prediction equals the integer target, the
        total held-out weight, and (with ``loss_fn``) the weighted mean held-out loss. A
        model with no held-out sample gets NaN.
    """
    router.check_batch(batch)
    was_training = batch.training
    batch.eval()
    device = batch.device
    n = len(batch)
    correct = torch.zeros(n, dtype=torch.float64, device=device)
    loss_sum = torch.zeros(n, dtype=torch.float64, device=device)
    weight = torch.zeros(n, dtype=torch.float64, device=device)
    try:
        for item in loader:
            x, y, idx = item
            x, y = _to_device(x, device), _to_device(y, device)
            w = router.eval_mask(idx).to(device=device, dtype=torch.float64)
            x_model = per_model
            if router.isolate_inputs and isinstance(x, Tensor):
                x, x_model = route_inputs(x, w, per_model=per_model), True
            out = batch(x, per_model=x_model)
            hit = (out.argmax(dim=-1) == y).double()  # [N, B]
            correct += (hit * w).sum(dim=1)
            total_w = w.sum(dim=1)
            if loss_fn is not None:
                y_loss, per_t = (
                    route_targets(out, y, w) if router.isolate_inputs else (y, None)
                )
                batch.compute_loss(out, y_loss, loss_fn, mask=w, per_model_targets=per_t)
                assert batch.latest_losses is not None
                loss_sum += batch.latest_losses.double() * total_w
            weight += total_w
    finally:
        batch.train(was_training)
    nan = torch.full_like(weight, float("nan"))
    safe = weight.clamp_min(1e-300)
    result = {
        "accuracy": torch.where(weight > 0, correct / safe, nan).cpu(),
        "count": weight.cpu(),
    }
    if loss_fn is not None:
        result["loss"] = torch.where(weight > 0, loss_sum / safe, nan).cpu()
    return result
