"""Vectorisation-aware replacements for layers whose plain ``vmap`` behaviour needs help.

When a :class:`~modelbatch.ModelBatch` is built, each submodule of its stacked mirror whose
class has a registered substitution is replaced by a module that computes the same function
for one model (it still runs under ``vmap``), but avoids a missing or broken batching rule,
or adds per-model behaviour. Replacements must keep the original's parameter and buffer
names, so checkpoints and ``extract`` see the same names; they may add buffers of their own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

__all__ = ["register_substitution", "replace_module", "substitute_layers"]

# Called as fn(module, context) -> replacement module (or the same module to keep it).
# ``context["peers"]`` holds, during that call, the N original models' submodules at the
# same path (model i's own settings, e.g. its dropout rate), and ``context["path"]`` the
# submodule's dotted name ("" for the root).
Substitution = Callable[[nn.Module, dict[str, object]], nn.Module]
_SUBSTITUTIONS: dict[type[nn.Module], Substitution] = {}


def register_substitution(cls: type[nn.Module], fn: Substitution) -> None:
    """Register ``fn`` to replace exact instances of ``cls`` (subclasses are not matched)."""
    _SUBSTITUTIONS[cls] = fn


def _load_builtin_substitutions() -> None:
    # Each module registers its substitutions on import.
    from modelbatch.layers import (  # noqa: F401
        attention,
        batchnorm,
        conv,
        dropout,
        embedding,
        linear,
        parametrize,
        recurrent,
        settings,
    )


def substitute_layers(
    mirror: nn.Module, context: dict[str, object], models: Sequence[nn.Module] = ()
) -> nn.Module:
    """Replace every submodule of ``mirror`` that has a registered substitution, the root
    included (a model that *is* an ``nn.Dropout`` or ``nn.BatchNorm2d``).

    ``context`` carries batch-wide facts (``num_models``, ``seeds``, ...). ``models`` are
    the N original models: each substitution sees their submodules at its path as
    ``context["peers"]`` (empty when ``models`` is not given).

    Returns the new root: ``mirror`` itself unless the root was replaced by a new module.
    Submodules are replaced in place.
    """
    _load_builtin_substitutions()
    per_model = [dict(m.named_modules()) for m in models]
    root = mirror
    for name, module, paths in _unique_modules(mirror):
        fn = _SUBSTITUTIONS.get(type(module))
        if fn is None:
            continue
        # One dict for all calls: substitutions may keep batch-wide counters in it.
        context["path"] = name
        context["peers"] = [mods[name] for mods in per_model]
        new = fn(module, context)
        vars(new)["_mb_path"] = name  # named in errors (modelbatch.layers.settings)
        if new is not module:
            root = replace_module(mirror, paths, new)
    from modelbatch.layers.parametrize import swap_old_spectral_norm_hooks

    swap_old_spectral_norm_hooks(root)  # forward pre-hooks, not modules
    return root


def _unique_modules(root: nn.Module) -> list[tuple[str, nn.Module, list[str]]]:
    """``(first name, module, every name)`` for each module of ``root`` once, in
    ``named_modules()`` order: a module registered under several names (one dropout
    applied twice, ``nn.ModuleList([block] * k)``) has several names."""
    names: dict[int, list[str]] = {}
    for name, module in root.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    return [(name, m, names[id(m)]) for name, m in root.named_modules()]


def replace_module(root: nn.Module, paths: Sequence[str], new: nn.Module) -> nn.Module:
    """Put ``new`` at every path in ``paths`` (all names of one module) under ``root``.
    Returns the new root: ``new`` when a path is ``""`` (the root itself), else ``root``."""
    out = root
    for path in paths:
        if not path:
            out = new
            continue
        parent_name, _, attr = path.rpartition(".")
        setattr(root.get_submodule(parent_name), attr, new)
    return out
