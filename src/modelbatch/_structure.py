"""Which models can share one batch: the structure check and the structure key.

Two models can be trained in one :class:`~modelbatch.ModelBatch` when everything the
stacked copy reads from model 0 is the same in every model: the module tree (paths and
classes), every parameter's and buffer's name, shape, dtype, device and ``requires_grad``,
and every submodule's non-tensor state (its plain attributes, its hooks, its
``extra_repr()`` and its ``training`` flag). :func:`check_same_structure` compares all of
it and names the model, the submodule, the attribute and both values when something
differs; :func:`structure_key` turns the same description into one hashable key, so that
configurations can be grouped into batches before any batch is built.

The settings that people sweep may differ (see :data:`PER_MODEL_SETTINGS`): they become
per-model values inside the batch, and ``batch.extract(model_id)`` gives each model back
its own.
"""

from __future__ import annotations

import functools
import hashlib
import reprlib
import types
import weakref
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.hooks import RemovableHandle

__all__ = [
    "PER_MODEL_SETTINGS",
    "ArchitectureMismatchError",
    "check_per_model_settings",
    "check_same_structure",
    "model_settings",
    "same_setting",
    "structure_key",
]


class ArchitectureMismatchError(ValueError):
    """Raised when models given to a ModelBatch are not structurally identical."""


#: Non-tensor settings that may differ between the models of one batch, by exact module
#: class (subclasses are not matched). Every other difference is refused. Each one is run
#: per model by the layer that replaces the module in the batch (``modelbatch.layers``),
#: which records the N values as ``per_model_<attr>``.
PER_MODEL_SETTINGS: dict[type[nn.Module], tuple[str, ...]] = {
    nn.Dropout: ("p",),
    nn.Dropout1d: ("p",),
    nn.Dropout2d: ("p",),
    nn.Dropout3d: ("p",),
    nn.AlphaDropout: ("p",),
    nn.FeatureAlphaDropout: ("p",),
    nn.BatchNorm1d: ("momentum", "eps"),
    nn.BatchNorm2d: ("momentum", "eps"),
    nn.BatchNorm3d: ("momentum", "eps"),
    nn.LayerNorm: ("eps",),
    nn.GroupNorm: ("eps",),
    nn.LeakyReLU: ("negative_slope",),
}

# What every nn.Module keeps in its __dict__ (parameter, buffer and submodule stores, hook
# tables): compared by their own rules below, never as plain attributes.
_MODULE_INTERNALS = frozenset(vars(nn.Module()))
_HOOK_TABLES = tuple(sorted(k for k in _MODULE_INTERNALS if "hook" in k))
_MAX_DEPTH = 12
# Attributes of third-party objects that are caches, filled by whichever instance runs
# first: they say nothing about what a model computes. By qualified class name.
_CACHES: dict[str, frozenset[str]] = {
    "torch_geometric.inspector.Inspector": frozenset({"_source_dict"}),
}


def _cache_attrs(cls: type) -> frozenset[str]:
    """The cache attributes (see ``_CACHES``) of ``cls`` and its base classes."""
    out: frozenset[str] = frozenset()
    for base in cls.__mro__:
        out |= _CACHES.get(_qualname(base), frozenset())
    return out


_SHOWN = reprlib.Repr()
_SHOWN.maxstring = 80
_SHOWN.maxother = 80


def _show(value: Any) -> str:
    """A short repr of ``value`` for error messages."""
    try:
        return _SHOWN.repr(value)
    except Exception:  # a repr that raises must not hide the real error
        return f"<{type(value).__name__}>"


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _class_key(cls: type) -> Hashable:
    """What the module tree compares for a submodule's class: the class object itself (two
    classes of the same name are different code)."""
    return cls


def _module_class(m: nn.Module) -> type[nn.Module]:
    """The class to compare: a parametrized module (``torch.nn.utils.parametrize``) gets a
    class of its own, created per module instance; compare the class it was made from."""
    cls = type(m)
    if parametrize.is_parametrized(m) and cls.__name__.startswith("Parametrized"):
        return cls.__bases__[0]
    return cls


def _allowed(module: nn.Module) -> tuple[str, ...]:
    return PER_MODEL_SETTINGS.get(type(module), ())


class _PerModel:
    """Stands in for a per-model setting in ``extra_repr()``: those may differ."""

    def __repr__(self) -> str:
        return "<per model>"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)


_PER_MODEL = _PerModel()


def _extra_repr(module: nn.Module, allowed: tuple[str, ...]) -> str:
    """``module.extra_repr()`` with the per-model settings masked (read on a shallow copy,
    so the module itself is not touched)."""
    target = module
    if allowed:
        target = object.__new__(type(module))
        target.__dict__.update(module.__dict__)
        for attr in allowed:
            if attr in target.__dict__:
                target.__dict__[attr] = _PER_MODEL
    try:
        return target.extra_repr()
    except Exception as e:  # compare what we can: the failure itself
        return f"<extra_repr() raised {type(e).__name__}: {e}>"


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


class _Canon:
    """Turns the non-tensor state of one model into hashable, comparable values.

    Tensors that are parameters or buffers of the model are named (their values are
    stacked, not compared), tensors computed from them (with a ``grad_fn``) are compared by
    shape and dtype; other tensors are compared by value. Submodules of the model
    are named by path. Plain objects are compared by class and attributes, functions by
    code and captured values. Cycles and very deep objects end in a marker.
    """

    def __init__(self, model: nn.Module) -> None:
        self.tensor_names: dict[int, str] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            self.tensor_names.setdefault(id(p), f"parameter {name}")
        for name, b in model.named_buffers(remove_duplicate=False):
            self.tensor_names.setdefault(id(b), f"buffer {name}")
        self.module_paths = {id(m): name for name, m in model.named_modules()}
        # storage -> name of the parameter/buffer on it, to recognise views of them
        self.storages: dict[int, str] = {}
        named = [*model.named_parameters(), *model.named_buffers()]
        for name, t in named:
            ptr = _storage_ptr(t)
            if ptr is not None:
                self.storages.setdefault(ptr, name)
        # id -> (object, canonical form); the object is kept so that its id stays unique.
        self.memo: dict[int, tuple[Any, Hashable]] = {}
        self.active: set[int] = set()

    def __call__(self, value: Any, depth: int = 0) -> Hashable:
        if value is None or isinstance(value, (bool, int, str, bytes)):
            return (type(value).__name__, value)
        if isinstance(value, float):
            return ("float", value.hex())
        key = id(value)
        hit = self.memo.get(key)
        if hit is not None:
            return hit[1]
        if key in self.active:
            return ("cycle",)
        if depth > _MAX_DEPTH:
            return ("deep", _qualname(type(value)))
        self.active.add(key)
        try:
            out = self._object(value, depth + 1)
        finally:
            self.active.discard(key)
        self.memo[key] = (value, out)
        return out

    def _object(self, v: Any, depth: int) -> Hashable:
        if isinstance(v, torch.Tensor):
            name = self.tensor_names.get(id(v))
            return ("tensor-ref", name) if name is not None else self._tensor(v)
        if isinstance(v, nn.Module):
            path = self.module_paths.get(id(v))
            if path is not None:
                return ("module-ref", path)
            described = _module_state(v, self, ())
            return (
                "module",
                _class_key(type(v)),
                tuple(sorted((what, c) for what, (c, _) in described.items())),
                tuple((k, self(t, depth)) for k, t in v._parameters.items()),
                tuple((k, self(t, depth)) for k, t in v._buffers.items()),
                tuple((k, self(m, depth)) for k, m in v._modules.items()),
            )
        if isinstance(v, RemovableHandle):
            # A handle to a registered hook (e.g. kept by HuggingFace's gradient
            # checkpointing): bookkeeping whose ids differ between instances; the hooks
            # themselves are compared with each module's hook tables.
            return ("hook-handle",)
        if isinstance(v, weakref.ref):
            return ("weakref", self(v(), depth))
        if isinstance(v, (list, tuple)):
            return (_qualname(type(v)), tuple(self(e, depth) for e in v))
        if isinstance(v, Mapping):
            items = [(self(k, depth), self(x, depth)) for k, x in v.items()]
            return (_qualname(type(v)), tuple(sorted(items, key=repr)))
        if isinstance(v, (set, frozenset)):
            return (_qualname(type(v)), tuple(sorted((self(e, depth) for e in v), key=repr)))
        if isinstance(v, complex):
            return ("complex", v.real.hex(), v.imag.hex())
        if isinstance(v, type):
            return ("type", _qualname(v), id(v))
        if isinstance(v, (torch.dtype, torch.device, torch.memory_format, torch.layout)):
            return ("torch", str(v))
        if isinstance(v, types.FunctionType):
            cells = tuple(self(c.cell_contents, depth) if _cell_full(c) else ("empty",)
                          for c in (v.__closure__ or ()))  # fmt: skip
            return (
                "function",
                v.__module__,
                v.__qualname__,
                id(v.__code__),
                self(v.__defaults__, depth),
                self(v.__kwdefaults__, depth),
                cells,
            )
        if isinstance(v, types.MethodType):
            return ("method", self(v.__func__, depth), self(v.__self__, depth))
        if isinstance(v, functools.partial):
            return ("partial", self(v.func, depth), self(v.args, depth), self(v.keywords, depth))
        if isinstance(v, (types.BuiltinFunctionType, types.BuiltinMethodType)):
            owner = getattr(v, "__self__", None)
            own = None if owner is None or isinstance(owner, types.ModuleType) else self(owner)
            return ("builtin", getattr(v, "__module__", None), v.__qualname__, own)
        if hasattr(v, "tobytes") and hasattr(v, "dtype") and hasattr(v, "shape"):
            try:  # NumPy arrays and scalars
                return ("array", str(v.dtype), tuple(v.shape), _digest(v.tobytes()))
            except Exception:
                pass
        state = getattr(v, "__dict__", None)
        slots = [s for c in type(v).__mro__ for s in getattr(c, "__slots__", ())]
        if isinstance(state, dict) or slots:
            skip = _cache_attrs(type(v))
            if skip and isinstance(state, dict):
                state = {k: x for k, x in state.items() if k not in skip}
            slot_values = tuple(
                (s, self(getattr(v, s), depth))
                for s in slots
                if isinstance(s, str) and hasattr(v, s)
            )
            return ("object", _qualname(type(v)), self(dict(state or {}), depth), slot_values)
        try:
            hash(v)
        except TypeError:
            return ("repr", _qualname(type(v)), _show(v))
        return ("value", _qualname(type(v)), v)

    @staticmethod
    def _tensor(t: torch.Tensor) -> Hashable:
        # A tensor computed from the parameters (with a grad_fn) is compared by value like
        # any other: a batch runs model 0's. (The weight that the older weight_norm /
        # spectral_norm hooks recompute before every forward is left out by _module_state.)
        head = ("tensor", tuple(t.shape), str(t.dtype), str(t.device), t.requires_grad)
        try:
            data = t.detach()
            if data.layout != torch.strided:
                data = data.to_dense()
            raw = data.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        except Exception:  # meta, fake or other tensors without readable values
            return (*head, "unreadable")
        return (*head, _digest(raw))


def _storage_ptr(t: torch.Tensor) -> int | None:
    try:
        ptr = t.untyped_storage().data_ptr()
    except Exception:  # meta, fake or sparse tensors
        return None
    return int(ptr) if ptr else None


def _cell_full(cell: Any) -> bool:
    try:
        cell.cell_contents  # noqa: B018
    except ValueError:
        return False
    return True


# Key of the state entry that marks a plain tensor attribute viewing a parameter or buffer.
_VIEW = "view of a parameter"


def _hook_computed(module: nn.Module) -> set[str]:
    if not module._forward_pre_hooks:
        return set()
    from modelbatch.layers.parametrize import hook_computed_attributes

    return hook_computed_attributes(module)


def _module_state(
    module: nn.Module, canon: _Canon, allowed: tuple[str, ...]
) -> dict[str, tuple[Hashable, Any]]:
    """``{what: (canonical value, value shown in errors)}`` for one submodule's non-tensor
    state: plain attributes (except the per-model ``allowed`` ones), hook tables,
    non-persistent buffer names and ``extra_repr()``. The ``training`` flag is separate."""
    state: dict[str, tuple[Hashable, Any]] = {}
    skip = _cache_attrs(type(module))
    computed = _hook_computed(module)
    for attr, value in vars(module).items():
        if attr in _MODULE_INTERNALS or attr in allowed or attr in skip:
            continue
        if attr in computed and isinstance(value, torch.Tensor):
            # Recomputed from the parameters by the older weight_norm / spectral_norm hook
            # before every forward: differs with the weights, like they do.
            shown = f"<computed {tuple(value.shape)} {value.dtype}>"
            state[f"attribute {attr!r}"] = (shown, shown)
            continue
        if isinstance(value, torch.Tensor) and id(value) not in canon.tensor_names:
            ptr = _storage_ptr(value)
            viewed = canon.storages.get(ptr) if ptr is not None else None
            if viewed is not None:  # a view of a parameter / buffer, kept as an attribute
                state[_VIEW] = (("view", attr, viewed), (attr, viewed))
        state[f"attribute {attr!r}"] = (canon(value), value)
    for table in _HOOK_TABLES:
        hooks = getattr(module, table, None)
        if isinstance(hooks, Mapping):
            if hooks:  # hook ids (the keys) differ between instances; the hooks do not
                values = list(hooks.values())
                state[f"hooks {table}"] = (canon(values), [_show(h) for h in values])
        elif hooks is not None:
            state[f"hooks {table}"] = (canon(hooks), hooks)
    if module._non_persistent_buffers_set:
        names = sorted(module._non_persistent_buffers_set)
        state["non-persistent buffers"] = (tuple(names), names)
    text = _extra_repr(module, allowed)
    state["extra_repr()"] = (text, text)
    return state


class _Signature:
    """Everything the structure check compares for one model."""

    def __init__(self, model: nn.Module) -> None:
        self.canon = canon = _Canon(model)
        self.modules: list[tuple[str, type[nn.Module]]] = []
        self.training: dict[str, bool] = {}
        self.states: dict[str, dict[str, tuple[Hashable, Any]]] = {}
        for name, m in model.named_modules():
            self.modules.append((name, _module_class(m)))
            self.training[name] = m.training
            self.states[name] = _module_state(m, canon, _allowed(m))
        self.tensors = {
            kind: dict(named)
            for kind, named in (
                ("parameter", model.named_parameters()),
                ("buffer", model.named_buffers()),
            )
        }

    def key(self) -> tuple[Hashable, ...]:
        modules = tuple(
            (
                name,
                _class_key(cls),
                self.training[name],
                tuple(sorted((what, c) for what, (c, _) in self.states[name].items())),
            )
            for name, cls in self.modules
        )
        tensors = tuple(
            (kind, name, tuple(t.shape), str(t.dtype), str(t.device), t.requires_grad)
            for kind, named in self.tensors.items()
            for name, t in named.items()
        )
        return (modules, tensors)


def structure_key(model: nn.Module) -> tuple[Hashable, ...]:
    """A hashable key such that two models can share one ModelBatch iff their keys are equal.

    It covers the module tree (paths and classes), every parameter's and buffer's name,
    shape, dtype, device and ``requires_grad``, each submodule's ``training`` flag, plain
    attributes (strides, paddings, flags, constant tensors by value, ...), hooks and
    ``extra_repr()``, but not the per-model settings of :data:`PER_MODEL_SETTINGS`
    (dropout rate, normalisation eps, BatchNorm momentum, LeakyReLU slope), which may
    differ inside one batch. Used to group sweep configurations into batches.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"structure_key takes a torch.nn.Module, got {type(model).__name__}")
    return _Signature(model).key()


def model_settings(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The per-model settings of one model: ``{submodule path: {attribute: value}}`` for
    every submodule whose class is in :data:`PER_MODEL_SETTINGS`."""
    out: dict[str, dict[str, Any]] = {}
    for name, m in model.named_modules():
        attrs = {a: m.__dict__[a] for a in _allowed(m) if a in m.__dict__}
        if attrs:
            out[name] = attrs
    return out


def _label(i: int, model_ids: Sequence[Any] | None) -> str:
    if model_ids is None or model_ids[i] == i:
        return f"model {i}"
    return f"model {i} (id {model_ids[i]!r})"


def _submodule(name: str, cls: type) -> str:
    return f"submodule {name or '<root>'!r} ({cls.__name__})"


_RULE = (
    "Only these settings may differ between the models of one batch: dropout p, "
    "BatchNorm momentum and eps, LayerNorm/GroupNorm eps, LeakyReLU negative_slope. "
    "Put models that differ in anything else in separate batches "
    "(modelbatch._structure.structure_key groups them)."
)


def check_same_structure(
    models: Sequence[nn.Module],
    *,
    model_ids: Sequence[Any] | None = None,
    compare_training: bool = True,
) -> None:
    """Raise :class:`ArchitectureMismatchError` unless every model matches ``models[0]``.

    Compared, in this order: the module tree (names and classes), the parameter and buffer
    names, each parameter's and buffer's shape, dtype, device and ``requires_grad``, then
    each submodule's ``training`` flag (unless ``compare_training=False``) and non-tensor
    state (plain attributes, hooks, ``extra_repr()``), except the per-model settings of
    :data:`PER_MODEL_SETTINGS`. The error names the model (``model_ids`` add their ids),
    the submodule, the attribute and both values.
    """
    if len(models) == 0:
        raise ValueError("ModelBatch needs at least one model; got an empty list")
    for i, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise TypeError(f"model {i} is a {type(m).__name__}, not a torch.nn.Module")
    for i, model in enumerate(models[1:], start=1):
        if any(model is other for other in models[:i]):
            raise ValueError(
                f"model {i} is the same object as an earlier model; pass independent copies "
                "(e.g. copy.deepcopy) so that each model has its own weights"
            )
    ref = _Signature(models[0])
    _refuse_views(ref)
    for i, model in enumerate(models[1:], start=1):
        _compare(ref, _Signature(model), _label(i, model_ids), compare_training)


def _refuse_views(sig: _Signature) -> None:
    """A plain tensor attribute that is a view of a parameter or buffer (``self.wt =
    self.lin.weight.t()``, made when the model was built) follows the weight alone; a batch
    cannot keep one per model (it would stay model 0's, never updated): refused."""
    for name, cls in sig.modules:
        found = sig.states[name].get(_VIEW)
        if found is not None:
            attr, viewed = found[1]
            raise ArchitectureMismatchError(
                f"{_submodule(name, cls)}: attribute {attr!r} is a view of {viewed!r} made "
                "when the model was built. Alone it follows the weight through training; in "
                "a ModelBatch it would stay model 0's tensor for every model. Way out: compute "
                "it in forward (e.g. `x @ self.lin.weight.t()`), or use a property"
            )


def _compare(ref: _Signature, sig: _Signature, who: str, compare_training: bool) -> None:
    if sig.modules != ref.modules:
        for (n0, cls0), (n1, cls1) in zip(ref.modules, sig.modules, strict=False):
            if (n0, cls0) != (n1, cls1):
                raise ArchitectureMismatchError(
                    f"{who} differs from model 0 in its module tree: submodule "
                    f"{n1 or '<root>'!r} is a {cls1.__name__} where model 0 has "
                    f"{n0 or '<root>'!r} ({cls0.__name__})"
                )
        raise ArchitectureMismatchError(
            f"{who} has {len(sig.modules)} submodules where model 0 has {len(ref.modules)}"
        )
    for kind, ref_tensors in ref.tensors.items():
        tensors = sig.tensors[kind]
        if set(tensors) != set(ref_tensors):
            extra = sorted(set(tensors) - set(ref_tensors))
            missing = sorted(set(ref_tensors) - set(tensors))
            raise ArchitectureMismatchError(
                f"{who} has different {kind}s from model 0: extra {extra}, missing {missing}"
            )
        for name, t0 in ref_tensors.items():
            t = tensors[name]
            if (t.shape, t.dtype, t.device) != (t0.shape, t0.dtype, t0.device):
                raise ArchitectureMismatchError(
                    f"{who}, {kind} {name!r}: {_describe(t)}; model 0 has {_describe(t0)}"
                )
            if t.requires_grad != t0.requires_grad:
                raise ArchitectureMismatchError(
                    f"{who}, {kind} {name!r}: requires_grad={t.requires_grad}, "
                    f"model 0 has requires_grad={t0.requires_grad}"
                )
    for name, cls in ref.modules:
        where = f"{who} differs from model 0 in {_submodule(name, cls)}"
        if compare_training and sig.training[name] != ref.training[name]:
            mode = {True: "training", False: "eval"}
            raise ArchitectureMismatchError(
                f"{where}: it is in {mode[sig.training[name]]} mode where model 0's is in "
                f"{mode[ref.training[name]]} mode. Give every model the same train/eval modes "
                "(the same model.train()/.eval() calls) before building the batch."
            )
        state, ref_state = sig.states[name], ref.states[name]
        for what in [*ref_state, *(w for w in state if w not in ref_state)]:
            c, shown = state.get(what, (None, "<absent>"))
            c0, shown0 = ref_state.get(what, (None, "<absent>"))
            if c != c0:
                if what.startswith("attribute") and what in state and what in ref_state:
                    # Name the innermost field that differs (a config's dropout rate, ...).
                    inner, shown, shown0 = _first_difference(shown, shown0, sig.canon, ref.canon)
                    what += inner
                raise ArchitectureMismatchError(
                    f"{where}: {what} is {_show(shown)} where model 0 has {_show(shown0)}. " + _RULE
                )


def _fields(value: Any) -> dict[str, Any] | None:
    """The parts of a container or plain object, named as in Python (``[0]``, ``['k']``,
    ``.attr``); ``None`` for anything else."""
    if isinstance(value, Mapping):
        return {f"[{k!r}]": v for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return {f"[{i}]": v for i, v in enumerate(value)}
    if isinstance(value, (torch.Tensor, nn.Module, type)) or callable(value):
        return None
    state = getattr(value, "__dict__", None)
    if isinstance(state, dict):
        return {f".{k}": v for k, v in state.items()}
    return None


def _first_difference(a: Any, b: Any, ca: _Canon, cb: _Canon) -> tuple[str, Any, Any]:
    """``(path, a part, b part)`` of the first part where ``a`` and ``b`` differ, going
    into containers and objects while they are too long to show whole."""
    path = ""
    for _ in range(_MAX_DEPTH):
        # Mappings and plain objects ("<X object at 0x...>" says nothing) are always opened,
        # sequences only when too long to show whole.
        named = isinstance(a, Mapping) or type(a).__repr__ is object.__repr__
        if not named and len(_show(a)) < 60 and len(_show(b)) < 60:
            break
        fa, fb = _fields(a), _fields(b)
        if fa is None or fb is None or type(a) is not type(b):
            break
        for k in [*fa, *(k for k in fb if k not in fa)]:
            if k not in fa or k not in fb:
                return path + k, fa.get(k, "<absent>"), fb.get(k, "<absent>")
            if ca(fa[k]) != cb(fb[k]):
                path, a, b = path + k, fa[k], fb[k]
                break
        else:
            break
    return path, a, b


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_per_model_settings(
    stacked: nn.Module,
    settings: Sequence[Mapping[str, Mapping[str, Any]]],
    model_ids: Sequence[Any] | None = None,
) -> None:
    """Check that every per-model setting that differs between the models is run per model.

    ``settings[i]`` is :func:`model_settings` of model i. Where the N values of a setting
    ``attr`` differ, the module at that path in ``stacked`` (after layer substitution) must
    record them as ``per_model_<attr>``, equal to the N values; otherwise every model would
    run model 0's value, and this raises :class:`ArchitectureMismatchError`.
    """
    if not settings:
        return
    modules = dict(stacked.named_modules())
    for path, attrs in settings[0].items():
        for attr in attrs:
            values = [s[path][attr] for s in settings]
            if all(same_setting(v, values[0]) for v in values):
                continue
            sub = modules.get(path)
            recorded = getattr(sub, f"per_model_{attr}", None)
            if (
                recorded is not None
                and len(recorded) == len(values)
                and all(same_setting(a, b) for a, b in zip(recorded, values, strict=True))
            ):
                continue
            i = next(k for k, v in enumerate(values) if not same_setting(v, values[0]))
            cls = type(sub).__name__ if sub is not None else "?"
            raise ArchitectureMismatchError(
                f"{_label(i, model_ids)} differs from model 0 in submodule "
                f"{path or '<root>'!r} ({cls}): attribute {attr!r} is {_show(values[i])} where "
                f"model 0 has {_show(values[0])}, and this batch has no per-model "
                f"{attr} for that layer. Put models with different {attr} in separate batches."
            )


def same_setting(a: Any, b: Any) -> bool:
    """Equal settings: numbers by value (``0`` and ``0.0`` are the same rate), NaN equal to
    NaN, anything else (``None``, ...) by type and ``==``."""
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool):
        if isinstance(b, bool):
            return False
        fa, fb = float(a), float(b)
        return fa == fb or (fa != fa and fb != fb)
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:
        return a is b
