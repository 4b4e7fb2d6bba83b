"""Mixed precision for a ModelBatch: autocast and a per-model gradient scaler.

``torch.amp.GradScaler`` keeps one loss scale and skips the **whole** optimizer step when
any gradient overflows, so one diverging model would stall all N. :class:`BatchGradScaler`
keeps one scale, one growth tracker and one found-inf flag per model: an overflow in model i
skips model i's update and halves model i's scale only, exactly what
``torch.amp.GradScaler`` does for model i trained alone.

Typical fp16 step::

    scaler = BatchGradScaler(batch)
    with modelbatch.autocast(batch, torch.float16):
        losses = batch.compute_loss(batch(x), y, F.cross_entropy, reduction="none")  # [N]
    opt.zero_grad()
    scaler.scale(losses).backward()
    scaler.step(opt)       # unscales; skips only the models whose gradients overflowed
    scaler.update()

BatchNorm under vmap + autocast is handled by :mod:`modelbatch.layers.batchnorm`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from modelbatch.core import ModelBatch

__all__ = ["BatchGradScaler", "autocast"]


def autocast(
    batch: ModelBatch | torch.device | str,
    dtype: torch.dtype = torch.bfloat16,
    *,
    enabled: bool = True,
) -> torch.autocast:
    """``torch.autocast`` for the batch's device type (``"cuda"``, ``"cpu"``, ...).

    Use it around the forward pass and the loss, as with a single model. BatchNorm layers
    of the batch compute their statistics in float32 under autocast (see
    :mod:`modelbatch.layers.batchnorm`), so BatchNorm models train in bf16 and fp16.
    """
    if isinstance(batch, (torch.device, str)):
        device_type = torch.device(batch).type
    else:
        device_type = batch.device.type
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"autocast dtype must be torch.bfloat16 or torch.float16, got {dtype}")
    return torch.autocast(device_type=device_type, dtype=dtype, enabled=enabled)


def _nonfinite(g: Tensor, n: int) -> Tensor:
    """``[N]`` bool: model i's slice of ``g`` holds a NaN or an infinity."""
    amax = torch.linalg.vector_norm(g.reshape(n, -1), ord=float("inf"), dim=1)
    return ~torch.isfinite(amax)


class BatchGradScaler:
    """A gradient scaler with one loss scale per model (``torch.amp.GradScaler`` per model).

    The API mirrors ``torch.amp.GradScaler`` (``scale``, ``unscale_``, ``step``, ``update``,
    ``get_scale``, ``state_dict``), with per-model ``[N]`` tensors where GradScaler has a
    scalar. Quarantined models (``batch.active`` false) keep their scale and tracker.
    It follows :meth:`ModelBatch.drop`: its tensors shrink with the batch.

    Args:
        batch: the ModelBatch whose optimizers will be stepped through this scaler.
        init_scale: initial scale, shared or one per model.
        growth_factor: factor applied to a model's scale after ``growth_interval``
            consecutive steps without overflow.
        backoff_factor: factor applied to a model's scale after an overflow.
        growth_interval: number of overflow-free steps before growing the scale.
        enabled: with ``False``, every method is a pass-through (``scale`` returns the
            sum of the losses).

    Host syncs: :meth:`step` reads one bool (whether any active model overflowed) per call,
    as ``torch.amp.GradScaler.step`` does; everything else stays on the device.
    """

    def __init__(
        self,
        batch: ModelBatch,
        init_scale: float | Sequence[float] = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        *,
        enabled: bool = True,
    ) -> None:
        if growth_factor <= 1.0:
            raise ValueError(f"growth_factor must be > 1, got {growth_factor}")
        if not 0.0 < backoff_factor < 1.0:
            raise ValueError(f"backoff_factor must lie in (0, 1), got {backoff_factor}")
        if not isinstance(growth_interval, int) or growth_interval <= 0:
            raise ValueError(f"growth_interval must be a positive int, got {growth_interval!r}")
        n = len(batch)
        device = batch.device
        scale = torch.as_tensor(init_scale, dtype=torch.float32, device=device)
        if scale.dim() == 0:
            scale = scale.expand(n).clone()
        if scale.shape != (n,):
            raise ValueError(
                f"init_scale needs a scalar or one value per model ([{n}]), "
                f"got shape {tuple(scale.shape)}"
            )
        if not bool(torch.all(scale > 0)):
            raise ValueError(f"init_scale must be positive, got {scale.tolist()}")
        self.batch = batch
        self._enabled = bool(enabled)
        self._scale = scale
        self._growth_tracker = torch.zeros(n, dtype=torch.int32, device=device)
        self._growth_factor = float(growth_factor)
        self._backoff_factor = float(backoff_factor)
        self._growth_interval = growth_interval
        # Per optimizer (by id): {"found_inf": [N] bool or None, "stepped": bool}.
        self._per_optimizer: dict[int, dict[str, Any]] = {}
        self._last_found_inf = torch.zeros(n, dtype=torch.bool, device=device)
        batch._register_optimizer(self)  # type: ignore[arg-type]  # shrinks with the batch

    # ------------------------------------------------------------------ scaling
    def is_enabled(self) -> bool:
        """Whether scaling is on."""
        return self._enabled

    def get_scale(self) -> Tensor:
        """``[N]`` current scales (a copy; no host sync)."""
        return self._scale.clone()

    @property
    def found_inf(self) -> Tensor:
        """``[N]`` bool: which models had non-finite gradients at the last step."""
        return self._last_found_inf.clone()

    def scale(self, losses: Tensor) -> Tensor:
        """``sum_i scale_i * losses_i``: backpropagating it scales model i's gradient by
        ``scale_i``, as ``GradScaler.scale(loss_i)`` does for model i alone.

        Args:
            losses: the differentiable ``[N]`` per-model losses, e.g.
                ``batch.compute_loss(out, y, loss_fn, reduction="none")``.
        """
        n = len(self.batch)
        if losses.shape != (n,):
            raise ValueError(
                f"BatchGradScaler.scale needs the [N] = [{n}] per-model losses, got shape "
                f"{tuple(losses.shape)}; use batch.compute_loss(..., reduction='none')"
            )
        if not self._enabled:
            return losses.sum()
        return (losses * self._scale.to(losses.device)).sum()

    def _state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        if getattr(optimizer, "batch", None) is not self.batch:
            raise TypeError(
                "BatchGradScaler works with an optimizer built on its ModelBatch "
                "(modelbatch.optim.* or OptimizerFactory(...).build(batch)), got "
                f"{type(optimizer).__name__}"
            )
        return self._per_optimizer.setdefault(
            id(optimizer), {"found_inf": None, "stepped": False}
        )

    @torch.no_grad()
    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide each model's gradients by its scale, in place, and record per model
        whether any of them is NaN or infinite. Call it before clipping gradients."""
        if not self._enabled:
            return
        state = self._state(optimizer)
        if state["found_inf"] is not None:
            raise RuntimeError("unscale_() has already been called on this optimizer since "
                               "the last update().")
        if state["stepped"]:
            raise RuntimeError("unscale_() is being called after step().")
        n = len(self.batch)
        # As GradScaler: the reciprocal in float64, then rounded to float32.
        inv_scale = self._scale.double().reciprocal().float()
        found = torch.zeros(n, dtype=torch.bool, device=self._scale.device)
        for _, p in self.batch.stacked_parameters():
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:
                raise RuntimeError(f"BatchGradScaler does not support sparse gradients ({_})")
            found |= _nonfinite(g, n).to(found.device)
            g.mul_(inv_scale.to(g.device).view(-1, *([1] * (g.dim() - 1))))
        state["found_inf"] = found

    def step(self, optimizer: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        """Unscale (if not done yet) and step ``optimizer``, skipping only the models whose
        gradients overflowed: their parameters and optimizer state stay unchanged."""
        if not self._enabled:
            return optimizer.step(*args, **kwargs)
        if "closure" in kwargs:
            raise RuntimeError("closure use is not supported with BatchGradScaler")
        state = self._state(optimizer)
        if state["stepped"]:
            raise RuntimeError("step() has already been called since the last update().")
        if state["found_inf"] is None:
            self.unscale_(optimizer)
        found = state["found_inf"]
        active = self.batch.active
        skip = found.to(active.device) & active
        if bool(skip.any()):  # the one host sync per step
            saved = active.clone()
            active.logical_and_(~skip)
            try:
                result = optimizer.step(*args, **kwargs)
            finally:
                active.copy_(saved)
        else:
            result = optimizer.step(*args, **kwargs)
        state["stepped"] = True
        return result

    @torch.no_grad()
    def update(self, new_scale: float | Sequence[float] | Tensor | None = None) -> None:
        """Update every model's scale as ``GradScaler.update`` does for one model: back off
        after an overflow, grow after ``growth_interval`` clean steps. Quarantined models
        keep theirs. ``new_scale`` (shared or ``[N]``) sets the scales directly instead."""
        if not self._enabled:
            return
        n = len(self.batch)
        if new_scale is not None:
            t = torch.as_tensor(new_scale, dtype=torch.float32, device=self._scale.device)
            self._scale.copy_(t.expand(n) if t.dim() == 0 else t)
            self._per_optimizer.clear()
            return
        founds = [
            s["found_inf"] for s in self._per_optimizer.values() if s["found_inf"] is not None
        ]
        if not founds:
            raise RuntimeError("no inf checks were recorded prior to update(); call "
                               "step() or unscale_() first")
        found = founds[0].clone()
        for f in founds[1:]:
            found |= f
        scale, tracker = self._scale, self._growth_tracker
        successful = tracker + 1
        grow = ~found & (successful == self._growth_interval)
        grown = scale * self._growth_factor
        grown = torch.where(torch.isfinite(grown), grown, scale)
        new = torch.where(found, scale * self._backoff_factor, torch.where(grow, grown, scale))
        new_tracker = torch.where(found | grow, torch.zeros_like(tracker), successful)
        active = self.batch.active.to(scale.device)
        scale.copy_(torch.where(active, new, scale))
        tracker.copy_(torch.where(active, new_tracker, tracker))
        self._last_found_inf = found
        self._per_optimizer.clear()

    # ------------------------------------------------------------------ following the batch
    def _follow_batch(self) -> None:
        """After ``batch.to(device)``: move the per-model tensors along."""
        device = self.batch.device
        self._scale = self._scale.to(device)
        self._growth_tracker = self._growth_tracker.to(device)
        self._last_found_inf = self._last_found_inf.to(device)
        self._per_optimizer.clear()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.batch._register_optimizer(self)  # type: ignore[arg-type]  # after copy/pickle

    def _keep_positions(self, keep: Sequence[int]) -> None:
        index = torch.tensor(list(keep), dtype=torch.long, device=self._scale.device)
        self._scale = self._scale.index_select(0, index)
        self._growth_tracker = self._growth_tracker.index_select(0, index)
        self._last_found_inf = self._last_found_inf.index_select(0, index)
        self._per_optimizer.clear()

    # ------------------------------------------------------------------ (de)serialisation
    def state_dict(self) -> dict[str, Any]:
        """JSON-friendly state: per-model ``scale`` and ``_growth_tracker`` lists, the
        factors, the interval and the ``model_ids`` they belong to."""
        if not self._enabled:
            return {}
        return {
            "scale": self._scale.tolist(),
            "growth_factor": self._growth_factor,
            "backoff_factor": self._backoff_factor,
            "growth_interval": self._growth_interval,
            "_growth_tracker": self._growth_tracker.tolist(),
            "model_ids": list(self.batch.model_ids),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the model ids must match the batch's."""
        if not self._enabled:
            return
        if not state_dict:
            raise RuntimeError("the state dict is empty (it was saved from a disabled scaler)")
        ids = list(state_dict.get("model_ids", []))
        if ids != list(self.batch.model_ids):
            raise ValueError(
                f"scaler state is for models {ids}, but the batch holds {self.batch.model_ids}"
            )
        device = self._scale.device
        self._scale = torch.tensor(state_dict["scale"], dtype=torch.float32, device=device)
        self._growth_tracker = torch.tensor(
            state_dict["_growth_tracker"], dtype=torch.int32, device=device
        )
        self._growth_factor = float(state_dict["growth_factor"])
        self._backoff_factor = float(state_dict["backoff_factor"])
        self._growth_interval = int(state_dict["growth_interval"])
        self._per_optimizer.clear()

    def __repr__(self) -> str:
        return (
            f"BatchGradScaler(N={self._scale.shape[0]}, growth_factor={self._growth_factor}, "
            f"backoff_factor={self._backoff_factor}, growth_interval={self._growth_interval}, "
            f"enabled={self._enabled})"
        )
