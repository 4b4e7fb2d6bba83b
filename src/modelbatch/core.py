"""The batched-model engine: N structurally identical models as one vectorised ``nn.Module``.

Shapes used throughout: ``N`` = number of models in the batch, ``B`` = samples per step.
"""

from __future__ import annotations

import json
import operator
import os
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.func import vmap

from modelbatch._flat import FlatParams, flatten_parameters, select_models
from modelbatch._forward_errors import check_inputs, check_outputs, explain_forward_error
from modelbatch._functional import (
    CallPlan,
    OutputLayout,
    call_with_tensors,
    checkpoint_runs_directly,
    no_fused_transformer_path,
)
from modelbatch._structure import (
    ArchitectureMismatchError,
    check_per_model_settings,
    check_same_structure,
    model_settings,
    same_setting,
)
from modelbatch.layers import substitute_layers
from modelbatch.layers.conv import ChannelsLastViews
from modelbatch.layers.parametrize import comparable_copy, copy_model, refresh_computed_weights

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
) -> tuple[Any, dict[str, Tensor]]:
    """vmap over the stacked ``[N, ...]`` tensors of one model's forward.

    Returns ``(outputs, reassigned)``: the stacked outputs, and the ``[N, ...]`` new values
    of the buffers that forward re-assigned (see :mod:`modelbatch._functional`).
    """
    plan = CallPlan.for_module(stacked, params, buffers)
    layout = OutputLayout()

    def one_model(p: dict[str, Tensor], b: dict[str, Tensor], *xs: Any) -> Any:
        out, reassigned = call_with_tensors(stacked, plan, p, b, xs, kwargs)
        return layout.split(out), reassigned

    with checkpoint_runs_directly(), no_fused_transformer_path():
        tensors, reassigned = vmap(one_model, in_dims=(0, 0, *x_dims), randomness=randomness)(
            params, buffers, *inputs
        )
    return layout.join(tensors), reassigned


def _write_back_buffers(
    reassigned: Mapping[str, Tensor], buffers: Mapping[str, Tensor], active: Tensor | None
) -> None:
    """Copy the ``[N, ...]`` new values of buffers that forward re-assigned into the
    stacked buffers (detached: the value a model alone would keep); with ``active`` (an
    ``[N]`` bool mask) only into the active models' slices."""
    with torch.no_grad():
        for name, new in reassigned.items():
            old = buffers[name]
            if new.shape != old.shape or new.dtype != old.dtype:
                raise RuntimeError(
                    f"buffer {name!r} was re-assigned in forward with per-model shape "
                    f"{tuple(new.shape[1:])} and dtype {new.dtype}; it has shape "
                    f"{tuple(old.shape[1:])} and dtype {old.dtype}. A ModelBatch keeps each "
                    "buffer as one [N, ...] tensor: keep its shape and dtype"
                )
            if active is not None:
                keep = active.view(-1, *([1] * (old.dim() - 1))).to(old.device)
                new = torch.where(keep, new, old)
            old.copy_(new)


def _targets_are_per_model(
    outputs: Tensor, targets: Tensor, per_model_targets: bool | None = None
) -> bool:
    """Whether ``targets`` are per-model ``[N, B, ...]`` rather than shared ``[B, ...]``, for
    outputs ``[N, B, ...]``; the rule of :meth:`ModelBatch.compute_loss` (never a guess: see
    :func:`modelbatch.loss.resolve_per_model_targets`)."""
    from modelbatch.loss import resolve_per_model_targets

    return resolve_per_model_targets(outputs, targets, per_model_targets)


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
        check_same_structure(models, model_ids=model_ids)

        self.randomness = randomness
        self._model_ids: list[int | str] = model_ids
        # Each model's own per-model settings (dropout p, norm eps, ...), in position order:
        # extract() gives them back; keep_positions() keeps them in step.
        self._model_settings: list[dict[str, dict[str, Any]]] = [model_settings(m) for m in models]
        # A pristine copy of one model: extract() clones it and fills in model i's tensors.
        template = copy_model(models[0])
        object.__setattr__(self, "_template", template)

        # The mirror module holds the stacked tensors under the original names. Its forward
        # is only ever called through modelbatch._functional.call_with_tensors, with one
        # model's slice of each tensor.
        mirror = copy_model(models[0])
        self._stack_into(mirror, models)
        if seeds is not None:
            from modelbatch.seeding import check_seeds

            seeds = check_seeds(seeds, n)
        self.seeds: list[int] | None = seeds
        device = next(iter([*mirror.parameters(), *mirror.buffers()]), torch.empty(0)).device
        self.conv_layout = conv_layout
        mirror = substitute_layers(
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
        check_per_model_settings(mirror, self._model_settings, model_ids)
        if next(iter([*mirror.parameters(), *mirror.buffers()]), None) is None:
            # A model without tensors (a bare nn.Dropout): vmap needs one tensor with the
            # model dimension to map over. Batch-only and not saved (non-persistent).
            mirror.register_buffer("_model_index", torch.arange(n, device=device), persistent=False)
        # The mirror is a copy of model 0: per-submodule train/eval modes (a frozen BatchNorm
        # in eval inside a training model) are kept; the check made them equal in all models.
        self.stacked = mirror
        # One [N, P] storage per dtype/device for all parameters (see modelbatch._flat).
        self._flat: FlatParams = flatten_parameters(mirror)
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
        """Current position of the model with id ``model_id`` (positions change when models
        are dropped; ids do not). Raises ``KeyError`` listing the valid ids."""
        key = self._normalize_id(model_id)
        try:
            return self._model_ids.index(key)
        except ValueError:
            raise KeyError(
                f"no model with id {model_id!r} in this batch; valid ids are {self._model_ids} "
                "(models are addressed by id, which stays the same when others are dropped)"
            ) from None

    def _normalize_id(self, model_id: Any) -> int | str:
        """``model_id`` as stored: a str, or an int (NumPy integers and 0-dim integer tensors,
        e.g. an ``argmin``, are accepted)."""
        if isinstance(model_id, str):
            return model_id
        if not isinstance(model_id, bool):
            try:
                return operator.index(model_id)
            except TypeError:
                pass
        raise TypeError(
            f"a model id must be an int or a str, got {type(model_id).__name__}; "
            f"valid ids are {self._model_ids}"
        )

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

    def _check_position(self, i: int) -> int:
        """A position ``0..N-1`` (negative counts from the end), for :meth:`keep_positions`."""
        n = len(self)
        if isinstance(i, bool):
            raise TypeError("a position must be an int, got bool")
        try:
            i = operator.index(i)  # ints, NumPy integers, 0-dim integer tensors
        except TypeError:
            raise TypeError(f"a position must be an int, got {type(i).__name__}") from None
        if not -n <= i < n:
            raise IndexError(f"position {i} out of range for a batch of {n} models")
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
        check_inputs(inputs, per_model)
        params, buffers = self._call_tensors()
        x_dims = tuple(0 if per_model and isinstance(x, Tensor) else None for x in inputs)
        run = self._compiled_forward if self._compiled_forward is not None else _vmapped_forward
        # Quarantined models' buffers (BatchNorm running statistics) must not change in a
        # training forward: run on copies and keep the old values of inactive models.
        # Skipped (no copy, no device sync) while every model is active.
        frozen = self.training and bool(buffers) and not self.all_active
        call_buffers = {k: v.clone() for k, v in buffers.items()} if frozen else buffers
        try:
            with ChannelsLastViews() if self.conv_layout == "channels_last" else nullcontext():
                out, reassigned = run(
                    self.stacked, self.randomness, x_dims, kwargs, params, call_buffers, *inputs
                )
        except (RuntimeError, ValueError, TypeError) as e:
            explained = explain_forward_error(e, n, inputs, per_model)
            if explained is None:
                raise
            raise explained from e
        check_outputs(out)
        if reassigned:
            keep = None if frozen or self.all_active else self.active
            _write_back_buffers(reassigned, call_buffers, keep)
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

        The known losses (``F.cross_entropy``, ``F.nll_loss``, ``F.mse_loss``, ``F.l1_loss``,
        ``F.smooth_l1_loss``, ``F.huber_loss``, ``F.binary_cross_entropy[_with_logits]``,
        ``F.kl_div``, ``F.soft_margin_loss``, ``F.poisson_nll_loss``: ``modelbatch.loss.
        FLAT_LOSSES``; their ``nn.*Loss`` modules with their options, and ``functools.partial``
        of the functions) run as one loss call over the N models' outputs (no vmap), reduced
        per model exactly as the loss's own reduction; any other ``loss_fn`` runs under vmap.
        See :mod:`modelbatch.loss`.

        Args:
            outputs: ``[N, B, ...]`` model outputs (what ``batch(x)`` returned).
            targets: ``[B, ...]`` shared targets, or ``[N, B, ...]`` per-model targets.
            loss_fn: an ordinary single-model loss ``loss_fn(output [B, ...], target [B, ...])
                -> scalar``, e.g. ``F.cross_entropy`` or ``nn.CrossEntropyLoss(weight=w)``.
            mask: optional ``[N, B]`` (or ``[B]``) sample selection: bool (selected), integer
                (repeat counts, e.g. a bootstrap) or float (weights). Model i's loss equals
                ``loss_fn`` on its selected samples alone, repeated by their counts, with the
                loss's own normalisation (class weights, ``ignore_index``, ``reduction``).
                Known losses weight the per-element losses; any other ``loss_fn`` is called
                once per model on its samples (exact, N calls; fractional weights refused).
                Models with an all-zero mask get loss 0.
            per_model_targets: whether ``targets`` has the leading N dimension. By default
                the shapes decide: ``[B, ...]`` is shared, ``[N, B, ...]`` per model; when
                both fit (N == B) an error asks for this argument.
            reduction: ``"sum"`` (default) returns the scalar sum; ``"none"`` returns the
                differentiable ``[N]`` per-model losses (what
                :meth:`modelbatch.BatchGradScaler.scale` takes).

        Returns:
            A scalar tensor to call ``.backward()`` on (``[N]`` with ``reduction="none"``).
            The detached ``[N]`` per-model losses are stored in :attr:`latest_losses`.
        """
        from modelbatch.loss import LOSS_ERRORS, flat_losses, recognise, targets_error

        n = len(self)
        if reduction not in ("sum", "none"):
            raise ValueError(f"reduction must be 'sum' or 'none', got {reduction!r}")
        if outputs.dim() == 0 or outputs.shape[0] != n:
            raise ValueError(
                f"outputs must have a leading dimension of N={n} models, "
                f"got shape {tuple(outputs.shape)}"
            )
        per_model = _targets_are_per_model(outputs, targets, per_model_targets)
        weights = None if mask is None else self._mask_weights(outputs, mask)
        spec = recognise(loss_fn)
        losses = None
        if spec is not None:
            wf = None if weights is None else weights.to(outputs.dtype)
            losses = flat_losses(spec, outputs, targets, per_model, wf)
        if losses is None and weights is not None:
            losses = self._masked_losses(outputs, targets, per_model, loss_fn, weights)
        elif losses is None:
            try:
                losses = vmap(loss_fn, in_dims=(0, 0 if per_model else None))(outputs, targets)
            except LOSS_ERRORS as e:
                if type(e) not in LOSS_ERRORS:
                    raise
                raise targets_error(e, outputs, targets, per_model) from e
        if losses.shape != (n,):
            raise ValueError(
                f"loss_fn must return a scalar per model; got per-model shape "
                f"{tuple(losses.shape[1:])}. Use a reduction such as 'mean'."
            )
        self.latest_losses = losses.detach()
        if reduction == "none":  # the [N] per-model losses (e.g. for BatchGradScaler.scale)
            return losses
        return losses.sum()

    @staticmethod
    def _mask_weights(outputs: Tensor, mask: Tensor) -> Tensor:
        """``mask`` ``[N, B]`` or ``[B]`` as ``[N, B]`` (checked, dtype kept)."""
        n, b = outputs.shape[0], outputs.shape[1] if outputs.dim() > 1 else 0
        if mask.dim() == 1:
            mask = mask.unsqueeze(0).expand(n, -1)
        if mask.shape != (n, b):
            raise ValueError(
                f"mask must have shape [N, B] = [{n}, {b}] (or [B]), got {tuple(mask.shape)}"
            )
        return mask.to(outputs.device)

    def _masked_losses(
        self, outputs: Tensor, targets: Tensor, per_model: bool, loss_fn: LossFn, mask: Tensor
    ) -> Tensor:
        """``[N]`` losses of an unknown ``loss_fn`` on each model's selected samples: one
        ``loss_fn`` call per model (see :func:`modelbatch.loss.masked_losses_per_model`)."""
        from modelbatch.loss import masked_losses_per_model

        return masked_losses_per_model(loss_fn, outputs, targets, per_model, mask)

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
    def extract(self, model_id: int | str) -> nn.Module:
        """A standalone copy of the model with id ``model_id``.

        The copy has the model's current weights and buffers, on the batch's device, and
        its own per-model settings (dropout rate, normalisation eps, ...). Each submodule
        is in the train/eval mode it has in the batch (``batch.train()`` / ``.eval()`` set
        them all; a BatchNorm frozen in eval when the batch was built stays so until then).

        Models are addressed by id everywhere in the API (``extract``, ``insert``, ``drop``,
        ``quarantine``, ``load_model``); the default ids ``0..N-1`` are the positions at
        construction and do not shift when models are dropped. The model at position ``k``
        is ``batch.extract(batch.model_ids[k])``. Raises ``KeyError`` (listing the valid
        ids) for an unknown id.
        """
        i = self.index_of(model_id)
        template = self._template
        module = copy_model(template)
        stacked = dict(self.stacked.named_parameters(remove_duplicate=False))
        stacked_b = dict(self.stacked.named_buffers(remove_duplicate=False))
        # Tied tensors (one tensor under two names, e.g. embeddings and LM head) stay tied.
        params: dict[int, nn.Parameter] = {}
        buffers: dict[int, Tensor] = {}
        with torch.no_grad():
            # A snapshot: a module under two names is visited twice, after its tensors were
            # already replaced.
            for name, p in list(module.named_parameters(remove_duplicate=False)):
                mod_path, attr = _split_name(name)
                sub = module.get_submodule(mod_path)
                if id(p) not in params:
                    params[id(p)] = nn.Parameter(
                        stacked[name][i].detach().clone(), requires_grad=p.requires_grad
                    )
                sub._parameters[attr] = params[id(p)]
            for name, b in list(module.named_buffers(remove_duplicate=False)):
                mod_path, attr = _split_name(name)
                sub = module.get_submodule(mod_path)
                if id(b) not in buffers:
                    buffers[id(b)] = stacked_b[name][i].detach().clone()
                sub._buffers[attr] = buffers[id(b)]
        for path, attrs in self._current_settings(i).items():
            sub = module.get_submodule(path)
            for attr, value in attrs.items():
                setattr(sub, attr, value)
        modes = {name: m.training for name, m in self.stacked.named_modules()}
        for name, sub in module.named_modules():
            sub.training = modes.get(name, self.training)
        return refresh_computed_weights(module)  # the older weight_norm's computed weight

    def _current_settings(self, i: int) -> dict[str, dict[str, Any]]:
        """Model i's per-model settings as the batch runs them now: the value the layer
        records for model i (``per_model_<attr>``), or the layer's own attribute where one
        value serves every model (a user may have assigned it on the batch's layer, e.g.
        a dropout schedule); the values at build time for anything else."""
        stacked = dict(self.stacked.named_modules())
        out: dict[str, dict[str, Any]] = {}
        for path, attrs in self._model_settings[i].items():
            sub = stacked.get(path)
            out[path] = {}
            for attr, built in attrs.items():
                value = built
                if sub is not None:
                    recorded = getattr(sub, f"per_model_{attr}", None)
                    if isinstance(recorded, list) and len(recorded) == len(self):
                        value = recorded[i]
                    elif attr in vars(sub) or hasattr(type(sub), attr):
                        value = getattr(sub, attr)
                out[path][attr] = value
        return out

    def extract_all(self) -> list[nn.Module]:
        """Standalone copies of all N models, in position order (ids: :attr:`model_ids`)."""
        return [self.extract(mid) for mid in self._model_ids]

    def insert(self, model_id: int | str, module: nn.Module) -> None:
        """Write ``module``'s weights and buffers into the model with id ``model_id``.

        The module must have the batch's architecture, and the per-model settings (dropout
        rate, normalisation eps, ...) the model was built with: they are fixed when the
        batch is built. Train/eval modes are not compared (nothing of them is written).
        Optimizer state is left unchanged.
        """
        i = self.index_of(model_id)
        label = f"cannot insert into model {model_id!r}"
        try:
            check_same_structure([comparable_copy(self._template), module], compare_training=False)
        except ValueError as e:
            message = str(e).replace("model 1", "the module").replace("model 0", "the batch")
            raise type(e)(f"{label}: {message}") from None
        expected = self._current_settings(i)
        for path, attrs in model_settings(module).items():
            for attr, value in attrs.items():
                built = expected[path][attr]
                if not same_setting(value, built):
                    raise ArchitectureMismatchError(
                        f"{label}: submodule {path or '<root>'!r} has {attr}={value!r} where "
                        f"model {model_id!r} was built with {attr}={built!r}; per-model "
                        "settings are fixed when the batch is built (build a new batch to "
                        "change them)"
                    )
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
        """Save every model (one folder per id) as a new version of ``directory``,
        atomically: see :func:`modelbatch.checkpoint.save_all` (``scheduler=``, ``scaler=``,
        ``step=``, ``extra=``, ``keep=``, ``signing_key=``)."""
        from modelbatch.checkpoint import save_all

        return save_all(self, directory, optimizer=optimizer, **kwargs)

    def load_all(
        self, directory: str | os.PathLike[str], optimizer: Any = None, **kwargs: Any
    ) -> dict[str, Any]:
        """Load a checkpoint into this batch, checking it first: see
        :func:`modelbatch.checkpoint.load_all` (``scheduler=``, ``scaler=``, ``model_ids=``,
        ``version=``, ``signing_key=``, ...)."""
        from modelbatch.checkpoint import load_all

        return load_all(self, directory, optimizer=optimizer, **kwargs)

    # state_dict() carries the model ids (key "model_ids": their UTF-8 JSON as a uint8
    # tensor), so [N, ...] rows cannot silently load into other models; load checks them
    # before anything is copied.
    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        ids = json.dumps(self._model_ids).encode("utf-8")
        destination[prefix + "model_ids"] = torch.tensor(list(ids), dtype=torch.uint8)

    def _load_from_state_dict(
        self, state_dict: Any, prefix: str, local_metadata: Any, strict: bool,
        missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str],
    ) -> None:
        key = prefix + "model_ids"
        if key not in state_dict:  # a missing key: only load_state_dict(strict=False) loads it
            missing_keys.append(key)
        else:
            t = state_dict[key]
            try:
                saved = json.loads(bytes(t.to("cpu", torch.uint8).tolist()).decode("utf-8"))
            except (AttributeError, TypeError, ValueError) as e:
                raise RuntimeError(f"{key!r} in the state_dict is not a list of ids: {e}") from None
            if json.dumps(saved) != json.dumps(self._model_ids):
                raise RuntimeError(
                    f"the state_dict holds models {saved}, this batch holds {self._model_ids}; "
                    "nothing was loaded. Build the batch with model_ids=... as saved, or set "
                    f"state_dict[{key!r}] = batch.state_dict()[{key!r}] to load by position"
                )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if key in unexpected_keys:
            unexpected_keys.remove(key)

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
        scalar = (
            isinstance(ids, (int, str))
            or not isinstance(ids, Iterable)
            or (isinstance(ids, Tensor) and ids.dim() == 0)
        )
        ids_list: list[Any] = [ids] if scalar else list(ids)  # type: ignore[arg-type]
        where = {mid: i for i, mid in enumerate(self._model_ids)}
        out = []
        for mid in ids_list:
            key = self._normalize_id(mid)
            pos = where.get(key)
            if pos is None:
                self.index_of(mid)  # raises the KeyError naming the id
            out.append(where[key])
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
        schedulers of this batch's optimizers whose per-model lists shrink alike.

        The one positional method of the model API (``drop`` is its by-id form): ``keep``
        holds positions ``0..N-1``, not model ids."""
        n = len(self)
        keep = [self._check_position(i) for i in keep]
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
        self._keep_model_settings(keep)
        if self.seeds is not None:
            self.seeds = [self.seeds[i] for i in keep]
        for opt in self._live_optimizers():
            opt._keep_positions(keep)
        if schedulers:
            from modelbatch.isolation import shrink_scheduler

            for sched in schedulers:
                shrink_scheduler(sched, keep, n)

    def _keep_model_settings(self, keep: Sequence[int]) -> None:
        """Keep the per-model settings of the models at positions ``keep``, in that order:
        the list behind :meth:`extract`, and the ``per_model_<attr>`` lists that per-model
        layers record (their ``[N]`` buffers shrink with the other buffers)."""
        n = len(self._model_settings)
        self._model_settings = [self._model_settings[i] for i in keep]
        for module in self.stacked.modules():
            for attr, value in list(vars(module).items()):
                if attr.startswith("per_model_") and isinstance(value, list) and len(value) == n:
                    setattr(module, attr, [value[i] for i in keep])
