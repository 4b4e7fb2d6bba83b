"""torchvision and timm: not importable with this CPU build of torch.

``import torchvision`` fails registering its C++ operators against the pinned CPU torch
(``operator torchvision::nms does not exist``), and timm imports torchvision; both are only
installable with ``--no-deps`` here. Their cases are listed as skipped with that reason.
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
            SKIPPED[f"{_pkg}.{_a}"] = f"{_pkg} cannot be imported with this torch: {_e!r}"[:300]
    else:  # pragma: no cover - not the case on the pinned CPU torch
        for _a in _archs:
            SKIPPED[f"{_pkg}.{_a}"] = f"{_pkg} imports here, but its zoo cases are not written"
