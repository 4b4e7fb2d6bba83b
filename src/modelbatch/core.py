"""The batched-model engine: N structurally identical models as one vectorised ``nn.Module``.

Shapes used throughout: ``N`` = number of models in the batch, ``B`` = samples per step.
"""

from __future__ import annotations

import copy
import operator
import os
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from modelbatch._flat import FlatParams, flatten_parameters, select_models
from modelbatch._structure import check_same_structure
from modelbatch.layers import substitute_layers

if TYPE_CHECKING:
    from modelbatch.optim.base import BatchOptimizer

__all__ = ["ModelBatch"]

LossFn = Callable[[Tensor, Tensor], Tensor]


def _split_name(name: str) -> tuple[str, str]:
    module_path, _, attr = name.rpartition(".")
    return module_path, attr


def _vmapped_forward(
    stacked: nn.Module,
    randomness: str,
    x_dims: tuple[int | None, ...],
    kwargs: dict[str, Any],
    params: dict[str, Tensor],
    buffers: dict[str, Tensor],
    *inputs: Any,
) -> Any:
    """vmap of ``functional_call(stacked, ...)`` over the stacked ``[N, ...]`` tensors."""

    def one_model(p: dict[str, Tensor], b: dict[str, Tensor], *xs: Any) -> Any:
        return functional_call(stacked, (p, b), xs, kwargs)

    return vmap(one_model, in_dims=(0, 0, *x_dims), randomness=randomness)(params, buffers, *inputs)


def _targets_are_per_model(outputs: Tensor, targets: Tensor) -> bool:
    """Whether ``targets`` are per-model ``[N, B, ...]`` rather than shared ``[B, ...]``,
    for outputs ``[N, B, ...]`` (see :meth:`ModelBatch.compute_loss`)."""
    n = outputs.shape[0]
    b = outputs.shape[1] if outputs.dim() > 1 else None
    can_share = targets.dim() >= 1 and targets.shape[0] == b
    can_per_model = targets.dim() >= 2 and targets.shape[0] == n and targets.shape[1] == b
    if can_share != can_per_model:
        return can_per_model
    if not can_share:  # fits neither: leave the targets whole, as loss_fn expects them
        return False
    # N == B: a per-model target has one dimension more than the shared target would.
    shared_rank = outputs.dim() - (1 if targets.is_floating_point() else 2)
    return targets.dim() == shared_rank + 1


class ModelBatch(nn.Module):
    """N structurally identical models trained as one vectorised module.

    Every parameter and buffer of the N models is stacked along a new leading dimension
    and registered on this module (under ``stacked.<original name>``), so the usual
    ``nn.Module`` machinery (``.parameters()``, ``.to()``, ``.train()``, ``state_dict()``)
    works. The forward pass runs all models at once with :func:`torch.func.vmap` over
    :func:`torch.func.functional_call`.

    Args:
        models: the N models. They must have the same module tree, parameter names,
            shapes, dtypes and devices. Their weights are copied; the originals are not
            modified or referenced afterwards.
        lr: optional per-model learning rates (a float or a length-N list). With ``lr``
            or ``optimizer_cls`` given, the batch also builds its optimizer, as
            ``batch.optimizer``, through :class:`modelbatch.OptimizerFactory` (a shortcut
            for ``modelbatch.optim.SGD(batch, lr=...)`` and the like).
        optimizer_cls: optimizer class for that shortcut (default ``torch.optim.SGD``),
            e.g. ``torch.optim.Adam`` or ``modelbatch.optim.AdamW``.
        optimizer_kwargs: further hyper-parameters (scalars or length-N lists).
        model_ids: stable names for the models (default ``0..N-1``). They stay attached
            to each model when models are dropped from the batch.
        randomness: vmap randomness mode for random ops such as dropout. ``"different"``
            (default) draws an independent mask per model; ``"same"`` shares one.
        seeds: optional per-model seeds (non-negative ints, one per model). With seeds, the
            dropout layers draw model i's masks from ``seeds[i]`` and its own call counter
            only, so they do not depend on N or on the other models (see
            :mod:`modelbatch.layers.dropout`); build the models with
            :func:`modelbatch.seeded_models` for N-independent initialisation too.
        conv_layout: ``"default"`` keeps vmap's lowering of ``nn.Conv2d`` (an NCHW grouped
            convolution). ``"channels_last"`` (opt-in, experimental) runs every exact
            ``nn.Conv2d`` as one channels_last grouped convolution over the N models (see
            :mod:`modelbatch.layers.conv`); same results up to summation order.

    Example:
        >>> models = [nn.Linear(4, 2) for _ in range(8)]
        >>> batch = ModelBatch(models)
        >>> batch(torch.randn(16, 4)).shape          # shared input [B, ...]
        torch.Size([8, 16, 2])
    """

    stacked: nn.Module
    active: Tensor
    _template: nn.Module
    _compiled_forward: Callable[..., Any] | None = None

    def __init__(
        self,
        models: Sequence[nn.Module],
        lr: float | Sequence[float] | None = None,
        optimizer_cls: type[torch.optim.Optimizer] | None = None,
        optimizer_kwargs: Mapping[str, Any] | None = None,
        *,
        model_ids: Sequence[int | str] | None = None,
        randomness: str = "different",
        seeds: Sequence[int] | None = None,
        conv_layout: str = "default",
    ) -> None:
        super().__init__()
        models = list(models)
        check_same_structure(models)
        if randomness not in ("different", "same"):
            raise ValueError(f"randomness must be 'different' or 'same', got {randomness!r}")
        if conv_layout not in ("default", "channels_last"):
            raise ValueError(
                f"conv_layout must be 'default' or 'channels_last', got {conv_layout!r}"
            )
        n = len(models)
        if model_ids is None:
            model_ids = list(range(n))
        model_ids = list(model_ids)
        if len(model_ids) != n:
            raise ValueError(f"model_ids has {len(model_ids)} entries for {n} models")
        if len(set(model_ids)) != n:
            raise ValueError(f"model_ids must be unique, got {model_ids}")
        for mid in model_ids:
            if not isinstance(mid, (int, str)):
                raise TypeError(f"model ids must be int or str, got {type(mid).__name__}")

        self.randomness = randomness
        self._model_ids: list[int | str] = model_ids
        # A pristine copy of one model: extract() clones it and fills in model i's tensors.
        template = copy.deepcopy(models[0])
        object.__setattr__(self, "_template", template)

        # The mirror module holds the stacked tensors under the original names. Its forward
        # is only ever called through functional_call, with one model's slice of each tensor.
        mirror = copy.deepcopy(models[0])
        self._stack_into(mirror, models)
        if seeds is not None:
            from modelbatch.seeding import check_seeds

            seeds = check_seeds(seeds, n)
        self.seeds: list[int] | None = seeds
        device = next(iter([*mirror.parameters(), *mirror.buffers()]), torch.empty(0)).device
        self.conv_layout = conv_layout
        substitute_layers(
            mirror,
            {"num_models": n, "seeds": seeds, "device": device, "conv_layout": conv_layout},
            models,
        )
        for module in mirror.modules():
            # A sparse gradient cannot be formed for a stacked [N, ...] weight ("reshape is
            # not implemented for sparse tensors"): the stacked copy computes the dense
            # gradient, the same values. extract() still returns sparse=True embeddings.
            if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.sparse:
                module.sparse = False
        self.stacked = mirror
        # One [N, P] storage per dtype/device for all parameters (see modelbatch._flat).
        self._flat: FlatParams = flatten_parameters(mirror)
        self.stacked.train(models[0].training)
        self.training = models[0].training

        self.register_buffer("active", torch.ones(n, dtype=torch.bool, device=self._device()))
        self.latest_losses: Tensor | None = None
        self._extra_metrics: dict[str, Tensor] = {}
        self._optimizers: list[weakref.ref[BatchOptimizer]] = []

        self.optimizer: torch.optim.Optimizer | None = None
        if optimizer_cls is not None or lr is not None:
            from modelbatch.optim.factory import OptimizerFactory

            kwargs = dict(optimizer_kwargs or {})
            if lr is not None:
                kwargs["lr"] = lr
            self.optimizer = OptimizerFactory(optimizer_cls or torch.optim.SGD, **kwargs).build(
                self
            )

    # ------------------------------------------------------------------ construction
    @staticmethod
    def _stack_into(mirror: nn.Module, models: Sequence[nn.Module]) -> None:
        """Replace every parameter and buffer of ``mirror`` by the stack over ``models``.

        Tied parameters (the same tensor reachable under two names) stay tied.
        """
        per_model_modules = [dict(m.named_modules()) for m in models]
        replaced: dict[int, Tensor] = {}
        for mod_name, module in mirror.named_modules():
            for kind in ("_parameters", "_buffers"):
                store: dict[str, Tensor | None] = getattr(module, kind)
                for attr, value in list(store.items()):
                    if value is None:
                        continue
                    key = id(value)
                    if key not in replaced:
                        tensors = [getattr(mods[mod_name], attr) for mods in per_model_modules]
                        with torch.no_grad():
                            data = torch.stack([t.detach() for t in tensors]).contiguous()
                        if kind == "_parameters":
                            replaced[key] = nn.Parameter(data, requires_grad=value.requires_grad)
                        else:
                            replaced[key] = data
                    store[attr] = replaced[key]

    # ------------------------------------------------------------------ basic properties
    def __len__(self) -> int:
        """N, the number of models currently in the batch."""
        return len(self._model_ids)

    @property
    def num_models(self) -> int:
        """N, the number of models currently in the batch."""
        return len(self._model_ids)

    # ------------------------------------------------------------------ copy, pickle, .to()
    def __getstate__(self) -> dict[str, Any]:
        # Weak references cannot be copied or pickled: optimizers, scalers and callback packs
        # register themselves again with the copied batch (see their ``__setstate__``).
        state = self.__dict__.copy()
        state.pop("_optimizers", None)
        state.pop("_all_active_cache", None)
        state.pop("_call_cache", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # Registrations made while the state was being restored are already in __dict__.
        self.__dict__.setdefault("_optimizers", [])
        # copy.deepcopy and pickle copy each parameter on its own: put them back into one
        # flat storage (the Parameter objects are kept).
        self._flat_storage()

    def _call_tensors(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``(named parameters, named buffers)`` of the stacked module for the forward,
        cached: rebuilt only when a parameter or buffer was replaced (checked in O(number of
        tensors) with identity tests, without walking the module tree)."""
        cache = self.__dict__.get("_call_cache")
        if cache is not None:
            params, buffers, places = cache
            if all(store.get(attr) is t for store, attr, t in places):
                return params, buffers
        params = dict(self.stacked.named_parameters())
        buffers = dict(self.stacked.named_buffers())
        places = []
        for name, t in [*params.items(), *buffers.items()]:
            mod_path, attr = _split_name(name)
            module = self.stacked.get_submodule(mod_path)
            store = module._parameters if name in params else module._buffers
            places.append((store, attr, t))
        self.__dict__["_call_cache"] = (params, buffers, places)
        return params, buffers

    def _flat_storage(self, check: bool = True) -> FlatParams:
        """The flat ``[N, P]`` parameter storage, rebuilt first if some parameter no longer
        lives in it (``.to()``, a copy, an assignment to ``.data`` or of a new Parameter).
        ``check=False`` (each optimizer step): only a cheap check of one parameter per
        storage, O(1) in N and in the number of parameters."""
        flat = self.__dict__.get("_flat")
        if flat is not None and not check and flat.roughly_intact():
            return flat
        if flat is None or not flat.intact(self.stacked):
            flat = flatten_parameters(self.stacked, flat)
            self.__dict__["_flat"] = flat
        return flat

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> ModelBatch:
        """``.to()``, ``.cuda()``, ``.double()``, ...: the stacked tensors move as usual; the
        template (for :meth:`extract` / :meth:`insert`) and the state of every optimizer and
        scaler built on this batch follow them to the new device and floating dtype."""
        super()._apply(fn, recurse)
        self._template._apply(fn)
        self._flat_storage()  # each parameter moved on its own: one flat storage again
        for follower in self._live_optimizers():
            follow = getattr(follower, "_follow_batch", None)
            if follow is not None:
                follow()
        return self

    @property
    def model_ids(self) -> list[int | str]:
        """Stable ids of the models, in their current positions (a copy)."""
        return list(self._model_ids)

    def index_of(self, model_id: int | str) -> int:
        """Current position of the model with id ``model_id``."""
        try:
            return self._model_ids.index(model_id)
        except ValueError:
            raise KeyError(
                f"no model with id {model_id!r} in this batch; ids are {self._model_ids}"
            ) from None

    def _device(self) -> torch.device:
        for p in self.stacked.parameters():
            return p.device
        for b in self.stacked.buffers():
            return b.device
        return torch.device("cpu")

    @property
    def device(self) -> torch.device:
        """Device of the stacked tensors."""
        return self._device()

    def stacked_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``(name, [N, ...] parameter)`` pairs, named as in a single model."""
        return self.stacked.named_parameters()

    def stacked_buffers(self) -> Iterator[tuple[str, Tensor]]:
        """``(name, [N, ...] buffer)`` pairs, named as in a single model."""
        return self.stacked.named_buffers()

    def _check_index(self, i: int) -> int:
        n = len(self)
        if isinstance(i, bool):
            raise TypeError("model index must be an int, got bool")
        try:
            i = operator.index(i)  # ints, NumPy integers, 0-dim integer tensors
        except TypeError:
            raise TypeError(f"model index must be an int, got {type(i).__name__}") from None
        if not -n <= i < n:
            raise IndexError(f"model index {i} out of range for a batch of {n} models")
        return i % n

    # ------------------------------------------------------------------ forward
    def forward(self, *inputs: Any, per_model: bool = False, **kwargs: Any) -> Any:
        """Run all N models.

        Args:
            *inputs: with ``per_model=False`` (default), shared inputs ``[B, ...]`` that every
                model sees (no copy is made per model). With ``per_model=True``, per-model
                inputs ``[N, B, ...]``: model i sees ``inputs[k][i]``.
            per_model: whether tensor inputs carry a leading model dimension.
            **kwargs: further keyword arguments passed unchanged to every model.

        Returns:
            The models' outputs stacked along a leading dimension: ``[N, B, ...]`` for a model
            returning ``[B, ...]`` (tuples and dicts of tensors are stacked leaf-wise).
        """
        n = len(self)
        if per_model:
            for k, x in enumerate(inputs):
                if isinstance(x, Tensor) and (x.dim() == 0 or x.shape[0] != n):
                    raise ValueError(
                        f"per_model=True expects input {k} to have a leading dimension of "
                        f"N={n} models, got shape {tuple(x.shape)}"
                    )
        params, buffers = self._call_tensors()
        x_dims = tuple(0 if per_model and isinstance(x, Tensor) else None for x in inputs)
        run = self._compiled_forward if self._compiled_forward is not None else _vmapped_forward
        # Quarantined models' buffers (BatchNorm running statistics) must not change in a
        # training forward: run on copies and keep the old values of inactive models.
        # Skipped (no copy, no device sync) while every model is active.
        frozen = self.training and bool(buffers) and not self.all_active
        call_buffers = {k: v.clone() for k, v in buffers.items()} if frozen else buffers
        try:
            out = run(self.stacked, self.randomness, x_dims, kwargs, params, call_buffers, *inputs)
        except RuntimeError as e:
            if type(e) is not RuntimeError:
                raise
            shapes = [tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__ for x in inputs]
            expect = "[N, B, ...]" if per_model else "[B, ...], shared by every model"
            raise RuntimeError(
                f"{e}\n(in the forward pass of a ModelBatch of {n} models; input shapes "
                f"{shapes}, read as {expect}. Each model sees one [B, ...] slice: check that "
                f"a single model accepts it{'' if per_model else ', or pass per_model=True'}.)"
            ) from e
        if frozen:
            with torch.no_grad():
                for name, old in buffers.items():
                    keep = self.active.view(-1, *([1] * (old.dim() - 1)))
                    old.copy_(torch.where(keep.to(old.device), call_buffers[name], old))
        return out

    # ------------------------------------------------------------------ speed-up toggles
    def enable_compile(self, **compile_kwargs: Any) -> ModelBatch:
        """Run the vectorised forward through ``torch.compile`` from now on (returns self).

        ``compile_kwargs`` go to :func:`torch.compile` (e.g. ``mode="max-autotune"``). The
        first call per input shape compiles (seconds to minutes). See :mod:`modelbatch.speed`,
        which can also compile the optimizer update.
        """
        from modelbatch.speed import compile_forward

        self._compiled_forward = compile_forward(**compile_kwargs)
        return self

    def capture_cuda_graph(
        self,
        optimizer: torch.optim.Optimizer,
        loss_fn: LossFn,
        example_inputs: Tensor | Sequence[Tensor],
        example_targets: Tensor,
        **options: Any,
    ) -> Callable[..., Tensor]:
        """Capture forward, backward and ``optimizer.step()`` in one CUDA graph.

        Returns a callable ``step(inputs, targets) -> loss`` that copies the batch into
        static buffers and replays the graph; the shapes must stay those of the examples.
        See :class:`modelbatch.speed.CudaGraphStep` for the options and the rules.
        """
        from modelbatch.speed import CudaGraphStep

        return CudaGraphStep(self, optimizer, loss_fn, example_inputs, example_targets, **options)

    # ------------------------------------------------------------------ loss & metrics
    def compute_loss(
        self,
        outputs: Tensor,
        targets: Tensor,
        loss_fn: LossFn,
        mask: Tensor | None = None,
        *,
        per_model_targets: bool | None = None,
        reduction: str = "sum",
    ) -> Tensor:
        """Per-model losses, combined so that each model gets its training-alone gradient.

        The returned scalar is the **sum** of the N per-model losses, not their mean. The
        models share no parameters, so d(sum)/d(theta_i) = dL_i/d(theta_i): exactly the
        gradient model i would get training alone. A mean would divide every gradient by N
        (and so change each model's effective learning rate, and Adam's epsilon balance).

        Args:
            outputs: ``[N, B, ...]`` model outputs (what ``batch(x)`` returned).
            targets: ``[B, ...]`` shared targets, or ``[N, B, ...]`` per-model targets.
            loss_fn: an ordinary single-model loss ``loss_fn(output [B, ...], target [B, ...])
                -> scalar`` with mean reduction, e.g. ``F.cross_entropy``.
            mask: optional ``[N, B]`` (or ``[B]``) sample weights, bool or float. Model i's
                loss becomes ``sum_b w_ib * l_ib / sum_b w_ib`` where ``l_ib`` is ``loss_fn``
                on sample b alone: the same as training model i on the selected (or, with
                integer counts, resampled) samples. Models with an all-zero mask get loss 0.
            per_model_targets: whether ``targets`` has the leading N dimension. By default
                inferred from the shapes: targets shaped ``[N, B, ...]`` that cannot be
                shared ``[B, ...]`` targets are per-model, and vice versa. When both fit
                (N == B), the rank decides: class indices (integer) are per-model with
                ``outputs.dim() - 1`` dimensions, other targets with ``outputs.dim()``.
                Pass it explicitly when in doubt.
            reduction: ``"sum"`` (default) returns the scalar sum; ``"none"`` returns the
                differentiable ``[N]`` per-model losses (what
                :meth:`modelbatch.BatchGradScaler.scale` takes).

        Returns:
            A scalar tensor to call ``.backward()`` on (``[N]`` with ``reduction="none"``).
            The detached ``[N]`` per-model losses are stored in :attr:`latest_losses`.
        """
        n = len(self)
        if outputs.dim() == 0 or outputs.shape[0] != n:
            raise ValueError(
                f"outputs must have a leading dimension of N={n} models, "
                f"got shape {tuple(outputs.shape)}"
            )
        if per_model_targets is None:
            per_model_targets = _targets_are_per_model(outputs, targets)
        if per_model_targets and (targets.dim() == 0 or targets.shape[0] != n):
            raise ValueError(
                f"per-model targets must have a leading dimension of N={n}, "
                f"got shape {tuple(targets.shape)}"
            )
        t_dim = 0 if per_model_targets else None
        if mask is None:
            losses = vmap(loss_fn, in_dims=(0, t_dim))(outputs, targets)
        else:
            losses = self._masked_losses(outputs, targets, t_dim, loss_fn, mask)
        if losses.shape != (n,):
            raise ValueError(
                f"loss_fn must return a scalar per model; got per-model shape "
                f"{tuple(losses.shape[1:])}. Use a reduction such as 'mean'."
            )
        self.latest_losses = losses.detach()
        if reduction == "none":  # the [N] per-model losses (e.g. for BatchGradScaler.scale)
            return losses
        if reduction != "sum":
            raise ValueError(f"reduction must be 'sum' or 'none', got {reduction!r}")
        return losses.sum()

    def _masked_losses(
        self, outputs: Tensor, targets: Tensor, t_dim: int | None, loss_fn: LossFn, mask: Tensor
    ) -> Tensor:
        n, b = outputs.shape[0], outputs.shape[1]
        if mask.dim() == 1:
            mask = mask.unsqueeze(0).expand(n, -1)
        if mask.shape != (n, b):
            raise ValueError(
                f"mask must have shape [N, B] = [{n}, {b}] (or [B]), got {tuple(mask.shape)}"
            )
        weights = mask.to(outputs.dtype)

        def per_sample(o: Tensor, t: Tensor) -> Tensor:
            return loss_fn(o.unsqueeze(0), t.unsqueeze(0))

        per_sample_over_b = vmap(per_sample, in_dims=(0, 0))
        sample_losses = vmap(per_sample_over_b, in_dims=(0, t_dim))(outputs, targets)  # [N, B]
        denom = weights.sum(dim=1)
        return (sample_losses * weights).sum(dim=1) / denom.clamp_min(torch.finfo(denom.dtype).tiny)

    def log_metric(self, name: str, values: Tensor | Sequence[float]) -> None:
        """Record a per-model metric (``[N]`` values) to be reported by :meth:`metrics`."""
        t = torch.as_tensor(values).detach()
        if t.shape != (len(self),):
            raise ValueError(
                f"metric {name!r} needs one value per model, shape [{len(self)}], "
                f"got {tuple(t.shape)}"
            )
        self._extra_metrics[name] = t

    def metrics(self) -> list[dict[str, Any]]:
        """One dict per model: its id, position, whether it is active, its latest loss and
        every metric recorded with :meth:`log_metric`. Values are Python numbers."""
        columns: dict[str, list[Any]] = {}
        if self.latest_losses is not None:
            columns["loss"] = self.latest_losses.float().cpu().tolist()
        for name, values in self._extra_metrics.items():
            columns[name] = values.cpu().tolist()
        active = self.active.cpu().tolist()
        out = []
        for i, mid in enumerate(self._model_ids):
            row: dict[str, Any] = {"model_id": mid, "index": i, "active": bool(active[i])}
            for name, col in columns.items():
                row[name] = col[i]
            out.append(row)
        return out

    # ------------------------------------------------------------------ extract / insert
    def extract(self, i: int) -> nn.Module:
        """A standalone copy of model ``i`` (position, not id) with its current weights and
        buffers, on the batch's device and in the batch's train/eval mode."""
        i = self._check_index(i)
        template = self._template
        module = copy.deepcopy(template)
        stacked = dict(self.stacked.named_parameters(remove_duplicate=False))
        stacked_b = dict(self.stacked.named_buffers(remove_duplicate=False))
        # Tied tensors (one tensor under two names, e.g. embeddings and LM head) stay tied.
        params: dict[int, nn.Parameter] = {}
        buffers: dict[int, Tensor] = {}
        with torch.no_grad():
            for name, p in module.named_parameters(remove_duplicate=False):
                mod_path, attr = _split_name(name)
                sub = module.get_submodule(mod_path)
                if id(p) not in params:
                    params[id(p)] = nn.Parameter(
                        stacked[name][i].detach().clone(), requires_grad=p.requires_grad
                    )
                sub._parameters[attr] = params[id(p)]
            for name, b in module.named_buffers(remove_duplicate=False):
                mod_path, attr = _split_name(name)
                sub = module.get_submodule(mod_path)
                if id(b) not in buffers:
                    buffers[id(b)] = stacked_b[name][i].detach().clone()
                sub._buffers[attr] = buffers[id(b)]
        module.train(self.training)
        return module

    def extract_all(self) -> list[nn.Module]:
        """Standalone copies of all N models, in position order."""
        return [self.extract(i) for i in range(len(self))]

    def insert(self, i: int, module: nn.Module) -> None:
        """Write ``module``'s weights and buffers into slot ``i`` (position).

        The module must have the batch's architecture; optimizer state is left unchanged.
        """
        i = self._check_index(i)
        template = self._template
        try:
            check_same_structure([template, module])
        except ValueError as e:
            message = str(e).replace("model 1", "the module")
            raise type(e)(f"cannot insert into slot {i}: {message}") from None
        src = dict(module.named_parameters())
        src_b = dict(module.named_buffers())
        with torch.no_grad():
            for name, p in self.stacked.named_parameters():
                p[i].copy_(src[name])
            for name, b in self.stacked.named_buffers():
                if name in src_b:  # batch-only buffers (e.g. dropout counters) stay
                    b[i].copy_(src_b[name])

    # ------------------------------------------------------------------ checkpoints
    def save_all(
        self, directory: str | os.PathLike[str], optimizer: Any = None, **kwargs: Any
    ) -> Any:
        """Save every model (one folder per id), atomically: see
        :func:`modelbatch.checkpoint.save_all` (``scheduler=``, ``scaler=``, ``step=``,
        ``extra=``)."""
        from modelbatch.checkpoint import save_all

        return save_all(self, directory, optimizer=optimizer, **kwargs)

    def load_all(
        self, directory: str | os.PathLike[str], optimizer: Any = None, **kwargs: Any
    ) -> dict[str, Any]:
        """Load a checkpoint into this batch, checking it first: see
        :func:`modelbatch.checkpoint.load_all` (``scheduler=``, ``scaler=``, ``model_ids=``,
        ...)."""
        from modelbatch.checkpoint import load_all

        return load_all(self, directory, optimizer=optimizer, **kwargs)

    # ------------------------------------------------------------------ optimizers & shrinking
    def _register_optimizer(self, optimizer: BatchOptimizer) -> None:
        # Through __dict__: this also runs on a half-restored batch (copy.deepcopy, pickle).
        refs = self.__dict__.get("_optimizers", [])
        refs = [r for r in refs if r() is not None and r() is not optimizer]
        refs.append(weakref.ref(optimizer))
        self.__dict__["_optimizers"] = refs

    def _live_optimizers(self) -> list[BatchOptimizer]:
        refs = self.__dict__.get("_optimizers", [])
        return [o for o in (r() for r in refs) if o is not None]

    def _positions(self, ids: int | str | Iterable[int | str]) -> list[int]:
        """Current positions of the models with these ids (one dict lookup per id)."""
        ids_list = [ids] if isinstance(ids, (int, str)) else list(ids)
        where = {mid: i for i, mid in enumerate(self._model_ids)}
        out = []
        for mid in ids_list:
            pos = where.get(mid)
            if pos is None:
                self.index_of(mid)  # raises the KeyError naming the id
            out.append(where[mid])
        return out

    def _set_active(self, ids: int | str | Iterable[int | str], value: bool) -> None:
        positions = self._positions(ids)
        if positions:
            index = torch.tensor(positions, dtype=torch.long, device=self.active.device)
            self.active.index_fill_(0, index, value)

    def quarantine(self, ids: int | str | Iterable[int | str]) -> None:
        """Freeze the models with these ids: from now on their parameters, buffers and
        optimizer state stop changing. Other models are not affected."""
        self._set_active(ids, False)

    def unquarantine(self, ids: int | str | Iterable[int | str]) -> None:
        """Let quarantined models train again."""
        self._set_active(ids, True)

    @property
    def all_active(self) -> bool:
        """True when no model is quarantined.

        Reads the ``[N]`` mask (one device sync) only when it changed since the last call:
        the answer is cached against the mask tensor and its in-place version counter.
        """
        active = self.active
        try:
            version = active._version
        except RuntimeError:  # inference tensors have no version counter
            return bool(active.all())
        cache = self.__dict__.get("_all_active_cache")
        if cache is not None and cache[0] is active and cache[1] == version:
            return bool(cache[2])
        value = bool(active.all())
        self.__dict__["_all_active_cache"] = (active, version, value)
        return value

    def drop(self, ids: int | str | Iterable[int | str], *, schedulers: Iterable[Any] = ()) -> None:
        """Remove models (by id) from the batch, so later steps cost less.

        Stacked parameters, buffers, the ``active`` mask and the state and param groups of
        every vectorised optimizer built on this batch shrink accordingly. Model ids are
        stable; positions of the remaining models may change. Gradients are discarded.

        LR schedulers keep per-model lists (``base_lrs``, ``LambdaLR.lr_lambdas``, ...) that
        are not reachable from the optimizer: pass them as ``schedulers`` so they shrink too
        (see :func:`modelbatch.isolation.shrink_scheduler`); otherwise a later
        ``scheduler.step()`` would give the remaining models other models' learning rates.
        """
        drop_pos = set(self._positions(ids))
        if len(drop_pos) == len(self):
            raise ValueError("cannot drop every model from the batch")
        keep = [i for i in range(len(self)) if i not in drop_pos]
        self.keep_positions(keep, schedulers=schedulers)

    def keep_positions(self, keep: Sequence[int], *, schedulers: Iterable[Any] = ()) -> None:
        """Keep only the models at positions ``keep`` (in that order); ``schedulers`` are LR
        schedulers of this batch's optimizers whose per-model lists shrink alike."""
        n = len(self)
        keep = [self._check_index(i) for i in keep]
        if not keep:
            raise ValueError("cannot drop every model from the batch")
        if len(set(keep)) != len(keep):
            raise ValueError(f"keep_positions got repeated positions: {list(keep)}")
        index = torch.tensor(keep, device=self.device, dtype=torch.long)
        with torch.no_grad():
            # Parameters: one index_select per flat [N, P] storage (gradients are dropped).
            self._flat = select_models(self.stacked, self._flat_storage(), index)
            replaced: dict[int, Tensor] = {}
            for _, module in self.stacked.named_modules():
                store = module._buffers
                for attr, value in list(store.items()):
                    if value is None:
                        continue
                    if id(value) not in replaced:
                        replaced[id(value)] = value.detach().index_select(
                            0, index.to(value.device)
                        )
                    store[attr] = replaced[id(value)]
            self.active = self.active.index_select(0, index)
        if self.latest_losses is not None and self.latest_losses.shape[0] == n:
            self.latest_losses = self.latest_losses.index_select(
                0, index.to(self.latest_losses.device)
            )
        self._extra_metrics = {
            k: v.index_select(0, index.to(v.device))
            for k, v in self._extra_metrics.items()
            if v.shape[0] == n
        }
        self._model_ids = [self._model_ids[i] for i in keep]
        if self.seeds is not None:
            self.seeds = [self.seeds[i] for i in keep]
        for opt in self._live_optimizers():
            opt._keep_positions(keep)
        if schedulers:
            from modelbatch.isolation import shrink_scheduler

            for sched in schedulers:
                shrink_scheduler(sched, keep, n)
