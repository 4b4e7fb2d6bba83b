"""Flat parameter storage of a :class:`~modelbatch.ModelBatch`.

Every stacked parameter ``[N, *shape]`` is its own leaf ``nn.Parameter`` (what
``.parameters()``, ``state_dict()``, hooks and users see), but its memory is a column range
of ONE contiguous ``[N, P]`` tensor per ``(dtype, device)``: model i's values of all its
parameters are row i. An optimizer can then update the whole batch with one kernel per
arithmetic step, whatever N and the number of parameter tensors.

Why separate leaves and not views of one flat leaf: a view of a leaf gets its gradient
through ``slice_backward`` (a full-size zeros plus a copy per tensor, and a sum). Separate
leaves that merely share storage get their gradients from autograd as usual.

Gradients are NOT pre-set to views into a flat gradient buffer (DDP's
gradient-as-bucket-view). A parameter that is a column range of ``[N, P]`` is not
"non-overlapping and dense", so autograd's gradient layout contract asks for a contiguous
gradient; a view into an ``[N, P]`` gradient buffer cannot be contiguous, and every
accumulation would warn ("grad and param do not obey the gradient layout contract"). It would
also cost more: one in-place add per tensor in backward plus one fill in ``zero_grad``
(T + 1 kernels, four passes over the gradient) where autograd otherwise *steals* the
freshly computed gradient (no kernel) and the optimizer gathers the T gradients into its
``[N, P]`` scratch with one ``cat`` (one kernel, two passes; fused into the update when the
optimizer is compiled). So ``.grad`` keeps its exact PyTorch meaning, including
``zero_grad(set_to_none=True)`` and ``p.grad is None`` for a parameter that got no gradient.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = ["FlatGroup", "FlatParams", "flatten_parameters"]


@dataclass(eq=False)
class FlatGroup:
    """The parameters of one ``(dtype, device)``: ``flat`` is ``[N, P]``; parameter ``k``
    (named ``names[k]``, per-model shape ``shapes[k]``) is ``flat[:, starts[k]:ends[k]]``
    viewed as ``[N, *shapes[k]]``."""

    flat: Tensor
    names: list[str]
    params: list[nn.Parameter]
    starts: list[int]
    ends: list[int]
    shapes: list[tuple[int, ...]]
    # The parameters' addresses when last found intact (None: not checked yet).
    addresses: list[int] | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.flat.dtype

    @property
    def device(self) -> torch.device:
        return self.flat.device

    @property
    def width(self) -> int:
        """P, the number of values per model in this group."""
        return int(self.flat.shape[1])

    def column_view(self, buffer: Tensor, k: int) -> Tensor:
        """Parameter ``k``'s part of an ``[N, P]`` tensor laid out like ``flat``, as
        ``[N, *shape]``."""
        n = buffer.shape[0]
        return buffer[:, self.starts[k] : self.ends[k]].view(n, *self.shapes[k])

    def intact(self) -> bool:
        """Whether every parameter still lives at its place in ``flat`` (``.to()``,
        unpickling or an assignment to ``.data`` moves it out)."""
        flat = self.flat
        base = flat.data_ptr()
        size = flat.element_size()
        width = flat.shape[1]
        for p, start, shape in zip(self.params, self.starts, self.shapes, strict=True):
            if p.dtype != flat.dtype or p.device != flat.device or p.shape[1:] != shape:
                return False
            if p.shape[0] != flat.shape[0]:
                return False
            if p.numel() and (
                p.data_ptr() != base + start * size or (p.shape[0] > 1 and p.stride(0) != width)
            ):
                return False
        return True


@dataclass(eq=False)
class FlatParams:
    """All flat groups of a batch, and ``version``: bumped whenever the storage is rebuilt
    (optimizers compare it to know their views of it are current)."""

    groups: list[FlatGroup] = field(default_factory=list)
    version: int = 0

    def __iter__(self) -> Iterator[FlatGroup]:
        return iter(self.groups)

    def roughly_intact(self) -> bool:
        """Every parameter of each storage still starts at its address, and the first one has
        the storage's dtype, device and N (a cheap check: one ``data_ptr`` per tensor; an
        assignment to any parameter's ``.data`` moves it out, and the optimizer would
        otherwise update memory the parameter no longer reads)."""
        for g in self.groups:
            if not g.params:
                continue
            p = g.params[0]
            flat = g.flat
            if p.device != flat.device or p.dtype != flat.dtype or p.shape[0] != flat.shape[0]:
                return False
            addresses = [q.data_ptr() for q in g.params]
            if addresses != g.addresses:
                # First check, or something moved (an empty parameter's address may change
                # without it leaving the storage: the full check decides).
                if not g.intact():
                    return False
                g.addresses = addresses
        return True

    def intact(self, module: nn.Module) -> bool:
        """Whether ``module``'s parameters are exactly the flat ones, at their places."""
        if not all(g.intact() for g in self.groups):
            return False
        mine = {id(p) for g in self.groups for p in g.params}
        theirs = {id(p) for p in module.parameters()}
        return mine == theirs


def _unique_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    # Tied parameters once, under their first name. Trainable parameters first, so that the
    # columns an optimizer updates are one range [0, w) of each flat storage.
    named = list(module.named_parameters())
    return [x for x in named if x[1].requires_grad] + [x for x in named if not x[1].requires_grad]


def flatten_parameters(module: nn.Module, previous: FlatParams | None = None) -> FlatParams:
    """Give every ``[N, ...]`` parameter of ``module`` its place in a flat ``[N, P]`` tensor
    per ``(dtype, device)``, keeping the values (and the Parameter objects, so references to
    them stay valid); tied parameters stay one parameter.

    ``previous``: the storage this replaces; the result's ``version`` is one more.
    """
    named = _unique_parameters(module)
    by_key: dict[tuple[torch.dtype, torch.device], list[tuple[str, nn.Parameter]]] = {}
    for name, p in named:
        if p.dim() == 0:
            raise ValueError(f"stacked parameter {name!r} has no model dimension")
        by_key.setdefault((p.dtype, p.device), []).append((name, p))
    groups = []
    for (dtype, device), items in by_key.items():
        n = items[0][1].shape[0]
        for name, p in items:
            if p.shape[0] != n:
                raise ValueError(
                    f"stacked parameter {name!r} has {p.shape[0]} models, {items[0][0]!r} {n}"
                )
        sizes = [p[0].numel() if n else 0 for _, p in items]
        starts, ends, pos = [], [], 0
        for s in sizes:
            starts.append(pos)
            pos += s
            ends.append(pos)
        flat = torch.empty(n, pos, dtype=dtype, device=device)
        group = FlatGroup(
            flat=flat,
            names=[name for name, _ in items],
            params=[p for _, p in items],
            starts=starts,
            ends=ends,
            shapes=[tuple(p.shape[1:]) for _, p in items],
        )
        with torch.no_grad():
            for k, (_, p) in enumerate(items):
                view = group.column_view(flat, k)
                view.copy_(p.detach())
                # Same Parameter object, new memory: optimizers, hooks and user references
                # to it stay valid.
                p.data = view
        groups.append(group)
    version = previous.version + 1 if previous is not None else 0
    return FlatParams(groups=groups, version=version)


def select_models(module: nn.Module, storage: FlatParams, index: Tensor) -> FlatParams:
    """Keep only the models ``index`` (``[N']`` long, in that order): one ``index_select``
    per flat storage. ``module``'s parameters become new Parameter objects (as after any
    change of N; tied parameters stay tied, ``requires_grad`` is kept, gradients are not)."""
    new_groups = []
    replace: dict[int, nn.Parameter] = {}
    with torch.no_grad():
        for g in storage.groups:
            flat = g.flat.index_select(0, index.to(g.flat.device))
            params = []
            for k, p in enumerate(g.params):
                new = nn.Parameter(g.column_view(flat, k), requires_grad=p.requires_grad)
                replace[id(p)] = new
                params.append(new)
            new_groups.append(
                FlatGroup(
                    flat=flat,
                    names=list(g.names),
                    params=params,
                    starts=list(g.starts),
                    ends=list(g.ends),
                    shapes=list(g.shapes),
                )
            )
    for sub in module.modules():
        store = sub._parameters
        for attr, value in list(store.items()):
            if value is not None and id(value) in replace:
                store[attr] = replace[id(value)]
    return FlatParams(groups=new_groups, version=storage.version + 1)
