"""torchvision and timm: not importable with this CPU build of torch.

From PyPI, torchvision installs next to the pinned CPU torch only with ``--no-deps``, and then
``import torchvision`` fails registering its C++ operators (``operator torchvision::nms does
not exist``); timm imports torchvision. They are therefore not installed in the test
environment (an installed but broken torchvision would also break transformers, which imports
it when present). Their cases are listed as skipped with that reason.
"""

from __future__ import annotations

from tests.zoo.cases import Case

CASES: list[Case] = []
SKIPPED: dict[str, str] = {}

for _pkg, _archs in (("torchvision", ("resnet18", "mobilenet_v3_small")), ("timm", ("vit_tiny",))):
    try:
        __import__(_pkg)
    except Exception as _e:  # ImportError, or RuntimeError from torchvision's C ops
        for _a in _archs:
            SKIPPED[f"{_pkg}.{_a}"] = (
                f"{_pkg} cannot be imported with the pinned CPU torch (installs only with "
                f"--no-deps, then fails registering torchvision's C++ ops): {_e!r}"
            )[:300]
    else:  # pragma: no cover - not the case on the pinned CPU torch
        for _a in _archs:
            SKIPPED[f"{_pkg}.{_a}"] = f"{_pkg} imports here, but its zoo cases are not written"
