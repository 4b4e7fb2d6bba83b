"""Calling one model's forward with one model's slice of the stacked tensors (under vmap).

:func:`torch.func.functional_call` does this for plain modules, but three things that real
models do break it, so the batch swaps the tensors in itself:

* **A submodule registered under two names** (``nn.ModuleList([block] * k)``, a backbone
  referenced twice): ``functional_call`` restores the original tensors in the wrong order and
  leaves a per-model tensor inside the module (pytorch#164759). Here every
  ``(module, slot)`` pair is swapped exactly once, whatever the number of names it has, and
  tied tensors (one tensor under two names, e.g. GPT-2's embedding and LM head) receive the
  same per-model tensor.
* **A buffer re-assigned in forward** (``self.ema = 0.9 * self.ema + 0.1 * x.mean(0)``):
  ``functional_call`` writes the new value into its own dict only, so the stacked buffer
  never changes. Here the new values are read back after the call and returned, so the
  batch can write them into the stacked ``[N, ...]`` buffers.
* **Tensor attributes set in forward** (the older ``torch.nn.utils.weight_norm`` sets
  ``module.weight`` before every call, caches): a per-model tensor would escape vmap. Plain
  tensor attributes are restored to their values from before the call.

Activation checkpointing (``torch.utils.checkpoint``) re-runs the checkpointed function in
``backward``, outside vmap, where the module holds the stacked ``[N, ...]`` tensors, so it
cannot recompute one model. While a batch runs, checkpointed functions run once, directly
(:func:`checkpoint_runs_directly`): the same values and gradients (the recomputation only
saves memory), without the memory saving.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn

__all__ = [
    "CallPlan",
    "OutputLayout",
    "Slot",
    "call_with_tensors",
    "checkpoint_runs_directly",
    "no_fused_transformer_path",
    "tensor_slots",
]

# (module, "_parameters" or "_buffers", attribute, key in the params/buffers dict)
Slot = tuple[nn.Module, str, str, str]


def tensor_slots(root: nn.Module) -> list[Slot]:
    """Every place a parameter or buffer of ``root`` lives, with the name under which
    ``named_parameters()`` / ``named_buffers()`` (duplicates removed) list its tensor.

    A module registered under several names appears once; a tensor registered in several
    modules (tied weights) appears once per module, all with the same key.
    """
    key_of: dict[int, str] = {}
    for name, p in root.named_parameters():
        key_of[id(p)] = name
    for name, b in root.named_buffers():
        key_of.setdefault(id(b), name)
    slots: list[Slot] = []
    for module in root.modules():  # each module object once
        for kind in ("_parameters", "_buffers"):
            store: dict[str, Tensor | None] = getattr(module, kind)
            for attr, value in store.items():
                if value is not None and id(value) in key_of:
                    slots.append((module, kind, attr, key_of[id(value)]))
    return slots


# Forward hooks that call ``output.requires_grad_(True)`` so that reentrant activation
# checkpointing sees an input that requires grad (HuggingFace's ``enable_input_require_grads``,
# which its gradient checkpointing installs on every text model, and PEFT's).
_REQUIRE_GRADS_HOOKS = frozenset({"make_inputs_require_grads"})


def _neutralise_require_grads_hooks(module: nn.Module) -> None:
    """Wrap such hooks so that they do nothing on a per-model (vmap-batched) output.

    ``requires_grad_()`` is refused under vmap. Inside a batch it is not needed either:
    checkpointed functions run directly (:func:`checkpoint_runs_directly`), so the
    parameters inside them get their gradients whether or not the input requires grad,
    the same gradients the hook lets reentrant checkpointing give a model alone.
    """
    for key, hook in list(module._forward_hooks.items()):
        if getattr(hook, "__name__", None) in _REQUIRE_GRADS_HOOKS and not getattr(
            hook, "_modelbatch_wrapped", False
        ):

            def wrapped(mod: nn.Module, args: Any, output: Any, _hook: Any = hook) -> Any:
                if _is_per_model(output):
                    return None
                return _hook(mod, args, output)

            wrapped._modelbatch_wrapped = True  # type: ignore[attr-defined]
            wrapped.__name__ = hook.__name__
            module._forward_hooks[key] = wrapped


class CallPlan:
    """What :func:`call_with_tensors` swaps in ``root``, computed once per module tree and
    reused while the tree's tensors stay the same objects (see :meth:`for_module`)."""

    def __init__(self, root: nn.Module) -> None:
        self.slots = tensor_slots(root)
        self.modules = list(root.modules())
        for module in self.modules:
            _neutralise_require_grads_hooks(module)
        self.num_tensors = len({key for *_, key in self.slots})
        # Plain attributes holding a tensor or None (caches), restored after each call
        # when forward left a per-model tensor there.
        self.tensor_attrs = [
            (m, k)
            for m in self.modules
            for k, v in vars(m).items()
            if v is None or isinstance(v, Tensor)
        ]

    def matches(self, params: dict[str, Tensor], buffers: dict[str, Tensor]) -> bool:
        """Whether ``root`` still holds the parameters this plan was made for, under the
        names ``params`` gives them, and buffers under the names of ``buffers`` (these may
        be copies of the module's buffers, see ``ModelBatch.forward``)."""
        if len(params) + len(buffers) != self.num_tensors:
            return False
        for module, kind, attr, key in self.slots:
            if kind == "_parameters":
                if module._parameters.get(attr) is not params.get(key):
                    return False
            elif key not in buffers:
                return False
        return True

    @staticmethod
    def for_module(
        root: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor]
    ) -> CallPlan:
        """The cached plan of ``root`` when it still matches ``params`` / ``buffers`` (the
        stacked tensors, before vmap wraps them), else a new one."""
        plan = vars(root).get(_PLAN_ATTR)
        if not isinstance(plan, CallPlan) or not plan.matches(params, buffers):
            plan = CallPlan(root)
            # Kept on the module itself (a plan refers to its modules, so a weak-keyed cache
            # would keep every module alive).
            vars(root)[_PLAN_ATTR] = plan
        return plan


_PLAN_ATTR = "_modelbatch_call_plan"


def _is_per_model(t: Any) -> bool:
    """Whether ``t`` is a vmap-batched tensor (depends on one model's tensors)."""
    return isinstance(t, Tensor) and bool(torch._C._functorch.is_batchedtensor(t))


def call_with_tensors(
    root: nn.Module,
    plan: CallPlan,
    params: dict[str, Tensor],
    buffers: dict[str, Tensor],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> tuple[Any, dict[str, Tensor]]:
    """``root(*args, **kwargs)`` with ``params`` and ``buffers`` in place of its tensors.

    Returns ``(output, reassigned)`` where ``reassigned`` maps the key of every buffer that
    forward re-assigned (``self.b = new``, rather than updating it in place) to its new value.
    Every swapped tensor and every plain tensor attribute is restored afterwards; plain
    tensor attributes that forward created from per-model tensors are removed.
    """
    given = {**buffers, **params}
    saved: list[tuple[dict[str, Any], str, Any]] = []
    attrs = [(m, k, vars(m).get(k)) for m, k in plan.tensor_attrs]
    sizes = [len(vars(m)) for m in plan.modules]
    reassigned: dict[str, Tensor] = {}
    try:
        for module, kind, attr, key in plan.slots:
            store = getattr(module, kind)
            saved.append((store, attr, store[attr]))
            store[attr] = given[key]
        out = root(*args, **kwargs)
        for module, kind, attr, key in plan.slots:
            if kind != "_buffers":
                continue
            now = module._buffers.get(attr)
            if now is not given[key] and key not in reassigned:
                if not isinstance(now, Tensor):
                    raise TypeError(
                        f"buffer {key!r} was re-assigned in forward to a "
                        f"{type(now).__name__}; a ModelBatch keeps one [N, ...] tensor per "
                        "buffer: assign a tensor of the same shape and dtype"
                    )
                reassigned[key] = now
    finally:
        for store, attr, old in reversed(saved):
            store[attr] = old
        for module, name, old in attrs:
            if _is_per_model(vars(module).get(name)):
                vars(module)[name] = old
        for module, size in zip(plan.modules, sizes, strict=True):
            d = vars(module)
            if len(d) != size:  # forward added attributes: drop per-model tensors
                for k in [k for k, v in d.items() if _is_per_model(v)]:
                    del d[k]
    return out, reassigned


# ----------------------------------------------------------------- outputs
_CONSTANTS = (type(None), bool, int, float, complex, str)


class OutputLayout:
    """How a model's output splits into tensors (stacked by vmap) and constants (``None``,
    numbers, strings: the same for every model, since one Python call computed them)."""

    def __init__(self) -> None:
        self.spec: Any = None
        self.constants: list[Any] = []
        self.is_tensor: list[bool] = []

    def split(self, out: Any) -> list[Tensor]:
        """The tensor leaves of ``out``; remembers the rest. Any other object (a KV cache)
        cannot be stacked and is refused."""
        leaves, self.spec = pytree.tree_flatten(out)
        self.is_tensor = [isinstance(leaf, Tensor) for leaf in leaves]
        self.constants = [
            None if t else leaf for leaf, t in zip(leaves, self.is_tensor, strict=True)
        ]
        for leaf, t in zip(leaves, self.is_tensor, strict=True):
            if not t and not isinstance(leaf, _CONSTANTS):
                raise TypeError(
                    f"a model's forward returned a {type(leaf).__name__} inside its output; a "
                    "ModelBatch stacks the N models' outputs into [N, ...] tensors, so the "
                    "output may hold tensors (in tuples, lists, dicts or HuggingFace "
                    "ModelOutputs) and constants (None, numbers, strings) only. KV caches and "
                    "other objects cannot be stacked. Way out: do not return them "
                    "(HuggingFace: pass use_cache=False), or wrap the model in a module that "
                    "returns only its tensors"
                )
        return [leaf for leaf, t in zip(leaves, self.is_tensor, strict=True) if t]

    @torch.compiler.disable  # plain Python on the outputs (dynamo trips over it)
    def join(self, tensors: list[Tensor]) -> Any:
        """The output again, with the stacked ``[N, ...]`` tensors in place."""
        it = iter(tensors)
        leaves = [next(it) if t else c for t, c in zip(self.is_tensor, self.constants, strict=True)]
        return pytree.tree_unflatten(leaves, self.spec)


# ----------------------------------------------------------------- activation checkpointing
_PATCH_LOCK = threading.Lock()
_PATCH_DEPTH = 0


def _requires_grad(t: Tensor) -> bool:
    """``t.requires_grad``, read on the tensor under vmap's wrappers (a batched tensor
    itself does not report it)."""
    while torch._C._functorch.is_batchedtensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return bool(t.requires_grad)


class _RunDirectly:
    """Stands in for ``torch.utils.checkpoint.CheckpointFunction`` (reentrant checkpoint)."""

    @staticmethod
    def apply(function: Any, preserve_rng_state: bool, *args: Any) -> Any:
        del preserve_rng_state
        if not any(isinstance(a, Tensor) and _requires_grad(a) for a in args):
            # Reentrant checkpoint alone: no input requires grad -> the segment's
            # parameters get no gradient (torch warns). Same here.
            warnings.warn(
                "None of the inputs have requires_grad=True. Gradients will be None",
                stacklevel=3,
            )
            with torch.no_grad():
                return function(*args)
        return function(*args)


def _no_recompute_generator(*args: Any, **kwargs: Any) -> Iterator[None]:
    """Stands in for the non-reentrant checkpoint's context generator: do nothing."""
    del args, kwargs
    yield


@contextlib.contextmanager
def no_fused_transformer_path() -> Iterator[None]:
    """Turn off the fused inference path of ``nn.MultiheadAttention`` and
    ``nn.TransformerEncoderLayer`` (``torch.backends.mha``) while active: its fused kernels
    (``_native_multi_head_attention``, ``_transformer_encoder_layer_fwd``) have no vmap
    batching rule, and the regular path computes the same function."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not mha.get_fastpath_enabled():
        yield
        return
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(True)


@contextlib.contextmanager
def checkpoint_runs_directly() -> Iterator[None]:
    """While active, ``torch.utils.checkpoint.checkpoint`` (reentrant or not, and
    ``checkpoint_sequential``) calls the function directly instead of saving its inputs
    for a recomputation in backward. Nested uses are counted; other threads see the change
    too while it is active."""
    import torch.utils.checkpoint as cp

    global _PATCH_DEPTH
    names = ("CheckpointFunction", "_checkpoint_without_reentrant_generator")
    if not all(hasattr(cp, n) for n in names):  # another torch: leave it alone
        yield
        return
    with _PATCH_LOCK:
        if _PATCH_DEPTH == 0:
            _ORIGINALS.update({n: getattr(cp, n) for n in names})
            cp.CheckpointFunction = _RunDirectly  # type: ignore[misc,assignment]
            cp._checkpoint_without_reentrant_generator = _no_recompute_generator  # type: ignore[assignment]
        _PATCH_DEPTH += 1
    try:
        yield
    finally:
        with _PATCH_LOCK:
            _PATCH_DEPTH -= 1
            if _PATCH_DEPTH == 0:
                for n, v in _ORIGINALS.items():
                    setattr(cp, n, v)


_ORIGINALS: dict[str, Any] = {}
