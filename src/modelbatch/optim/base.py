"""Shared machinery of the vectorised optimizers.

A :class:`BatchOptimizer` updates the stacked ``[N, ...]`` parameters of a
:class:`~modelbatch.ModelBatch` with per-model hyper-parameters. ``param_groups[i]`` holds
model i's hyper-parameters, so stock ``torch.optim.lr_scheduler`` classes work unchanged.
At every step the hyper-parameters are gathered into ``[N]`` tensors (cached until a value
changes) and broadcast over each stacked tensor: the number of kernels launched depends on
the number of parameter tensors, never on N.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from modelbatch.core import ModelBatch

__all__ = ["BatchOptimizer", "expand_hyperparameter"]

# Hyper-parameter names that take a pair per model.
_PAIR_HPARAMS = ("betas",)


def expand_hyperparameter(name: str, value: Any, n: int) -> list[Any]:
    """Turn a scalar or a length-``n`` list into ``n`` per-model values.

    A pair-valued hyper-parameter (``betas``) given as one pair is a scalar; per-model
    values are a list of ``n`` pairs. NumPy arrays and scalars are accepted like lists and
    Python numbers.
    """
    if not isinstance(value, (Tensor, list, tuple, str)) and hasattr(value, "tolist"):
        value = value.tolist()  # NumPy array or scalar
    if name in _PAIR_HPARAMS:
        if (
            isinstance(value, (tuple, list))
            and len(value) == 2
            and all(isinstance(v, (int, float)) for v in value)
        ):
            return [tuple(float(v) for v in value)] * n
        values = list(value)
        if len(values) != n:
            raise ValueError(
                f"hyper-parameter {name!r} has {len(values)} per-model values for a batch of "
                f"{n} models"
            )
        out = []
        for i, v in enumerate(values):
            if not (isinstance(v, (tuple, list)) and len(v) == 2):
                raise ValueError(
                    f"hyper-parameter {name!r} for model {i} must be a pair, got {v!r}"
                )
            out.append(tuple(float(x) for x in v))
        return out
    if isinstance(value, Tensor):
        if value.dim() == 0:
            return [value.item()] * n
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(
                f"hyper-parameter {name!r} has {len(value)} per-model values for a batch of "
                f"{n} models"
            )
        return list(value)
    return [value] * n


class BatchOptimizer(torch.optim.Optimizer):
    """Base class of the vectorised optimizers (not used directly).

    Args:
        batch: the :class:`~modelbatch.ModelBatch` whose stacked parameters are optimised.
        hyperparams: every hyper-parameter, each a scalar or a length-N list.

    Subclasses set ``_float_hparams`` / ``_bool_hparams``, implement ``_validate`` and
    ``_update_param``, and set ``_supports_complex = False`` when their update is not
    correct for complex parameters.
    """

    _float_hparams: tuple[str, ...] = ()
    _bool_hparams: tuple[str, ...] = ()
    _supports_complex: bool = True

    def __init__(self, batch: ModelBatch, hyperparams: Mapping[str, Any]) -> None:
        from modelbatch.core import ModelBatch

        if not isinstance(batch, ModelBatch):
            raise TypeError(
                f"{type(self).__name__} takes a ModelBatch as its first argument, got "
                f"{type(batch).__name__}; for a plain module use torch.optim"
            )
        n = len(batch)
        known = set(self._float_hparams) | set(self._bool_hparams)
        unknown = set(hyperparams) - known
        if unknown:
            raise TypeError(
                f"{type(self).__name__} got unknown hyper-parameters {sorted(unknown)}; "
                f"it accepts {sorted(known)}"
            )
        if not self._supports_complex:
            for name, p in batch.stacked_parameters():
                if p.is_complex():
                    raise TypeError(
                        f"{type(self).__name__} does not support complex parameters: parameter "
                        f"{name!r} has per-model shape {tuple(p.shape[1:])} and dtype {p.dtype}. "
                        "Use OptimizerFactory(torch.optim.<class>, ...).build(batch): it runs "
                        "torch.optim per model, which treats complex tensors as pairs of reals"
                    )
        self.batch = batch
        per_model = {k: expand_hyperparameter(k, v, n) for k, v in hyperparams.items()}
        groups: list[dict[str, Any]] = []
        for i, mid in enumerate(batch.model_ids):
            group: dict[str, Any] = {"params": [], "model_id": mid}
            for k, values in per_model.items():
                v = values[i]
                if k in self._bool_hparams:
                    group[k] = bool(v)
                elif k in _PAIR_HPARAMS:
                    group[k] = v
                else:
                    try:
                        group[k] = float(v)
                    except (TypeError, ValueError):
                        raise TypeError(
                            f"hyper-parameter {k!r} for model {i} (id {mid!r}) must be a number, "
                            f"got {v!r}"
                        ) from None
            self._validate(group, i)
            groups.append(group)
        defaults = {k: groups[0][k] for k in per_model}
        self._hp_cache: dict[tuple[str, torch.device, torch.dtype], tuple[tuple[Any, ...], Tensor]]
        self._hp_cache = {}
        # Static mode (CUDA graphs, torch.compile): see set_static_hparams().
        self._static_hparams = False
        self._static_masked: bool | None = None
        self._branch_log: dict[tuple[str, Callable[[Any], bool]], bool] = {}
        # Within one step(): any_hparam answers and hparam tensors, so each is read from
        # the N groups once per step, not once per parameter tensor.
        self._step_memo: dict[Any, Any] | None = None
        super().__init__(groups, defaults)
        self.state: dict[str, dict[str, Any]] = {}  # type: ignore[assignment]
        batch._register_optimizer(self)

    # ---------------------------------------------------------------- to override
    def _validate(self, group: Mapping[str, Any], i: int) -> None:
        raise NotImplementedError

    def _update_param(self, name: str, p: Tensor, grad: Tensor, state: dict[str, Any]) -> None:
        raise NotImplementedError

    # ---------------------------------------------------------------- hyper-parameters
    def _error(self, i: int, message: str) -> ValueError:
        mid = self.batch.model_ids[i]
        return ValueError(f"{type(self).__name__}, model {i} (id {mid!r}): {message}")

    def hparam(self, name: str, like: Tensor, index: int | None = None) -> Tensor:
        """The per-model values of ``name`` as an ``[N]`` tensor on ``like``'s device.

        Floating hyper-parameters are computed in float64 (the precision ``torch.optim``
        uses for Python-float hyper-parameters) unless the device lacks float64.
        ``index`` picks one element of a pair-valued hyper-parameter (``betas``).
        """
        dtype = torch.bool if name in self._bool_hparams else _hp_dtype(like.device)
        key = (name if index is None else f"{name}[{index}]", like.device, dtype)
        if self._static_hparams and key in self._hp_cache:
            # Static mode: the tensor's address must not change; refresh_hparams() keeps
            # its values current (and no host-side value is read while tracing/capturing).
            return self._hp_cache[key][1]
        memo = self._step_memo
        if memo is not None and ("hparam", key) in memo:
            return memo[("hparam", key)]
        if index is None:
            values = tuple(g[name] for g in self.param_groups)
        else:
            values = tuple(g[name][index] for g in self.param_groups)
        cached = self._hp_cache.get(key)
        if cached is not None and cached[0] == values:
            t = cached[1]
        else:
            t = _host_to_device(values, dtype, like.device)
            self._hp_cache[key] = (values, t)
        if memo is not None:
            memo[("hparam", key)] = t
        return t

    def any_hparam(self, name: str, predicate: Callable[[Any], bool] = bool) -> bool:
        """Whether ``predicate`` holds for the hyper-parameter of any model (host-side).

        Within one :meth:`step` the answer is computed once (an O(N) loop over the param
        groups), not once per parameter tensor.
        """
        memo = self._step_memo
        key = (name, predicate)
        if memo is not None and key in memo:
            return memo[key]
        result = any(predicate(g[name]) for g in self.param_groups)
        if memo is not None:
            memo[key] = result
        if self._static_hparams:
            self._branch_log[(name, predicate)] = result
        return result

    # ---------------------------------------------------------------- static mode
    def set_static_hparams(self, enabled: bool, masked: bool | None = None) -> None:
        """Switch static mode on or off (used by :mod:`modelbatch.speed`).

        In static mode, as a CUDA graph or a compiled step needs:

        * :meth:`hparam` returns the same ``[N]`` tensor for a hyper-parameter every time;
          :meth:`refresh_hparams` copies new values (e.g. from an LR scheduler) into it in
          place, so a captured graph reads them on its next replay;
        * :meth:`step` writes optimizer state back into the same tensors instead of
          rebinding them, and takes ``masked`` (whether to run the quarantine-aware
          update) from here instead of reading ``batch.active`` on the host (a sync).
          ``masked=None`` reads it as usual.
        """
        self._static_hparams = bool(enabled)
        self._static_masked = masked if enabled else None
        self._branch_log = {}

    def refresh_hparams(self) -> None:
        """Copy the current ``param_groups`` values into the cached ``[N]`` tensors, in place.

        Raises a RuntimeError when a change would flip a host-side branch taken while the
        step was captured (e.g. weight decay from 0 to non-zero for every model): such a
        step has to be captured again.
        """
        for key, (old_values, t) in list(self._hp_cache.items()):
            label = key[0]
            name, _, idx = label.partition("[")
            if idx:
                k = int(idx.rstrip("]"))
                values = tuple(g[name][k] for g in self.param_groups)
            else:
                values = tuple(g[name] for g in self.param_groups)
            if values != old_values:
                t.copy_(torch.tensor(values, dtype=t.dtype), non_blocking=False)
                self._hp_cache[key] = (values, t)
        for (name, predicate), result in self._branch_log.items():
            if any(predicate(g[name]) for g in self.param_groups) != result:
                raise RuntimeError(
                    f"{type(self).__name__}: hyper-parameter {name!r} changed in a way that "
                    f"changes the update's code path (captured with any-model {name} = "
                    f"{result}); capture the step again"
                )

    # ---------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Update every model with its own hyper-parameters. Quarantined models (see
        :meth:`ModelBatch.quarantine`) keep their parameters and optimizer state unchanged."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._static_hparams and not _capturing():
            self.refresh_hparams()
        if self._static_hparams and self._static_masked is not None:
            masked = self._static_masked
        else:
            masked = not self.batch.all_active
        self._step_memo = {}
        try:
            self._apply_updates(masked)
        finally:
            self._step_memo = None
        return loss

    def _apply_updates(self, masked: bool) -> None:
        """Update every parameter that has a gradient (the tensor part of :meth:`step`;
        :func:`modelbatch.speed.compile_optimizer` compiles this method).

        ``masked``: run the quarantine-aware update (inactive models keep their values).
        """
        static = self._static_hparams
        active = self.batch.active
        for name, p in self.batch.stacked_parameters():
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(
                    f"{type(self).__name__} does not support sparse gradients ({name})"
                )
            state = self.state.setdefault(name, {})
            if not state:
                self._init_state(p, state)
            if static:
                # Keep every state tensor at its address: copy rebound values back in place.
                before = {k: v for k, v in state.items() if isinstance(v, Tensor)}
                if masked:
                    old_p = p.detach().clone()
                    snapshot = {k: v.clone() for k, v in before.items()}
                self._update_param(name, p, p.grad, state)
                if masked:
                    p.copy_(torch.where(active.view(-1, *([1] * (p.dim() - 1))), p, old_p))
                for k, new in list(state.items()):
                    old = before.get(k)
                    if masked and isinstance(new, Tensor) and new.dim() > 0:
                        keep = active.view(-1, *([1] * (new.dim() - 1)))
                        new = torch.where(keep, new, snapshot.get(k, 0))
                        state[k] = new
                    if old is not None and new is not old:
                        old.copy_(new)
                        state[k] = old
            elif masked:
                snapshot = {k: v.clone() for k, v in state.items() if isinstance(v, Tensor)}
                old_p = p.detach().clone()
                self._update_param(name, p, p.grad, state)
                keep = active.view(-1, *([1] * (p.dim() - 1)))
                p.copy_(torch.where(keep, p, old_p))
                for k, new in list(state.items()):
                    if isinstance(new, Tensor) and new.dim() > 0:
                        # State created in this step (e.g. SGD's momentum buffer) starts at
                        # zero for inactive models: they have not stepped.
                        keep = active.view(-1, *([1] * (new.dim() - 1)))
                        state[k] = torch.where(keep, new, snapshot.get(k, 0))
            else:
                self._update_param(name, p, p.grad, state)

    def init_state(self) -> None:
        """Create the optimizer state of every parameter now instead of at the first step."""
        for name, p in self.batch.stacked_parameters():
            if not p.requires_grad:
                continue  # frozen: never updated, so no state (as in torch.optim)
            state = self.state.setdefault(name, {})
            if not state:
                self._init_state(p, state)

    def _init_state(self, p: Tensor, state: dict[str, Any]) -> None:
        state["step"] = torch.zeros(p.shape[0], dtype=_hp_dtype(p.device), device=p.device)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients of the stacked parameters."""
        zero_stacked_grads(self.batch, set_to_none)

    # ---------------------------------------------------------------- shrinking
    def _follow_batch(self) -> None:
        """Move the state to the parameters' device and floating dtype, after the batch
        moved (``batch.to(...)``, ``batch.double()``)."""
        params = dict(self.batch.stacked_parameters())
        for name, state in self.state.items():
            p = params.get(name)
            if p is not None:
                for k, v in list(state.items()):
                    if isinstance(v, Tensor):
                        state[k] = _state_like(k, v, p)

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim.Optimizer keeps only defaults/state/param_groups; the batch and the
        # caches are needed too (copy.deepcopy, pickle).
        return _optimizer_getstate(self)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._patch_step_function()
        self.batch._register_optimizer(self)

    def _keep_positions(self, keep: Sequence[int]) -> None:
        for state in self.state.values():
            for k, v in list(state.items()):
                if isinstance(v, Tensor) and v.dim() > 0:
                    state[k] = v.index_select(0, torch.tensor(keep, device=v.device))
        self.param_groups[:] = [self.param_groups[i] for i in keep]
        self._hp_cache.clear()

    # ---------------------------------------------------------------- (de)serialisation
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """``{"state": {param name: {key: [N, ...] tensor}}, "param_groups": [per model],
        "model_ids": [...]}``. Tensors are referenced, not copied (as in torch.optim)."""
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        return {
            "state": {name: dict(s) for name, s in self.state.items()},
            "param_groups": groups,
            "model_ids": list(self.batch.model_ids),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:  # type: ignore[override]
        """Restore a :meth:`state_dict`. The model ids and stacked shapes must match."""
        ids = list(state_dict.get("model_ids", []))
        if ids != list(self.batch.model_ids):
            raise ValueError(
                f"optimizer state is for models {ids}, but the batch holds {self.batch.model_ids}"
            )
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"optimizer state has {len(groups)} param groups for "
                f"{len(self.param_groups)} models"
            )
        params = dict(self.batch.stacked_parameters())
        new_state: dict[str, dict[str, Any]] = {}
        for name, s in state_dict["state"].items():
            if name not in params:
                raise ValueError(f"optimizer state names parameter {name!r}, which the batch lacks")
            p = params[name]
            restored: dict[str, Any] = {}
            for k, v in s.items():
                if isinstance(v, Tensor):
                    expected = (p.shape[0],) if k == "step" else tuple(p.shape)
                    if v.dim() > 0 and tuple(v.shape) != expected:
                        raise ValueError(
                            f"optimizer state {name!r}/{k!r} has shape {tuple(v.shape)}, "
                            f"expected {expected} (parameter {name!r} is {tuple(p.shape)})"
                        )
                    dtype = v.dtype if k == "step" else p.dtype
                    v = v.to(device=p.device, dtype=dtype if v.is_floating_point() else v.dtype)
                restored[k] = v.clone() if isinstance(v, Tensor) else v
            new_state[name] = restored
        for g, saved in zip(self.param_groups, groups, strict=False):
            for k, v in saved.items():
                g[k] = tuple(v) if k in _PAIR_HPARAMS else v
        self.state = new_state
        self._hp_cache.clear()

    def __repr__(self) -> str:
        hp = ", ".join(f"{k}={v!r}" for k, v in self.defaults.items())
        n = len(self.param_groups)
        return f"{type(self).__name__}(N={n}, {hp}; per-model values in param_groups)"


def _capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (False without CUDA)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _host_to_device(values: Sequence[Any], dtype: torch.dtype, device: torch.device) -> Tensor:
    """``[N]`` host values as a tensor on ``device``, without stalling the host on CUDA
    (a copy from pageable memory would wait for the GPU to drain its queue)."""
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _hp_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _state_like(key: str, value: Tensor, p: Tensor) -> Tensor:
    """Optimizer state ``value`` moved to ``p``'s device; floating state also to ``p``'s
    dtype, except the ``step`` counters (hyper-parameter precision)."""
    if key == "step":
        return value.to(device=p.device, dtype=_hp_dtype(p.device))
    if value.is_floating_point() or value.is_complex():
        return value.to(device=p.device, dtype=p.dtype)
    return value.to(device=p.device)


def _optimizer_getstate(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """``opt.__dict__`` for copying/pickling, without the instance-level ``step`` wrapper
    that an LR scheduler installs (it refers to the original optimizer)."""
    state = opt.__dict__.copy()
    state.pop("step", None)
    state.pop("_opt_called", None)
    return state


def zero_stacked_grads(batch: ModelBatch, set_to_none: bool = True) -> None:
    """Reset the ``.grad`` of every stacked parameter of ``batch`` (``zero_grad``)."""
    for _, p in batch.stacked_parameters():
        if p.grad is None:
            continue
        if set_to_none:
            p.grad = None
        else:
            p.grad.detach_()
            p.grad.zero_()


def per_model_view(values: Tensor, like: Tensor) -> Tensor:
    """``[N]`` values reshaped to ``[N, 1, ..., 1]`` and cast to ``like``'s dtype, so they
    broadcast over a stacked ``[N, ...]`` tensor."""
    dtype = like.dtype if values.dtype != torch.bool else torch.bool
    return values.to(dtype).view(-1, *([1] * (like.dim() - 1)))


def check_range(
    opt: BatchOptimizer,
    group: Mapping[str, Any],
    i: int,
    name: str,
    low: float = 0.0,
    high: float = math.inf,
    high_inclusive: bool = True,
) -> None:
    """Raise a ValueError naming model ``i`` unless ``low <= group[name] <(=) high``."""
    v = group[name]
    ok = low <= v and (v <= high if high_inclusive else v < high)
    if not ok or math.isnan(v):
        bracket = "]" if high_inclusive else ")"
        raise opt._error(i, f"invalid {name} {v!r}; it must lie in [{low}, {high}{bracket}")
