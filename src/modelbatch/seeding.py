"""Per-model seeds: model i's random streams depend on its own seed only, not on N.

* :func:`seeded_models` builds each model under its own seed (initialisation).
* ``ModelBatch(models, seeds=...)`` gives every dropout layer a per-model, counter-based
  stream (see :mod:`modelbatch.layers.dropout`).
* :func:`derive_seeds` turns one base seed into per-model seeds; seed i depends only on
  ``(base_seed, i)``, so adding models to a sweep does not change the existing ones.
* :func:`use_seeded_dropout` puts the same dropout into a plain module, so one model of a
  batch can be reproduced outside it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from modelbatch.layers.dropout import _FEATURE_DIMS, _seeded_replacement

__all__ = ["check_seeds", "derive_seeds", "seeded_models", "use_seeded_dropout"]

_MAX_SEED = 2**63 - 1


def check_seeds(seeds: Sequence[int], n: int) -> list[int]:
    """Validate per-model seeds: ``n`` Python ints in ``[0, 2**63)``. Returns them as a list."""
    seeds_list = list(seeds)
    if len(seeds_list) != n:
        raise ValueError(f"got {len(seeds_list)} seeds for {n} models")
    out = []
    for i, s in enumerate(seeds_list):
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)):
            raise TypeError(f"seed of model {i} must be an int, got {type(s).__name__}")
        if not 0 <= int(s) <= _MAX_SEED:
            raise ValueError(f"seed of model {i} must lie in [0, 2**63), got {s}")
        out.append(int(s))
    return out


def derive_seeds(base_seed: int, n: int, start: int = 0) -> list[int]:
    """``n`` well-mixed per-model seeds; seed ``k`` depends only on ``(base_seed, start + k)``.

    Uses :class:`numpy.random.SeedSequence` with spawn key ``(start + k,)``.
    """
    if n < 0 or start < 0:
        raise ValueError(f"n and start must be non-negative, got n={n}, start={start}")
    out = []
    for k in range(start, start + n):
        state = np.random.SeedSequence(base_seed, spawn_key=(k,)).generate_state(2, np.uint64)
        out.append(int(state[0]) & _MAX_SEED)
    return out


def seeded_models(factory: Callable[[], nn.Module], seeds: Sequence[int]) -> list[nn.Module]:
    """Build one model per seed, each with torch's global RNG seeded by its own seed.

    Model i's initialisation depends only on ``seeds[i]`` (and ``factory``); the caller's
    global RNG state (CPU and CUDA) is left as it was. Only torch's RNG is seeded: a
    factory that draws from Python's ``random`` or NumPy must seed those itself.

    Args:
        factory: builds one model, e.g. ``lambda: nn.Linear(4, 2)``.
        seeds: one non-negative int per model.

    Returns:
        ``len(seeds)`` models.
    """
    seeds_list = check_seeds(seeds, len(list(seeds)))
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    models = []
    for s in seeds_list:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(s)
            models.append(factory())
    return models


def use_seeded_dropout(module: nn.Module, seed: int) -> nn.Module:
    """Replace the dropout layers of a plain module by :class:`SeededDropout`.

    Every layer of the dropout family (``nn.Dropout``, ``nn.Dropout1d/2d/3d``,
    ``nn.AlphaDropout``, ``nn.FeatureAlphaDropout``) is replaced in place, numbered in the
    order a :class:`~modelbatch.ModelBatch` numbers them, and the dropout between the layers
    of an ``nn.LSTM``/``nn.GRU``/``nn.RNN`` is seeded as in a batch (the layer becomes its
    ``modelbatch.layers.recurrent`` counterpart, same parameters), so the returned module, trained
    alone, draws exactly the dropout masks that model i of a batch built with
    ``seeds[i] == seed`` draws. Returns ``module``, or its replacement when ``module``
    itself is a dropout layer.
    """
    from modelbatch.layers import _unique_modules, replace_module
    from modelbatch.layers.recurrent import seeded_inter_layer_dropout

    (seed,) = check_seeds([seed], 1)
    layer = 0
    root = module
    for _, sub, paths in _unique_modules(module):
        if type(sub) in (nn.LSTM, nn.GRU, nn.RNN):
            # Its dropout between layers is seeded in a batch too (and numbered first).
            assert isinstance(sub, nn.RNNBase)
            if sub.dropout > 0 and sub.num_layers > 1:
                layer = seeded_inter_layer_dropout(sub, seed, layer)
            continue
        if type(sub) not in _FEATURE_DIMS:
            continue
        new = _seeded_replacement(sub, seed, layer)
        layer += 1
        # Every name of the layer (one dropout registered twice is one layer, as in a
        # batch); the module itself when it is a dropout layer.
        root = replace_module(module, paths, new)
    return root
