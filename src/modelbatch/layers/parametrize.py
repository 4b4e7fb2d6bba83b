"""Parametrized weights under vmap: weight_norm, spectral_norm, orthogonal.

``torch.nn.utils.parametrizations.weight_norm`` / ``spectral_norm`` / ``orthogonal`` and the
older ``torch.nn.utils.weight_norm`` compute a layer's weight from other tensors at every
forward. Three things keep them from running in a :class:`~modelbatch.ModelBatch` as they
are:

* ``torch._weight_norm`` (both weight_norm flavours) has no vmap batching rule. A rule is
  registered here: ``v * (g / ||v||)`` with the norm over every dimension but ``dim``, what
  ``torch._weight_norm`` computes, on the stacked ``[N, ...]`` tensors at once.
* ``spectral_norm``'s power iteration (in training mode) writes its ``_u`` / ``_v`` buffers
  with ``out=``, which vmap refuses. Every ``_SpectralNorm`` of the stacked mirror becomes a
  :class:`VmapSpectralNorm` (the class is swapped in place, names unchanged) that writes the
  same values with ``copy_``, one per model.
* The older ``torch.nn.utils.weight_norm`` keeps the computed weight as a non-leaf tensor
  attribute, which ``copy.deepcopy`` refuses; :func:`copy_model` copies such a model with
  that attribute detached (it is recomputed before every forward anyway).
* The older ``torch.nn.utils.spectral_norm`` (a forward pre-hook, common in GAN
  discriminators) also writes ``out=`` in its power iteration: its hook becomes a
  :class:`VmapOldSpectralNorm` (same values with ``copy_``). Like the older weight_norm it
  keeps the computed weight as a plain attribute; the structure check compares such
  attributes by shape and dtype only (:func:`hook_computed_attributes`).

The structure check compares a parametrized module by the class it was made from (each
parametrized module has a class of its own).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import _SpectralNorm

from modelbatch.layers import register_substitution

__all__ = [
    "VmapOldSpectralNorm",
    "VmapSpectralNorm",
    "comparable_copy",
    "copy_model",
    "hook_computed_attributes",
    "refresh_computed_weights",
]


def copy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)``, also for models with the older ``torch.nn.utils.weight_norm``:
    non-leaf tensor attributes (its computed ``weight``) are copied detached (the hook
    recomputes them before every forward; :func:`refresh_computed_weights` does it now)."""
    memo: dict[int, Any] = {}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(model, memo)


def _old_hooks() -> tuple[type, ...]:
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    return (WeightNorm, SpectralNorm)


def _weight_norm_hooks(model: nn.Module) -> list[tuple[nn.Module, Any]]:
    """``(module, hook)`` for every hook of the older ``torch.nn.utils.weight_norm`` /
    ``spectral_norm`` in ``model``."""
    kinds = _old_hooks()
    return [
        (m, hook)
        for m in model.modules()
        for hook in m._forward_pre_hooks.values()
        if isinstance(hook, kinds)
    ]


def hook_computed_attributes(module: nn.Module) -> set[str]:
    """Names of ``module``'s plain attributes that a hook of the older
    ``torch.nn.utils.weight_norm`` / ``spectral_norm`` recomputes before every forward (its
    ``weight``): they follow the parameters, like the parameters differ between models."""
    kinds = _old_hooks()
    hooks: list[Any] = list(module._forward_pre_hooks.values())
    return {str(getattr(h, "name", "")) for h in hooks if isinstance(h, kinds)}


def refresh_computed_weights(model: nn.Module) -> nn.Module:
    """Recompute, in place, the weights the older ``torch.nn.utils.weight_norm`` and
    ``spectral_norm`` keep as attributes, from the module's current tensors (``weight_g`` /
    ``weight_v``; ``weight_orig`` / ``weight_u`` / ``weight_v`` without a power iteration),
    as their hooks do before a forward. Returns ``model``."""
    from torch.nn.utils.spectral_norm import SpectralNorm

    for module, hook in _weight_norm_hooks(model):
        if isinstance(hook, SpectralNorm):
            weight = hook.compute_weight(module, do_power_iteration=False)
        else:
            weight = hook.compute_weight(module)
        setattr(module, hook.name, weight)
    return model


def comparable_copy(template: nn.Module) -> nn.Module:
    """``template`` as a user's model looks (computed weights recomputed), for the structure
    check; ``template`` itself when it has nothing to recompute."""
    if not _weight_norm_hooks(template):
        return template
    return refresh_computed_weights(copy_model(template))


class VmapSpectralNorm(_SpectralNorm):
    """``_SpectralNorm`` whose power iteration updates ``_u`` / ``_v`` in place with
    ``copy_`` instead of ``out=`` (the same values; vmap refuses ``out=``)."""

    @torch.no_grad()
    def _power_method(self, weight_mat: Tensor, n_power_iterations: int) -> None:
        for _ in range(n_power_iterations):
            self._u.copy_(F.normalize(torch.mv(weight_mat, self._v), dim=0, eps=self.eps))
            self._v.copy_(F.normalize(torch.mv(weight_mat.H, self._u), dim=0, eps=self.eps))


def _substitute_spectral(module: nn.Module, context: dict[str, object]) -> nn.Module:
    module.__class__ = VmapSpectralNorm
    return module


register_substitution(_SpectralNorm, _substitute_spectral)


def _old_spectral_norm_class() -> type:
    from torch.nn.utils.spectral_norm import SpectralNorm

    class VmapOldSpectralNormImpl(SpectralNorm):
        """The older ``torch.nn.utils.spectral_norm`` hook, with its power iteration
        writing ``weight_u`` / ``weight_v`` with ``copy_`` instead of ``out=`` (the same
        values; vmap refuses ``out=``)."""

        def compute_weight(self, module: nn.Module, do_power_iteration: bool) -> Tensor:
            weight = getattr(module, self.name + "_orig")
            u = getattr(module, self.name + "_u")
            v = getattr(module, self.name + "_v")
            weight_mat = self.reshape_weight_to_matrix(weight)
            if do_power_iteration:
                with torch.no_grad():
                    for _ in range(self.n_power_iterations):
                        v.copy_(F.normalize(torch.mv(weight_mat.t(), u), dim=0, eps=self.eps))
                        u.copy_(F.normalize(torch.mv(weight_mat, v), dim=0, eps=self.eps))
                    if self.n_power_iterations > 0:  # as torch: the saved u, v are copies
                        u = u.clone(memory_format=torch.contiguous_format)
                        v = v.clone(memory_format=torch.contiguous_format)
            sigma = torch.dot(u, torch.mv(weight_mat, v))
            return weight / sigma

    VmapOldSpectralNormImpl.__name__ = VmapOldSpectralNormImpl.__qualname__ = (
        "VmapOldSpectralNorm"
    )
    return VmapOldSpectralNormImpl


#: The hook class the older spectral_norm's hooks get inside a batch.
VmapOldSpectralNorm = _old_spectral_norm_class()


def swap_old_spectral_norm_hooks(mirror: nn.Module) -> None:
    """Give every hook of the older ``torch.nn.utils.spectral_norm`` in ``mirror`` the class
    :class:`VmapOldSpectralNorm` (in place: the state-dict hooks refer to the same object)."""
    from torch.nn.utils.spectral_norm import SpectralNorm

    for module in mirror.modules():
        for hook in module._forward_pre_hooks.values():
            if type(hook) is SpectralNorm:
                hook.__class__ = VmapOldSpectralNorm


# ----------------------------------------------------------------- torch._weight_norm under vmap
def _norm_except_dim(v: Tensor, dim: int) -> Tensor:
    """``torch.norm_except_dim(v, 2, dim)`` for a stacked ``v`` ``[N, ...]`` (``dim`` counts
    the per-model dimensions; ``-1``: the norm of the whole per-model tensor)."""
    n = v.shape[0]
    if dim == -1:
        return torch.linalg.vector_norm(v.reshape(n, -1), dim=1).view(n, *([1] * (v.dim() - 1)))
    d = dim % (v.dim() - 1) + 1
    dims = [k for k in range(1, v.dim()) if k != d]
    return torch.linalg.vector_norm(v, dim=dims, keepdim=True)


def _weight_norm_vmap(
    info: Any, in_dims: tuple[int | None, ...], v: Tensor, g: Tensor, dim: int = 0
) -> tuple[Tensor, int]:
    """Batching rule of ``torch._weight_norm(v, g, dim)``: per model ``v * (g / ||v||)``.

    ``v``: ``[N, ...]`` after moving the model dimension first (or shared); ``g`` has the
    norm's per-model shape (size of ``v`` along ``dim``, ones elsewhere) or is a scalar.
    """
    n = int(info.batch_size)
    v_dim, g_dim = in_dims[0], in_dims[1]
    v = v.movedim(v_dim, 0) if v_dim is not None else v.expand(n, *v.shape)
    g = g.movedim(g_dim, 0) if g_dim is not None else g.expand(n, *g.shape)
    norm = _norm_except_dim(v, dim)
    g = g.reshape(n, *g.shape[1:], *([1] * (v.dim() - g.dim())))
    return v * (g / norm), 0


_LIB = torch.library.Library("aten", "IMPL")
torch.library.register_vmap("aten::_weight_norm", _weight_norm_vmap, lib=_LIB)
