"""Checks that a list of models can be stacked, with errors that name the offending model."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = ["ArchitectureMismatchError", "check_same_structure"]


class ArchitectureMismatchError(ValueError):
    """Raised when models given to a ModelBatch are not structurally identical."""


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def _module_class(m: nn.Module) -> type[nn.Module]:
    """The class to compare: a parametrized module (``torch.nn.utils.parametrize``) gets a
    class of its own, created per module instance; compare the class it was made from."""
    cls = type(m)
    if parametrize.is_parametrized(m) and cls.__name__.startswith("Parametrized"):
        return cls.__bases__[0]
    return cls


def check_same_structure(models: Sequence[nn.Module]) -> None:
    """Raise :class:`ArchitectureMismatchError` unless every model matches ``models[0]``.

    Compared, in this order: the module tree (names and classes), the parameter names,
    then each parameter's and buffer's shape, dtype, device and ``requires_grad``.
    The error names the model index and the parameter or module.
    """
    if len(models) == 0:
        raise ValueError("ModelBatch needs at least one model; got an empty list")
    for i, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise TypeError(f"model {i} is a {type(m).__name__}, not a torch.nn.Module")
    ref = models[0]
    ref_modules = [(n, _module_class(m)) for n, m in ref.named_modules()]
    ref_params = dict(ref.named_parameters())
    ref_buffers = dict(ref.named_buffers())
    for i, model in enumerate(models[1:], start=1):
        if model is ref or any(model is other for other in models[:i]):
            raise ValueError(
                f"model {i} is the same object as an earlier model; pass independent copies "
                "(e.g. copy.deepcopy) so that each model has its own weights"
            )
        modules = [(n, _module_class(m)) for n, m in model.named_modules()]
        if modules != ref_modules:
            for (n0, cls0), (n1, cls1) in zip(ref_modules, modules, strict=False):
                if (n0, cls0) != (n1, cls1):
                    raise ArchitectureMismatchError(
                        f"model {i} differs from model 0 in its module tree: submodule "
                        f"{n1 or '<root>'!r} is a {cls1.__name__} where model 0 has "
                        f"{n0 or '<root>'!r} ({cls0.__name__})"
                    )
            raise ArchitectureMismatchError(
                f"model {i} has {len(modules)} submodules where model 0 has {len(ref_modules)}"
            )
        for kind, ref_tensors, tensors in (
            ("parameter", ref_params, dict(model.named_parameters())),
            ("buffer", ref_buffers, dict(model.named_buffers())),
        ):
            if set(tensors) != set(ref_tensors):
                extra = sorted(set(tensors) - set(ref_tensors))
                missing = sorted(set(ref_tensors) - set(tensors))
                raise ArchitectureMismatchError(
                    f"model {i} has different {kind}s from model 0: "
                    f"extra {extra}, missing {missing}"
                )
            for name, t0 in ref_tensors.items():
                t = tensors[name]
                if (t.shape, t.dtype, t.device) != (t0.shape, t0.dtype, t0.device):
                    raise ArchitectureMismatchError(
                        f"model {i}, {kind} {name!r}: {_describe(t)}; model 0 has {_describe(t0)}"
                    )
                if t.requires_grad != t0.requires_grad:
                    raise ArchitectureMismatchError(
                        f"model {i}, {kind} {name!r}: requires_grad={t.requires_grad}, "
                        f"model 0 has requires_grad={t0.requires_grad}"
                    )
