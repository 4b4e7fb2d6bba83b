"""Shared machinery of the vectorised optimizers.

A :class:`BatchOptimizer` updates the parameters of a :class:`~modelbatch.ModelBatch` with
per-model hyper-parameters. ``param_groups[i]`` holds model i's hyper-parameters, so stock
``torch.optim.lr_scheduler`` classes work unchanged.

How a step runs (see ``docs/performance.md``):

* The batch keeps all its parameters in one ``[N, P]`` tensor per dtype and device
  (:mod:`modelbatch._flat`); the optimizer keeps its state (moments, momentum buffers) in
  ``[N, P]`` tensors laid out alike, and its per-model step counters in one small tensor
  ``[T, N, c]`` (row k: parameter tensor k's step state).
* Hyper-parameters live on the device as ``[N, 1]`` columns. They are rebuilt only when a
  ``param_groups`` entry is assigned (each group counts its assignments, so detecting a
  change costs O(1), not O(N)); the copy to the device is non-blocking from pinned memory.
* A step gathers the T gradients of a storage into one ``[N, P]`` scratch (one ``cat``) and
  runs the update as one kernel per arithmetic step over the whole batch: the number of
  kernels depends neither on N nor on the number of parameter tensors. There is no Python
  loop over models or param groups.
* Quarantined models (``batch.active`` False) keep parameters and state unchanged: an
  ``[N, 1]`` mask inside the same kernels, no snapshot.
* A parameter whose ``.grad`` is None is skipped, as in ``torch.optim`` (its state and step
  count stay); the storage then falls back to one update per parameter tensor.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from modelbatch._flat import FlatGroup
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


# ----------------------------------------------------------------------------- param groups
class _Counter:
    """A shared change counter: every assignment into a param group bumps it.

    ``watch``: the tensors held as hyper-parameter values (e.g. ``group["lr"] =
    torch.tensor(0.01)``) with their version counters. torch's LR schedulers update a
    tensor-valued lr in place (``fill_``), which no assignment reveals: :meth:`poll` sees it
    from the version counter (empty, and free, when every value is a Python number)."""

    __slots__ = ("value", "watch")

    def __init__(self) -> None:
        self.value = 0
        self.watch: list[list[Any]] = []  # [tensor, version at the last poll]

    def note(self, value: Any) -> None:
        """Watch the tensors in a hyper-parameter value (a tensor, or a pair of them)."""
        items = value if isinstance(value, (tuple, list)) else (value,)
        for t in items:
            if isinstance(t, Tensor) and not any(w[0] is t for w in self.watch):
                self.watch.append([t, _version(t)])

    def poll(self) -> None:
        """Count a change when a watched tensor was written in place since the last poll."""
        for w in self.watch:
            v = _version(w[0])
            if v != w[1]:
                w[1] = v
                self.value += 1

    def __getstate__(self) -> tuple[int, list[list[Any]]]:
        return (self.value, self.watch)

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            # Pickled before ``watch`` existed: (None, {"value": v}).
            self.value, self.watch = int(state[1].get("value", 0)), []
        else:
            self.value, self.watch = state
        for w in self.watch:  # new tensors, new version counters
            w[1] = _version(w[0])


class _ParamGroup(dict):  # type: ignore[type-arg]
    """A param group (a dict) that counts assignments, so the optimizer sees a scheduler's
    or a user's change without re-reading the N groups at every step."""

    _counter: _Counter

    def __init__(self, data: Mapping[str, Any], counter: _Counter) -> None:
        super().__init__(data)
        self._counter = counter
        for key, value in self.items():
            if key != "params":
                counter.note(value)

    def _bump(self) -> None:
        self._counter.value += 1

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        if key != "params":
            self._counter.note(value)
        self._bump()

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        self._bump()

    def update(self, *args: Any, **kwargs: Any) -> None:
        super().update(*args, **kwargs)
        for key, value in self.items():
            if key != "params":
                self._counter.note(value)
        self._bump()

    def setdefault(self, key: str, default: Any = None) -> Any:
        self._bump()
        value = super().setdefault(key, default)
        if key != "params":
            self._counter.note(value)
        return value

    def pop(self, *args: Any) -> Any:
        self._bump()
        return super().pop(*args)

    def clear(self) -> None:
        super().clear()
        self._bump()

    def __reduce__(self) -> Any:
        return (_ParamGroup, (dict(self), self._counter))

    def __deepcopy__(self, memo: dict[int, Any]) -> _ParamGroup:
        import copy

        return _ParamGroup(copy.deepcopy(dict(self), memo), copy.deepcopy(self._counter, memo))


class _ParamGroupList(list):  # type: ignore[type-arg]
    """``param_groups``: replacing a group (``param_groups[i] = {...}``) counts as a change."""

    _counter: _Counter

    def __init__(self, groups: Sequence[Mapping[str, Any]], counter: _Counter) -> None:
        super().__init__(
            g if isinstance(g, _ParamGroup) else _ParamGroup(g, counter) for g in groups
        )
        self._counter = counter

    def _wrap(self, g: Any) -> Any:
        if isinstance(g, Mapping) and not isinstance(g, _ParamGroup):
            return _ParamGroup(g, self._counter)
        if isinstance(g, _ParamGroup):
            g._counter = self._counter
            for key, value in g.items():
                if key != "params":
                    self._counter.note(value)
        return g

    def __setitem__(self, index: Any, value: Any) -> None:
        wrapped = [self._wrap(g) for g in value] if isinstance(index, slice) else self._wrap(value)
        super().__setitem__(index, wrapped)
        self._counter.value += 1

    def append(self, value: Any) -> None:
        raise TypeError(
            "a vectorised optimizer has exactly one param group per model; models are added "
            "or removed through the ModelBatch (drop, keep_positions), not param_groups"
        )

    def __reduce__(self) -> Any:
        return (_ParamGroupList, (list(self), self._counter))

    def __deepcopy__(self, memo: dict[int, Any]) -> _ParamGroupList:
        import copy

        return _ParamGroupList(
            [copy.deepcopy(g, memo) for g in self], copy.deepcopy(self._counter, memo)
        )


# ----------------------------------------------------------------------------- flat slots
@dataclass(eq=False)
class _Slot:
    """The optimizer's side of one flat storage (one dtype/device).

    ``width``: the trainable columns ``[0, width)`` (frozen parameters come after them);
    ``state``: full-size ``[N, width]`` state tensors by key; ``rows``: the per-model step
    state ``[T, N, c]`` of the ``T = count`` trainable tensors, row k tensor k's (the views
    handed out for tensor k are views of ``rows[k]`` only, so they never alias another
    tensor's step state); ``split``: whether the rows may differ (after a step in which some
    parameters had no gradient, or a write into one tensor's step state from outside): then
    each tensor steps alone, with its own row; otherwise every row is equal and the flat path
    steps all of them at once (the same broadcast operations as on one ``[N, c]`` row);
    ``started[k]``: whether tensor k has optimizer state (it has stepped, as in torch.optim).
    """

    group: FlatGroup
    width: int
    count: int  # trainable tensors (the first ``count`` of the group)
    state: dict[str, Tensor]
    rows: Tensor
    split: bool = False
    started: list[bool] = field(default_factory=list)
    scratch: Tensor | None = None
    # Host-side step bookkeeping (see ``BatchOptimizer._fast_step``): ``host_t``, the step
    # count every model shares, when known on the host; ``pending``, steps taken by the host
    # fast path and not yet written into ``rows``; ``version``, ``rows``'s version counter
    # after the optimizer's own last write (a different one: written from outside).
    host_t: int | None = 0
    pending: int = 0
    version: int = -1
    host_bc: tuple[float, float] = (0.0, 0.0)  # Adam's bias corrections on the host path
    host_ke: Tensor | None = None  # Adam's host-path coefficients off the CPU ([1, 2])
    # Weak references to views of ``rows`` handed out by ``state`` / ``state_dict()``:
    # while one is alive, the host path writes its step at once (a held state dict shows
    # the current step, as torch.optim's references do; never a stale one).
    views: list[weakref.ref[Tensor]] = field(default_factory=list)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["views"] = []  # (a copy's views are not this slot's)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "rows" not in state and "small" in state:
            # Pickled before the [T, N, c] rows: one shared ``small`` [N, c], or after a
            # split one per parameter tensor (``split`` a list).
            small, split = state.pop("small"), state.pop("split", None)
            if isinstance(split, list) and state["count"]:
                state["rows"] = torch.stack(split[: state["count"]])
            else:
                state["rows"] = small.unsqueeze(0).repeat(state["count"], 1, 1)
            state["split"] = isinstance(split, list)
        self.__dict__.update(state)

    def views_alive(self) -> bool:
        self.views = [r for r in self.views if r() is not None]
        return bool(self.views)

    def column(self, t: Tensor, k: int) -> Tensor:
        return t[:, self.group.starts[k] : self.group.ends[k]]

    def small_of(self, k: int) -> Tensor:
        """Tensor k's step state ``[N, c]`` (a view of ``rows``)."""
        return self.rows[k]

    def rows_equal(self) -> bool:
        """Whether every tensor's step state is the same (reads the rows: a device sync)."""
        rows = self.rows
        return rows.shape[0] <= 1 or torch.equal(rows, rows[:1].expand_as(rows))


class _StateView(Mapping[str, dict[str, Any]]):
    """``optimizer.state``: ``{parameter name: {key: [N, ...] tensor}}`` over the flat state
    (views: reading is free, writing into them writes the optimizer's state)."""

    def __init__(self, opt: BatchOptimizer) -> None:
        self._opt = opt

    def _items(self) -> dict[str, dict[str, Any]]:
        return self._opt._export_state(copy=False)

    def __getitem__(self, key: str) -> dict[str, Any]:
        return self._items()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items())

    def __len__(self) -> int:
        return len(self._items())

    def __repr__(self) -> str:
        return f"OptimizerState({list(self._items())})"


class BatchOptimizer(torch.optim.Optimizer):
    """Base class of the vectorised optimizers (not used directly).

    Args:
        batch: the :class:`~modelbatch.ModelBatch` whose parameters are optimised.
        hyperparams: every hyper-parameter, each a scalar or a length-N list.

    Subclasses set ``_float_hparams`` / ``_bool_hparams`` / ``_small_width``, and implement
    ``_validate``, ``_state_keys``, ``_constants``, ``_small_from_steps`` and ``_update``
    (the arithmetic over ``[N, w]`` tensors).
    """

    _float_hparams: tuple[str, ...] = ()
    _bool_hparams: tuple[str, ...] = ()
    _supports_complex: bool = True
    _small_width: int = 1  # columns of the per-model step state; column -1 is the step count

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
                    if isinstance(v, bool) or not isinstance(v, (int, float)):
                        try:
                            v = float(v)
                        except (TypeError, ValueError):
                            raise TypeError(
                                f"hyper-parameter {k!r} for model {i} (id {mid!r}) must be a "
                                f"number, got {v!r}"
                            ) from None
                    group[k] = float(v)
            self._validate(group, i)
            groups.append(group)
        defaults = {k: groups[0][k] for k in per_model}
        self._constructing = True
        super().__init__(groups, defaults)
        self._constructing = False
        self._counter = _Counter()
        self.param_groups = _ParamGroupList(self.param_groups, self._counter)
        # Names of parameters without weight decay (e.g. the HF Trainer's biases and norms).
        self._no_decay: frozenset[str] = frozenset()
        self._reset_caches()
        self._slots: list[_Slot] | None = None
        self._flat_version = -1
        self.set_static_hparams(False)
        self._compiled: tuple[Callable[..., Any], Callable[..., Any]] | None = None
        batch._register_optimizer(self)

    def _reset_caches(self) -> None:
        self._seen: tuple[int, int, int] | None = None  # (groups, active version, active id)
        self._hp: dict[tuple[torch.device, torch.dtype], dict[str, Any]] = {}
        self._hp_host: dict[str, list[Any]] = {}
        self._flags: dict[str, Any] = {}
        self._settled: tuple[bool, ...] | None = None

    # ---------------------------------------------------------------- state (a view)
    @property  # type: ignore[override]
    def state(self) -> Mapping[str, dict[str, Any]]:  # type: ignore[override]
        """``{parameter name: {key: [N, ...] tensor}}``: views of the flat state."""
        return _StateView(self)

    @state.setter
    def state(self, value: Any) -> None:
        if not getattr(self, "_constructing", False) and value:
            raise AttributeError(
                f"{type(self).__name__}.state is a view of the flat state; use "
                "load_state_dict() to replace it"
            )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Refused after construction: the param groups are the N models, one each."""
        if getattr(self, "_constructing", False):
            super().add_param_group(param_group)
            return
        raise TypeError(
            f"{type(self).__name__}.add_param_group is not supported: a vectorised optimizer "
            "has exactly one param group per model of its ModelBatch, and every group covers "
            "all of that model's parameters. To train other parameters, use a separate "
            "optimizer; to give parameters no weight decay, see the Hugging Face integration "
            "(per-parameter no-decay), or freeze them with requires_grad_(False)."
        )

    # ---------------------------------------------------------------- to override
    def _validate(self, group: Mapping[str, Any], i: int) -> None:
        raise NotImplementedError

    def _state_keys(self) -> tuple[str, ...]:
        """Keys of the full-size state, given the current hyper-parameters."""
        raise NotImplementedError

    def _constants(self, hp: dict[str, Tensor], host: dict[str, list[Any]]) -> dict[str, Any]:
        """Per-model ``[N, 1]`` float64 columns and host flags derived from the
        hyper-parameters (``hp``: each hyper-parameter as ``[N, 1]`` float64, booleans as 0/1;
        ``host``: the same values as Python lists). Runs only when they change."""
        raise NotImplementedError

    def _small_from_steps(self, steps: Tensor, c: dict[str, Any]) -> Tensor:
        """The ``[N, _small_width]`` float64 step state of models that took ``steps`` ``[N]``
        steps (for loading)."""
        raise NotImplementedError

    def _update(
        self,
        p: Tensor,
        grads: list[Tensor],
        state: dict[str, Tensor],
        small: Tensor,
        c: dict[str, Any],
        flags: dict[str, Any],
        scratch: Tensor | None,
    ) -> None:
        """One step over ``p`` ``[N, w]`` with the gradients ``grads`` (each ``[N, w_k]``,
        concatenated along dim 1), state ``[N, w]`` and step state ``small`` ``[R, N, c]``,
        all updated in place. The R rows of ``small`` are equal (the step states of the R
        tensors ``p`` holds): the update reads ``small[0]`` and writes every row with the
        same broadcast operations (no more kernels than for one row)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- hyper-parameters
    def _error(self, i: int, message: str) -> ValueError:
        mid = self.batch.model_ids[i]
        return ValueError(f"{type(self).__name__}, model {i} (id {mid!r}): {message}")

    def hparam(self, name: str, like: Tensor | None = None, index: int | None = None) -> Tensor:
        """The per-model values of ``name`` as an ``[N]`` float64 tensor on the batch's
        device (``index`` picks one element of a pair such as ``betas``). The tensor is the
        optimizer's own: it keeps its address and is refreshed in place when values change."""
        device = like.device if like is not None else self.batch.device
        hp = self._refresh(device, _hp_dtype(device))
        key = name if index is None else f"{name}[{index}]"
        return hp["raw"][key].view(-1)

    def any_hparam(self, name: str, predicate: Callable[[Any], bool] = bool) -> bool:
        """Whether ``predicate`` holds for the hyper-parameter of any model (host-side)."""
        return any(predicate(g[name]) for g in self.param_groups)

    def _host_values(self) -> dict[str, list[Any]]:
        groups = self.param_groups
        out: dict[str, list[Any]] = {}
        for name in self._float_hparams + self._bool_hparams:
            if name in _PAIR_HPARAMS:
                pairs = [g[name] for g in groups]
                out[f"{name}[0]"] = [float(v[0]) for v in pairs]
                out[f"{name}[1]"] = [float(v[1]) for v in pairs]
            elif name in self._bool_hparams:
                out[name] = [bool(g[name]) for g in groups]
            else:
                out[name] = [float(g[name]) for g in groups]
        return out

    def _refresh(self, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
        """The ``[N, 1]`` hyper-parameter columns for ``device`` (cached; rebuilt in place
        when a param group was assigned to, or the quarantine mask changed)."""
        active = self.batch.active
        if self._counter.watch:
            self._counter.poll()
        seen = (self._counter.value, _version(active), id(active))
        changed_host: dict[str, list[Any]] | None = None
        if seen != self._seen:
            first = self._seen is None
            stale = first or seen[1:] != self._seen[1:]  # type: ignore[index]
            if first or seen[0] != self._seen[0]:  # type: ignore[index]
                host = self._host_values()
                if host != self._hp_host:
                    changed_host = self._hp_host
                    self._hp_host = host
                    stale = True
            self._seen = seen
            if stale:
                for entry in self._hp.values():
                    entry["stale"] = True
        key = (device, dtype)
        cached = self._hp.get(key)
        if cached is None or cached.get("stale"):
            cached = self._build_hp(device, dtype, cached)
            self._hp[key] = cached
        if changed_host and self._slots is not None:
            self._on_hparams_changed(changed_host, self._hp_host)
        return cached

    def _on_hparams_changed(self, old: dict[str, list[Any]], new: dict[str, list[Any]]) -> None:
        """Hook: hyper-parameter values changed from ``old`` to ``new`` (host lists)."""

    def _recompute_small(self, slots: Sequence[_Slot] | None = None) -> None:
        """Rebuild every step state (of ``slots``, default all) from its step counts (after
        a change of the values it depends on, such as Adam's betas)."""
        for slot in self._slots or [] if slots is None else slots:
            self._flush(slot)
            g = slot.group
            hp = self._refresh(g.device, g.dtype)
            ctx = {**hp["raw"], **hp["c"]}
            rows = slot.rows
            if rows.shape[0] == 0:
                continue
            if slot.split:
                for small in rows:
                    small.copy_(self._small_from_steps(small[:, -1].clone(), ctx))
            else:  # every row equal: computed once
                rows.copy_(self._small_from_steps(rows[0, :, -1].clone(), ctx).expand_as(rows))
            slot.host_t = None
            slot.version = _version(rows)

    def _slot_flags(self, slot: _Slot, masked: bool, k: int | None = None) -> dict[str, Any]:
        """The host-side choices of one update: the optimizer's flags, ``masked`` and
        ``decay_runs`` (column ranges of parameters with weight decay)."""
        flags = dict(self._flags, masked=masked)
        g = slot.group
        flags["lowp"] = g.dtype in (torch.bfloat16, torch.float16)
        if k is not None:
            decayed = g.names[k] not in self._no_decay
            flags["decay_runs"] = ((0, g.ends[k] - g.starts[k]),) if decayed else ()
            return flags
        runs: list[tuple[int, int]] = []
        for j in range(slot.count):
            if g.names[j] in self._no_decay:
                continue
            if runs and runs[-1][1] == g.starts[j]:
                runs[-1] = (runs[-1][0], g.ends[j])
            else:
                runs.append((g.starts[j], g.ends[j]))
        flags["decay_runs"] = tuple(runs)
        return flags

    def _build_hp(
        self, device: torch.device, dtype: torch.dtype, old: dict[str, Any] | None
    ) -> dict[str, Any]:
        host = self._hp_host
        names = sorted(host)
        n = len(self.param_groups)
        if old is not None and old.get("host") is host:
            raw_all = old["raw_all"]  # only the quarantine mask changed: no O(N) host work
        else:
            values = torch.tensor([host[k] for k in names], dtype=torch.float64).T.contiguous()
            raw_all = _host_to_device(values, device)  # [N, K] float64
            if old is not None and old["raw_all"].shape == raw_all.shape:
                old["raw_all"].copy_(raw_all)  # keep addresses (compiled steps, CUDA graphs)
                raw_all = old["raw_all"]
        raw = {k: raw_all[:, j : j + 1] for j, k in enumerate(names)}
        # A copy: the constants are refreshed in place (``copy_``), and a write into the
        # batch's own mask would bump its version and make every later step rebuild them.
        active = self.batch.active.to(device).view(n, 1).clone()
        consts = self._constants({**raw, "active": active}, host)
        flags = consts.pop("flags")
        self._flags = flags
        cast: dict[str, Any] = {}
        for k, v in consts.items():
            if isinstance(v, Tensor):
                target = torch.float64 if k.startswith("f64_") else _coef_dtype(dtype)
                if v.dtype == torch.bool:
                    target = torch.bool
                v = v.to(target)
                if old is not None:
                    prev = old["c"].get(k)
                    if isinstance(prev, Tensor) and prev.shape == v.shape and prev.dtype == v.dtype:
                        prev.copy_(v)
                        v = prev
            cast[k] = v
        return {"raw_all": raw_all, "raw": raw, "c": cast, "stale": False, "host": host}

    # ---------------------------------------------------------------- static mode (compat)
    def set_static_hparams(self, enabled: bool, masked: bool | None = None) -> None:
        """Static mode, for a captured (CUDA graph) or compiled step.

        The hyper-parameter tensors always keep their addresses and are refreshed in place,
        so a captured step reads new values (e.g. from an LR scheduler) on its next replay.
        In static mode, also:

        * :meth:`step` takes ``masked`` (run the quarantine-aware update) from here instead
          of reading ``batch.active`` on the host (a device sync); ``None`` reads it;
        * :meth:`refresh_hparams` and :meth:`step` raise a RuntimeError when a change of the
          hyper-parameters would change the code path the step was captured with (e.g.
          weight decay from 0 to non-zero for every model).
        """
        self._static = bool(enabled)
        self._static_masked = masked if enabled else None
        self._static_flags: tuple[Any, dict[str, list[Any]]] | None = None

    def refresh_hparams(self) -> None:
        """Bring the on-device hyper-parameter columns up to date with ``param_groups`` now
        (``step()`` does it by itself)."""
        for device, dtype in list(self._hp):
            self._refresh(device, dtype)
        self._check_static_flags()

    def _check_static_flags(self) -> None:
        if not getattr(self, "_static", False) or not self._flags:
            return
        snap = tuple(sorted(self._flags.items()))
        if self._static_flags is None:
            self._static_flags = (snap, dict(self._hp_host))
            return
        if snap != self._static_flags[0]:
            old_host = self._static_flags[1]
            changed = sorted(k for k, v in self._hp_host.items() if old_host.get(k) != v)
            raise RuntimeError(
                f"{type(self).__name__}: hyper-parameters {changed} changed in a way that "
                f"changes the update's code path ({dict(self._static_flags[0])} when captured, "
                f"{dict(snap)} now); capture (or compile) the step again"
            )

    def _state_tensors(self) -> list[Tensor]:
        """Every tensor of the optimizer's state (the flat ones, not views): for snapshots."""
        out: list[Tensor] = []
        for slot in self._slots_now():
            self._flush(slot)
            out += list(slot.state.values())
            out.append(slot.rows)
        return out

    # ---------------------------------------------------------------- flat slots
    def _slots_now(self) -> list[_Slot]:
        flat = self.batch._flat_storage(check=False)
        if self._slots is None or flat.version != self._flat_version:
            saved = self._export_state(copy=True) if self._slots is not None else None
            self._build_slots()
            if saved:
                self._import_state(saved)
        assert self._slots is not None
        return self._slots

    def _build_slots(self) -> None:
        flat = self.batch._flat_storage()
        slots = []
        for g in flat.groups:
            count = sum(1 for p in g.params if p.requires_grad)
            # Trainable parameters come first in each storage (see modelbatch._flat).
            width = g.ends[count - 1] if count else 0
            n = g.flat.shape[0]
            rows = torch.zeros(
                count, n, self._small_width, dtype=_hp_dtype(g.device), device=g.device
            )
            started = [False] * len(g.params)
            slot = _Slot(group=g, width=width, count=count, state={}, rows=rows, started=started)
            slot.version = _version(rows)  # zeros: every model at step 0 (host_t = 0)
            slots.append(slot)
        self._slots = slots
        self._flat_version = flat.version

    def _ensure_state(self, slot: _Slot, keys: Sequence[str]) -> None:
        g = slot.group
        for key in keys:
            if key not in slot.state:
                slot.state[key] = torch.zeros(
                    g.flat.shape[0], slot.width, dtype=g.dtype, device=g.device
                )

    def init_state(self) -> None:
        """Create the optimizer state of every trainable parameter now instead of at the
        first step (frozen parameters get none, as in torch.optim)."""
        for slot in self._slots_now():
            self._ensure_state(slot, self._state_keys())
            for k in range(slot.count):
                slot.started[k] = True

    # ---------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Update every model with its own hyper-parameters. Quarantined models (see
        :meth:`ModelBatch.quarantine`) keep their parameters and optimizer state unchanged."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        slots = self._slots_now()
        if self._static:
            for slot in slots:
                self._refresh(slot.group.device, slot.group.dtype)
            self._check_static_flags()
        if self._static_masked is not None:
            masked = self._static_masked
        elif self._compiled is not None:
            masked = True  # the compiled update always takes the mask (no host sync)
        else:
            masked = not self.batch.all_active
        for slot in slots:
            self._step_slot(slot, masked)
        # Once, after EVERY storage stepped: what a hook learns from a step (SGD: every
        # momentum buffer exists) must hold for all of them. Run after each storage, it let
        # a second storage (parameters of another dtype or device) take its first step as a
        # later one (SGD with dampening: the buffer started as (1 - dampening) * grad).
        self._after_step(masked)
        return loss

    def _step_slot(self, slot: _Slot, masked: bool) -> None:
        g = slot.group
        if slot.count == 0:
            return
        params = g.params
        grads = [p.grad for p in params]
        trainable = slot.count
        if any(gr is not None for gr in grads[trainable:]) or any(
            not p.requires_grad for p in params[:trainable]
        ):
            # requires_grad changed since the batch was built: one update per tensor.
            self._step_tensors(slot, grads, masked)
            return
        n = g.flat.shape[0]
        head = grads[:trainable]
        if not self._fresh(slot):  # written from outside: before the flags are chosen
            self._flush(slot)
        if all(gr is not None for gr in head) and not slot.split:
            flat_grads = [_grad_2d(gr, n, g.names[k]) for k, gr in enumerate(head)]  # type: ignore[arg-type]
            hp = self._refresh(g.device, g.dtype)
            flags = self._slot_flags(slot, masked)
            self._ensure_state(slot, self._state_keys())
            if slot.scratch is None or slot.scratch.shape != (n, slot.width):
                slot.scratch = torch.empty(n, slot.width, dtype=g.dtype, device=g.device)
            p2d = g.flat[:, : slot.width]
            compiled = self._compiled
            if (
                compiled is None
                and not self._static
                and self._fast_step(slot, p2d, flat_grads, hp["c"], flags)
            ):
                for k in range(trainable):
                    slot.started[k] = True
                if slot.views_alive():  # a held state dict shows the step now
                    self._flush(slot)
                return
            self._flush(slot)
            slot.host_t = None  # the device arithmetic below advances the step state
            if compiled is not None:
                # Two compiled functions: the per-model coefficients ([N, k], once), then the
                # element-wise update (one pass; it must not recompute them per element).
                coef = compiled[0](slot.rows, hp["c"], flags)
                compiled[1](p2d, flat_grads, slot.state, coef, hp["c"], flags)
            else:
                self._update(p2d, flat_grads, slot.state, slot.rows, hp["c"], flags, slot.scratch)
            slot.version = _version(slot.rows)
            for k in range(trainable):
                slot.started[k] = True
            return
        self._step_tensors(slot, grads, masked)

    def _after_step(self, masked: bool) -> None:
        """Hook run once at the end of :meth:`step`, after every storage stepped (SGD
        records that momentum buffers exist)."""

    def _fast_step(
        self, slot: _Slot, p: Tensor, grads: list[Tensor], c: dict[str, Any], flags: dict[str, Any]
    ) -> bool:
        """Hook: step the storage with host-side step bookkeeping (fewer kernels) and return
        True, or return False to take the device path. Only called in eager, non-static
        mode on the flat path. A subclass that steps here without writing ``slot.rows``
        counts the step in ``slot.pending`` and writes it in :meth:`_write_pending`."""
        return False

    def _fresh(self, slot: _Slot) -> bool:
        """Whether ``slot.rows`` is as the optimizer last wrote it (nothing wrote into it
        through a view of the state since)."""
        return _version(slot.rows) == slot.version

    def _flush(self, slot: _Slot) -> None:
        """Bring ``slot.rows`` up to date with the steps the host path took. A write into
        it from outside since (e.g. ``run_and_undo`` restoring a snapshot, a sweep resetting
        a model's step) wins: the pending steps are dropped and the host count forgotten,
        and the rows are read again (one device sync): the tensors step alone if the write
        made their step states differ (e.g. one parameter's step written), and together
        again if it made them equal."""
        if not self._fresh(slot):
            slot.pending = 0
            slot.host_t = None
            # What the optimizer knew of the step state (e.g. SGD: every buffer started) no
            # longer holds.
            self._settled = None
            if slot.rows.device.type == "cuda" and _capturing():
                # The rows cannot be read inside a CUDA graph capture: each tensor steps
                # alone (right whatever they hold). (``run_and_undo`` flushes before.)
                slot.split = slot.split or slot.rows.shape[0] > 1
            else:
                slot.split = not slot.rows_equal()
        elif slot.pending:
            self._write_pending(slot)
            slot.pending = 0
        slot.version = _version(slot.rows)

    def _write_pending(self, slot: _Slot) -> None:
        """Write ``slot.pending`` host-path steps into every row of ``slot.rows`` (one
        operation for all of them; subclasses that step
        on the host implement it)."""
        raise NotImplementedError

    def _step_tensors(self, slot: _Slot, grads: list[Tensor | None], masked: bool) -> None:
        """The general path: one update per parameter tensor that has a gradient, each with
        its own step state, its row of ``slot.rows`` (parameters without a gradient are
        skipped, as in torch.optim; from then on the rows may differ)."""
        g = slot.group
        n = g.flat.shape[0]
        self._flush(slot)
        slot.host_t = None
        slot.split = True
        hp = self._refresh(g.device, g.dtype)
        keys = self._state_keys()
        for k, gr in enumerate(grads):
            if gr is None:
                continue
            if k >= slot.count:
                raise RuntimeError(
                    f"{type(self).__name__}: parameter {g.names[k]!r} was frozen when the batch "
                    "was built and has a gradient now; build the optimizer (and the ModelBatch) "
                    "with the parameters' final requires_grad"
                )
            self._ensure_state(slot, keys)
            state = {key: slot.column(t, k) for key, t in slot.state.items()}
            p2d = slot.column(g.flat, k)
            scratch = torch.empty_like(p2d)
            flags = self._slot_flags(slot, masked, k)
            self._update(p2d, [_grad_2d(gr, n, g.names[k])], state, slot.rows[k : k + 1], hp["c"],
                         flags, scratch)  # fmt: skip
            slot.started[k] = True
        slot.version = _version(slot.rows)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients of the batch's parameters (``set_to_none=True``: ``.grad``
        becomes None, no kernel; False: one ``_foreach_zero_`` for all of them)."""
        zero_stacked_grads(self.batch, set_to_none)

    # ---------------------------------------------------------------- following the batch
    def _follow_batch(self) -> None:
        """After ``batch.to(...)`` / ``batch.double()``: the state moves to the parameters'
        device and floating dtype (``step`` counters stay float64)."""
        if self._slots is None:
            return
        saved = self._export_state(copy=False)
        self._build_slots()
        self._hp.clear()
        self._seen = None
        if saved:
            self._import_state(saved)

    def _keep_positions(self, keep: Sequence[int]) -> None:
        saved = self._export_state(copy=False) if self._slots is not None else {}
        for s in saved.values():
            for k, v in list(s.items()):
                if isinstance(v, Tensor) and v.dim() > 0:
                    s[k] = v.index_select(0, torch.tensor(list(keep), device=v.device))
        groups = [self.param_groups[i] for i in keep]
        self.param_groups = _ParamGroupList(groups, self._counter)
        self._counter.value += 1
        self._reset_caches()
        self._slots = None
        if saved:
            self._build_slots()
            self._import_state(saved)

    def __getstate__(self) -> dict[str, Any]:
        for slot in self._slots or []:
            self._flush(slot)
        state = _optimizer_getstate(self)
        state["_hp"] = {}
        state["_seen"] = None
        state["_compiled"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        for slot in self._slots or []:  # new tensors, new version counters; flushed
            slot.version = _version(slot.rows)
        self._patch_step_function()
        self.batch._register_optimizer(self)

    # ---------------------------------------------------------------- state export/import
    def _export_state(self, copy: bool) -> dict[str, dict[str, Any]]:
        """``{name: {key: [N, ...]}}`` for every parameter with state (views unless copy)."""
        out: dict[str, dict[str, Any]] = {}
        if self._slots is None:
            return out
        if not copy:
            # Views of the state leave the optimizer (state, state_dict): whatever is written
            # through them (e.g. a sweep resetting a slot) is read again at the next step.
            self._settled = None
        for slot in self._slots:
            self._flush(slot)
            g = slot.group
            n = g.flat.shape[0]
            for k, name in enumerate(g.names):
                if not slot.started[k] or k >= slot.count:
                    continue
                entry: dict[str, Any] = {}
                for key, t in slot.state.items():
                    v = slot.column(t, k).view(n, *g.shapes[k])
                    entry[key] = v.clone() if copy else v
                small = slot.small_of(k)
                for key, v in self._small_entries(small).items():
                    entry[key] = v.clone() if copy else v
                    if not copy:
                        slot.views.append(weakref.ref(v))
                out[name] = entry
        return out

    def _small_entries(self, small: Tensor) -> dict[str, Tensor]:
        """The per-model step state shown in ``state``/``state_dict`` (``[N]`` each)."""
        return {"step": small[:, -1]}

    def _import_state(self, saved: Mapping[str, Mapping[str, Any]]) -> None:
        """Load ``{name: {key: [N, ...]}}`` (validated by the caller) into the flat state."""
        slots = self._slots_now() if self._slots is None else self._slots
        for slot in slots:
            self._flush(slot)
            g = slot.group
            names = [nm for k, nm in enumerate(g.names) if k < slot.count and nm in saved]
            if not names:
                continue
            steps = []
            for k, name in enumerate(g.names):
                s = saved.get(name)
                if s is None or k >= slot.count:
                    continue
                keys = [key for key, v in s.items()
                        if isinstance(v, Tensor) and key not in self._small_keys()]  # fmt: skip
                self._ensure_state(slot, keys)
                for key in keys:
                    col = slot.column(slot.state[key], k)
                    col.copy_(s[key].reshape(col.shape))
                slot.started[k] = True
                steps.append((k, self._small_from_saved(s, g.device)))
            if not steps:
                continue
            first = steps[0][1]
            uniform = all(torch.equal(sm, first) for _, sm in steps) and len(steps) == slot.count
            # In place: a state dict held from before shows what was loaded.
            if uniform:  # every row equal: the flat path steps them together again
                slot.rows.copy_(first.expand_as(slot.rows))
                slot.split = False
            else:  # (a tensor not in ``saved`` keeps its row)
                for k, sm in steps:
                    slot.rows[k].copy_(sm)
                slot.split = True
            slot.host_t = self._host_steps(slot)
            slot.version = _version(slot.rows)

    def _small_keys(self) -> tuple[str, ...]:
        return ("step",)

    def _host_steps(self, slot: _Slot) -> int | None:
        """After loading: the step count every model of ``slot`` shares, if the host path
        can continue from the loaded step state exactly (None: the device path continues)."""
        return None

    def _small_from_saved(self, s: Mapping[str, Any], device: torch.device) -> Tensor:
        step = s.get("step")
        n = len(self.param_groups)
        if step is None:
            steps = torch.zeros(n, dtype=torch.float64, device=device)
        else:
            steps = torch.as_tensor(step).to(device=device, dtype=torch.float64).reshape(-1)
            if steps.numel() == 1:
                steps = steps.expand(n)
        hp = self._refresh(device, _hp_dtype(device))
        return self._small_from_steps(steps.clone(), {**hp["raw"], **hp["c"], "saved": s})

    # ---------------------------------------------------------------- (de)serialisation
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """``{"state": {param name: {key: [N, ...] tensor}}, "param_groups": [per model],
        "model_ids": [...]}``. Tensors are references into the flat state (as torch.optim
        returns references); ``copy.deepcopy`` it to keep a snapshot."""
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        return {
            "state": self._export_state(copy=False),
            "param_groups": groups,
            "model_ids": list(self.batch.model_ids),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:  # type: ignore[override]
        """Restore a :meth:`state_dict`. The model ids and stacked shapes must match.

        A ``torch.optim`` state dict (integer parameter keys, no ``model_ids``) is refused
        with a pointer to :meth:`load_torch_state_dicts`."""
        if "model_ids" not in state_dict and _looks_like_torch_state(state_dict):
            raise ValueError(
                f"{type(self).__name__}.load_state_dict got a torch.optim state dict (integer "
                "parameter keys, one param group per parameter list). A vectorised optimizer's "
                "state holds all N models; to load N per-model torch.optim state dicts use "
                "optimizer.load_torch_state_dicts([sd_0, ..., sd_N-1]) (and "
                "optimizer.torch_state_dicts() for the reverse)"
            )
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
        checked: dict[str, dict[str, Any]] = {}
        for name, s in state_dict["state"].items():
            if name not in params:
                raise ValueError(f"optimizer state names parameter {name!r}, which the batch lacks")
            p = params[name]
            restored: dict[str, Any] = {}
            for k, v in s.items():
                if isinstance(v, Tensor):
                    expected = (p.shape[0],) if k in self._small_keys() else tuple(p.shape)
                    if v.dim() > 0 and tuple(v.shape) != expected:
                        raise ValueError(
                            f"optimizer state {name!r}/{k!r} has shape {tuple(v.shape)}, "
                            f"expected {expected} (parameter {name!r} is {tuple(p.shape)})"
                        )
                restored[k] = v
            checked[name] = restored
        for g, saved in zip(self.param_groups, groups, strict=False):
            for k, v in saved.items():
                if k == "params":
                    continue
                g[k] = tuple(v) if k in _PAIR_HPARAMS else v
        self._slots = None
        self._build_slots()
        self._import_state(checked)

    # ---------------------------------------------------------------- torch.optim interop
    def _model_param_names(self) -> list[str]:
        """The batch's parameter names in the order of one model's ``parameters()``."""
        return [name for name, _ in self.batch._template.named_parameters()]

    def torch_state_dicts(self) -> list[dict[str, Any]]:
        """N ``torch.optim`` state dicts, one per model (position order): what the matching
        ``torch.optim`` optimizer over ``batch.extract(i).parameters()`` would hold after
        the same training (load them with ``opt.load_state_dict``)."""
        names = self._model_param_names()
        state = self._export_state(copy=True)
        out = []
        for i, g in enumerate(self.param_groups):
            per_param: dict[int, dict[str, Any]] = {}
            for idx, name in enumerate(names):
                s = state.get(name)
                if s is not None:
                    per_param[idx] = self._to_torch_state({k: v[i] for k, v in s.items()})
            group = {k: v for k, v in g.items() if k not in ("params", "model_id")}
            group.update(self._torch_group_extras())
            group["params"] = list(range(len(names)))
            out.append({"state": per_param, "param_groups": [group]})
        return out

    def load_torch_state_dicts(self, state_dicts: Sequence[Mapping[str, Any]]) -> None:
        """Load N ``torch.optim`` state dicts (model i's optimizer trained alone, e.g.
        ``torch.optim.Adam(model_i.parameters()).state_dict()``) into this optimizer: the
        state tensors and each model's hyper-parameters. Every state dict must have one param
        group covering the model's parameters in ``parameters()`` order."""
        n = len(self.param_groups)
        if len(state_dicts) != n:
            raise ValueError(f"got {len(state_dicts)} torch.optim state dicts for {n} models")
        names = self._model_param_names()
        params = dict(self.batch.stacked_parameters())
        per_name: dict[str, list[dict[str, Any] | None]] = {nm: [None] * n for nm in names}
        for i, sd in enumerate(state_dicts):
            if "model_ids" in sd or "param_groups" not in sd:
                raise ValueError(f"state dict {i} is not a torch.optim state dict")
            pgs = sd["param_groups"]
            if len(pgs) != 1 or list(pgs[0]["params"]) != list(range(len(names))):
                raise ValueError(
                    f"torch.optim state dict of model {i} must have one param group over the "
                    f"model's {len(names)} parameters in parameters() order; got "
                    f"{[len(g['params']) for g in pgs]} parameters in {len(pgs)} groups"
                )
            for idx, s in sd["state"].items():
                name = names[int(idx)]
                per_name[name][i] = self._from_torch_state(dict(s), params[name][i])
        saved: dict[str, dict[str, Any]] = {}
        for name, entries in per_name.items():
            present = [e is not None for e in entries]
            if not any(present):
                continue
            filler = self._missing_torch_state(params[name][0])
            if not all(present) and filler is not None:
                entries = [e if e is not None else filler for e in entries]
            elif not all(present):
                missing = [i for i, ok in enumerate(present) if not ok]
                raise ValueError(
                    f"parameter {name!r} has optimizer state in some models' state dicts but "
                    f"not in models {missing}'s; a vectorised optimizer needs it for all"
                )
            keys = set(entries[0])  # type: ignore[arg-type]
            for i, e in enumerate(entries):
                if set(e) != keys:  # type: ignore[arg-type]
                    raise ValueError(
                        f"parameter {name!r}: model {i}'s state has {sorted(e)}, model 0's "  # type: ignore[arg-type]
                        f"{sorted(keys)}"
                    )
            saved[name] = {
                k: torch.stack([torch.as_tensor(e[k]) for e in entries])  # type: ignore[index]
                for k in keys
            }
        for g, sd in zip(self.param_groups, state_dicts, strict=True):
            src = sd["param_groups"][0]
            for k in self._float_hparams + self._bool_hparams:
                if k in src:
                    g[k] = tuple(src[k]) if k in _PAIR_HPARAMS else src[k]
        for i, g in enumerate(self.param_groups):
            self._validate(g, i)
        self._slots = None
        self._build_slots()
        self._import_state(saved)

    def _to_torch_state(self, s: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in s.items() if k not in self._small_keys()}
        if "step" in s:
            out["step"] = torch.tensor(float(s["step"]), dtype=torch.float32)
        return out

    def _from_torch_state(self, s: dict[str, Any], like: Tensor) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in s.items():
            if k == "step":
                out[k] = torch.as_tensor(float(v), dtype=torch.float64)
            elif isinstance(v, Tensor):
                if v.shape != like.shape:
                    raise ValueError(
                        f"torch.optim state {k!r} has shape {tuple(v.shape)}, the parameter "
                        f"{tuple(like.shape)}"
                    )
                out[k] = v.detach().to(like.dtype)
        return out

    def _missing_torch_state(self, like: Tensor) -> dict[str, Any] | None:
        """State standing for "none" in a torch.optim state dict (None: not allowed)."""
        return None

    def _torch_group_extras(self) -> dict[str, Any]:
        return {}

    def __repr__(self) -> str:
        hp = ", ".join(f"{k}={v!r}" for k, v in self.defaults.items())
        n = len(self.param_groups)
        return f"{type(self).__name__}(N={n}, {hp}; per-model values in param_groups)"


def _looks_like_torch_state(sd: Mapping[str, Any]) -> bool:
    state = sd.get("state", {})
    groups = sd.get("param_groups", [])
    ints = bool(state) and all(isinstance(k, int) for k in state)
    has_params = any(isinstance(g, Mapping) and "params" in g for g in groups)
    return ints or has_params


def _version(t: Tensor) -> int:
    try:
        return int(t._version)
    except RuntimeError:  # inference tensors have no version counter
        return -1


def _grad_2d(grad: Tensor, n: int, name: str) -> Tensor:
    if grad.is_sparse:
        raise RuntimeError(f"vectorised optimizers do not support sparse gradients ({name})")
    return grad.reshape(n, -1)


def _capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (False without CUDA)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _host_to_device(values: Tensor, device: torch.device) -> Tensor:
    """Host values as a tensor on ``device``, without stalling the host on CUDA (a copy from
    pageable memory would wait for the GPU to drain its queue)."""
    if device.type == "cuda":
        return values.pin_memory().to(device, non_blocking=True)
    return values.to(device=device, dtype=_hp_dtype(device))


def _coef_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the per-model coefficients for parameters of ``dtype``: float32 for 16-bit
    floats (the update computes in float32 as torch's own kernels do), else ``dtype``."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _hp_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _optimizer_getstate(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """``opt.__dict__`` for copying/pickling, without the instance-level ``step`` wrapper
    that an LR scheduler installs (it refers to the original optimizer)."""
    state = opt.__dict__.copy()
    state.pop("step", None)
    state.pop("_opt_called", None)
    return state


def gathered_grad(
    p: Tensor,
    grads: list[Tensor],
    c: Mapping[str, Any],
    flags: Mapping[str, Any],
    out: Tensor | None,
    masked: bool = False,
) -> Tensor:
    """The ``[N, w]`` gradient of one flat storage ``p``, ready for the update: the T
    gradients ``[N, w_k]`` gathered into ``out`` (one kernel), negated for ``maximize``
    models, with L2 weight decay added (``flags["wd"] == 1``) or the decoupled decay applied
    to ``p`` (``== 2``) on the parameters that take it, and zeroed for quarantined models
    when ``masked``."""
    g = torch.cat(grads, 1, out=out) if out is not None else torch.cat(grads, 1)
    if flags["maximize"]:
        g.mul_(c["sign"])
    if flags["wd"]:
        for a, b in flags["decay_runs"]:
            if flags["wd"] == 1:
                g[:, a:b].addcmul_(p[:, a:b], c["wd"])
            else:
                p[:, a:b].mul_(c["decay"])
    if masked:  # quarantined models: no gradient reaches their state
        g.masked_fill_(c["inactive"], 0.0)
    return g


def zero_stacked_grads(batch: ModelBatch, set_to_none: bool = True) -> None:
    """Reset the ``.grad`` of every stacked parameter of ``batch`` (``zero_grad``)."""
    grads = []
    for _, p in batch.stacked_parameters():
        if p.grad is None:
            continue
        if set_to_none:
            p.grad = None
        else:
            if p.grad.grad_fn is not None:
                p.grad.detach_()
            else:
                p.grad.requires_grad_(False)
            grads.append(p.grad)
    if grads:
        torch._foreach_zero_(grads)


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
