"""Kernels per training step by phase, host time, bytes saved for backward and optimizer bytes
per parameter element: ModelBatch, the torch.func recipe with foreach Adam, one model alone.

    python benchmarks/profile_step.py                       # MLP and ResNet-8, N = 1, 8, 64
    python benchmarks/profile_step.py --arch mlp --models 1 8 --ops

Runs on any device (``--device cuda``); see docs/profile.md and
:mod:`modelbatch.bench.profile`.
"""

from __future__ import annotations

from modelbatch.bench.profile import main

if __name__ == "__main__":
    raise SystemExit(main())
