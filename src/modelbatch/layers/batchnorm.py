"""BatchNorm under vmap: mixed precision (autocast) and ``momentum=None``.

Two things break when ``nn.BatchNorm1d/2d/3d`` runs inside ``vmap``:

* **Mixed dtypes** (autocast): the previous layer hands BatchNorm a bf16/fp16 input while
  its weight and running statistics stay float32. A single module handles that, but the
  vmap batching rules do not: the CPU forward rule and the CUDA backward rule fail with
  "expected scalar type BFloat16 but found Float" / "Expected running_mean to have type
  BFloat16 but got Float" (pytorch#184890).
* ``momentum=None`` (cumulative average) calls ``float(num_batches_tracked)``, which vmap
  refuses.

When a :class:`~modelbatch.ModelBatch` is built, every exact ``nn.BatchNorm1d/2d/3d`` of its
stacked mirror becomes the matching ``VmapBatchNorm*`` below (the class is swapped in place,
so parameter and buffer names, and therefore checkpoints and ``extract``, are unchanged).
When the input dtype equals the parameters' dtype and ``momentum`` is a number, its forward
**is** ``nn.BatchNorm``'s (same calls, bit-identical results). With a lower-precision input
it normalises in the parameters' dtype (float32) and casts the output back to the input's
dtype, as cuDNN's mixed-precision BatchNorm does internally; the cost is one upcast and one
downcast of the activation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modelbatch.layers import register_substitution

__all__ = ["VmapBatchNorm1d", "VmapBatchNorm2d", "VmapBatchNorm3d"]


class _VmapBatchNormMixin:
    """Forward shared by the three classes (see the module docstring)."""

    def forward(self, input: Tensor) -> Tensor:
        bn: nn.modules.batchnorm._BatchNorm = self  # type: ignore[assignment]
        ref = bn.running_mean if bn.running_mean is not None else bn.weight
        mixed = ref is not None and input.dtype != ref.dtype and input.is_floating_point()
        cumulative = (
            bn.momentum is None
            and bn.training
            and bn.track_running_stats
            and bn.num_batches_tracked is not None
        )
        if not (mixed or cumulative):
            return super().forward(input)  # type: ignore[misc]
        x = input.to(ref.dtype) if mixed else input  # type: ignore[union-attr]
        out = self._cumulative_forward(x) if cumulative else super().forward(x)  # type: ignore[misc]
        return out.to(input.dtype) if mixed else out

    def _cumulative_forward(self, x: Tensor) -> Tensor:
        """Training step with ``momentum=None``: running statistics are the cumulative
        average over all batches seen, with the factor ``1 / num_batches_tracked`` kept as a
        per-model tensor instead of a Python float."""
        bn: nn.modules.batchnorm._BatchNorm = self  # type: ignore[assignment]
        bn._check_input_dim(x)
        assert bn.num_batches_tracked is not None
        bn.num_batches_tracked.add_(1)
        out = F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
        if bn.running_mean is not None and bn.running_var is not None:
            with torch.no_grad():
                dims = [0, *range(2, x.dim())]
                var, mean = torch.var_mean(x, dim=dims, correction=1)
                factor = 1.0 / bn.num_batches_tracked.to(bn.running_mean.dtype)
                bn.running_mean.mul_(1 - factor).add_(mean.to(factor.dtype) * factor)
                bn.running_var.mul_(1 - factor).add_(var.to(factor.dtype) * factor)
        return out


class VmapBatchNorm1d(_VmapBatchNormMixin, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` that works under vmap with autocast and ``momentum=None``."""


class VmapBatchNorm2d(_VmapBatchNormMixin, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that works under vmap with autocast and ``momentum=None``."""


class VmapBatchNorm3d(_VmapBatchNormMixin, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` that works under vmap with autocast and ``momentum=None``."""


_REPLACEMENTS: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: VmapBatchNorm1d,
    nn.BatchNorm2d: VmapBatchNorm2d,
    nn.BatchNorm3d: VmapBatchNorm3d,
}


def _substitute(module: nn.Module, context: dict[str, object]) -> nn.Module:
    module.__class__ = _REPLACEMENTS[type(module)]
    return module


for _cls in _REPLACEMENTS:
    register_substitution(_cls, _substitute)
