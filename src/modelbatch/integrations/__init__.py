"""Optional integrations with other libraries, each imported only when used.

Nothing here imports an optional dependency at ``import modelbatch.integrations`` time: the public
names below are resolved lazily by the module ``__getattr__``, and each integration module imports
its library through :func:`require`, which names the extra to install when the library is missing.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Any

__all__ = [
    "BatchLightningModule",
    "BundledTrainer",
    "CSVLogger",
    "ConfigResult",
    "HFTrainerMixin",
    "JSONLLogger",
    "PerModelEarlyStopping",
    "SuccessiveHalving",
    "SweepResults",
    "TensorBoardLogger",
    "WandbLogger",
    "create_sqlite_study",
    "log_batch_metrics",
    "optimize_batched",
    "require",
    "sweep",
    "tune_bundles",
]

# Public name -> the integration module (relative to this package) that defines it.
_LAZY: dict[str, str] = {
    "BatchLightningModule": "lightning",
    "PerModelEarlyStopping": "lightning",
    "BundledTrainer": "huggingface",
    "HFTrainerMixin": "huggingface",
    "CSVLogger": "logging",
    "JSONLLogger": "logging",
    "TensorBoardLogger": "logging",
    "WandbLogger": "logging",
    "log_batch_metrics": "logging",
    "sweep": "sweeping",
    "ConfigResult": "sweeping",
    "SuccessiveHalving": "sweeping",
    "SweepResults": "sweeping",
    "optimize_batched": "optuna",
    "create_sqlite_study": "optuna",
    "tune_bundles": "ray_tune",
}


def require(module_name: str, extra: str) -> ModuleType:
    """Import an optional dependency, or raise an ImportError that names the extra to install.

    Args:
        module_name: The module to import, e.g. ``"lightning.pytorch"``.
        extra: The modelbatch extra that installs it, e.g. ``"lightning"``.

    Returns:
        The imported module.

    Raises:
        ImportError: The module (or one of its dependencies) is not installed; the message says
            ``pip install -e '.[<extra>]'`` (run in a clone of the ModelBatch repository:
            ``pip install modelbatch`` would install the older 0.1.0 prototype).
    """
    try:
        return importlib.import_module(module_name)
    except ImportError as err:
        raise ImportError(
            f"{module_name!r} is needed for this modelbatch integration but could not be "
            f"imported ({err}); install the modelbatch[{extra}] extra from a clone of the "
            f"ModelBatch repository: pip install -e '.[{extra}]'"
        ) from err


def __getattr__(name: str) -> Any:
    """Resolve an integration's public name on first access, importing only that integration."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """List the public names, including the lazily imported ones."""
    return sorted(set(globals()) | set(__all__))


# ``sweep`` is the function. Its module is ``sweeping``; the old module path
# ``modelbatch.integrations.sweep`` still imports (``from modelbatch.integrations.sweep import
# sweep, ConfigResult`` keeps working) as an alias that does not shadow the function.
from modelbatch.integrations import sweeping as _sweeping  # noqa: E402

sys.modules[f"{__name__}.sweep"] = _sweeping
