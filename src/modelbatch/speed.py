"""Speed-up toggles: ``torch.compile`` of the vectorised step and one CUDA graph per step.

Both keep training exactly what it is in eager mode (same function, same update); they
only remove Python and kernel-launch overhead, and (compile) fuse element-wise work.

* :meth:`ModelBatch.enable_compile` / :func:`compile_forward`: the vmapped forward (and so
  its backward) through ``torch.compile``.
* :func:`compile_optimizer`: the optimizer's flat update through ``torch.compile`` (one
  fused pass over parameters, gradients and state for the whole batch); hyper-parameters
  stay tensors, so an LR scheduler does not trigger recompilation.
* :meth:`ModelBatch.capture_cuda_graph` / :class:`CudaGraphStep`: forward, backward and
  optimizer step captured in one ``torch.cuda.CUDAGraph`` for static shapes. Small batches
  of models are launch-bound; one replay per step removes the launches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from modelbatch.core import ModelBatch
    from modelbatch.optim.base import BatchOptimizer

__all__ = ["CudaGraphStep", "compile_forward", "compile_optimizer", "run_and_undo"]

LossFn = Callable[[Tensor, Tensor], Tensor]


def compile_forward(**compile_kwargs: Any) -> Callable[..., Any]:
    """The vectorised forward of :class:`~modelbatch.ModelBatch`, through ``torch.compile``.

    Used by :meth:`ModelBatch.enable_compile`; ``compile_kwargs`` go to :func:`torch.compile`.
    """
    from modelbatch.core import _vmapped_forward

    return torch.compile(_vmapped_forward, **compile_kwargs)


def compile_optimizer(optimizer: BatchOptimizer, **compile_kwargs: Any) -> BatchOptimizer:
    """Compile the flat update of a vectorised optimizer in place (returns it).

    The whole update of one flat ``[N, P]`` storage (gradient gather, step counters, bias
    corrections and the element-wise arithmetic) becomes one ``torch.compile``'d function:
    Inductor fuses it into a few kernels that read the parameters, the T gradients and the
    state once and write the parameters and the state once. Hyper-parameters are ``[N, 1]``
    tensors refreshed in place, so an LR scheduler does not recompile; the quarantine mask
    is always applied inside the kernel (no host sync, no recompilation on quarantine). The
    compiled code is guarded on the tensors' shapes and a few host flags only, so the host
    time of a step does not grow with N. The state is created now.

    A change of the hyper-parameters that changes the update's code path (e.g. weight decay
    from 0 to non-zero for every model) recompiles once. ``torch.compile`` caches compiled
    code per function, shared by all optimizers of a class: beyond
    ``torch._dynamo.config.recompile_limit`` shapes (8 by default), further ones run eagerly
    (``torch._dynamo.reset()`` clears the cache).
    """
    from modelbatch.optim.base import BatchOptimizer

    if not isinstance(optimizer, BatchOptimizer):
        raise TypeError(
            f"compile_optimizer needs a vectorised modelbatch.optim optimizer, got "
            f"{type(optimizer).__name__}"
        )
    optimizer.init_state()
    compile_kwargs.setdefault("dynamic", False)
    if compile_kwargs.get("mode") is None and optimizer.batch.device.type != "cpu":
        # On GPUs the T gradients are read in place by the fused update (masked loads),
        # instead of first being copied into one [N, P] buffer: bytes moved at the floor.
        # (Inductor's CPU code is slower that way: there it copies them, +2 passes.)
        options = dict(compile_kwargs.pop("options", None) or {})
        options.setdefault("force_pointwise_cat", True)
        compile_kwargs["options"] = options
    cls: Any = type(optimizer)  # SGD, Adam, AdamW: _coefficients, _apply_functional
    optimizer._compiled = (
        torch.compile(cls._coefficients, **compile_kwargs),
        torch.compile(cls._apply_functional, **compile_kwargs),
    )
    return optimizer


def _as_tuple(x: Tensor | Sequence[Tensor]) -> tuple[Tensor, ...]:
    return (x,) if isinstance(x, Tensor) else tuple(x)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    from modelbatch.optim.base import BatchOptimizer

    if isinstance(optimizer, BatchOptimizer):
        return optimizer._state_tensors()  # the flat state itself, not per-parameter views
    return [v for s in optimizer.state.values() for v in s.values() if isinstance(v, Tensor)]


def _stateful_tensors(batch: ModelBatch, optimizer: torch.optim.Optimizer) -> list[Tensor]:
    out: list[Tensor] = [p for _, p in batch.stacked_parameters()]
    out += [b for _, b in batch.stacked_buffers()]
    out += _optimizer_tensors(optimizer)
    return out


def run_and_undo(
    batch: ModelBatch, optimizer: torch.optim.Optimizer, body: Callable[[], Any], steps: int
) -> None:
    """Run ``body()`` ``steps`` times (on a side stream on CUDA, as graph capture needs),
    then put every parameter, buffer, optimizer state tensor and the random state back.

    Tensors keep their addresses (restored with ``copy_``). Optimizer state that the runs
    created is zeroed; the vectorised optimizers treat a model at step 0 as never stepped
    whatever its state holds (e.g. SGD copies the gradient into the momentum buffer).
    """
    cuda = batch.device.type == "cuda"
    with torch.no_grad():
        saved = [(t, t.detach().clone()) for t in _stateful_tensors(batch, optimizer)]
    rng = torch.cuda.get_rng_state(batch.device) if cuda else torch.get_rng_state()
    if cuda:
        side = torch.cuda.Stream(device=batch.device)
        side.wait_stream(torch.cuda.current_stream(batch.device))
        with torch.cuda.stream(side):
            for _ in range(steps):
                optimizer.zero_grad(set_to_none=True)
                body()
        torch.cuda.current_stream(batch.device).wait_stream(side)
    else:
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            body()
    with torch.no_grad():
        for t, old in saved:
            t.copy_(old)
        known = {id(t) for t, _ in saved}
        # (Listing them flushes a vectorised optimizer: it reads the restored step state
        # now, outside any CUDA graph capture that follows.)
        for t in _optimizer_tensors(optimizer):
            if id(t) not in known:
                t.zero_()
    if cuda:
        torch.cuda.set_rng_state(rng, batch.device)
    else:
        torch.set_rng_state(rng)


@contextlib.contextmanager
def _capture_masked_forward(batch: ModelBatch, masked: bool) -> Iterator[None]:
    """While capturing a quarantine-aware step, make ``batch.all_active`` answer False.

    The forward then records its quarantine path too (BatchNorm statistics of inactive
    models kept, by a ``torch.where`` on the device mask), so models quarantined after the
    capture keep their buffers as in eager mode. Uses the batch's cached answer, which is
    recomputed on the next call after the block.
    """
    if not masked:
        yield
        return
    active = batch.active
    batch.__dict__["_all_active_cache"] = (active, active._version, False)
    try:
        yield
    finally:
        batch.__dict__.pop("_all_active_cache", None)


class CudaGraphStep:
    """One training step (forward, loss, backward, optimizer step) captured in a CUDA graph.

    Build it with :meth:`ModelBatch.capture_cuda_graph`. Calling it copies ``inputs`` and
    ``targets`` into the static buffers, refreshes the optimizer's hyper-parameter tensors
    (so LR schedulers work) and replays the graph. It returns the summed loss (a static
    tensor overwritten by the next call: clone it to keep it); :attr:`losses` holds the
    ``[N]`` per-model losses, and ``batch.latest_losses`` refers to them too.

    The capture runs ``warmup_steps`` real steps on a side stream first (this creates the
    optimizer state and lets cuDNN/cuBLAS pick their algorithms), then puts every parameter,
    buffer, optimizer state tensor and the CUDA random state back as they were, so the first
    replay is the first training step, exactly as in eager mode.

    Args:
        batch: the ModelBatch, on a CUDA device.
        optimizer: a vectorised ``modelbatch.optim`` optimizer built on ``batch``.
        loss_fn: single-model loss ``loss_fn(output [B, ...], target [B, ...]) -> scalar``.
        example_inputs: one batch of inputs, ``[B, ...]`` (``[N, B, ...]`` if per_model),
            or a tuple of them: fixes the shapes and dtypes.
        example_targets: the matching targets ``[B, ...]`` or ``[N, B, ...]``.
        per_model: whether the inputs carry a leading model dimension.
        warmup_steps: eager steps run (and undone) before the capture.
        autocast_dtype: run forward and loss under ``torch.autocast("cuda", dtype)``
            (e.g. ``torch.bfloat16``); parameters stay in their own dtype.
        quarantine_aware: capture the quarantine-aware update, so models quarantined or
            released after the capture are handled by the same graph (costs a few extra
            passes over the optimizer state). Otherwise the graph assumes every model
            active, and a call after a quarantine raises an error. Forced on when some
            model is already quarantined at capture time.
        pool: optional memory pool handle shared with other graphs
            (``torch.cuda.graph_pool_handle()``).
    """

    def __init__(
        self,
        batch: ModelBatch,
        optimizer: torch.optim.Optimizer,
        loss_fn: LossFn,
        example_inputs: Tensor | Sequence[Tensor],
        example_targets: Tensor,
        *,
        per_model: bool = False,
        warmup_steps: int = 3,
        autocast_dtype: torch.dtype | None = None,
        quarantine_aware: bool = False,
        pool: Any = None,
    ) -> None:
        from modelbatch.optim.base import BatchOptimizer

        device = batch.device
        if device.type != "cuda" or not torch.cuda.is_available():
            raise RuntimeError(
                f"capture_cuda_graph needs the batch on a CUDA device; it is on {device}. "
                "Move it first (batch.to('cuda')) or use enable_compile() on the CPU."
            )
        if not isinstance(optimizer, BatchOptimizer):
            raise TypeError(
                "capture_cuda_graph needs a vectorised modelbatch.optim optimizer (SGD, Adam, "
                f"AdamW), got {type(optimizer).__name__}"
            )
        if optimizer.batch is not batch:
            raise ValueError("the optimizer was built for a different ModelBatch")
        if warmup_steps < 1:
            raise ValueError(f"warmup_steps must be at least 1, got {warmup_steps}")
        self.batch = batch
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.per_model = per_model
        self.autocast_dtype = autocast_dtype
        inputs = _as_tuple(example_inputs)
        for k, x in enumerate(inputs):
            if x.device != device:
                raise ValueError(f"example input {k} is on {x.device}, the batch on {device}")
        if example_targets.device != device:
            raise ValueError(
                f"example targets are on {example_targets.device}, the batch on {device}"
            )
        self._static_inputs = tuple(x.detach().clone() for x in inputs)
        self._static_targets = example_targets.detach().clone()
        self.masked = bool(quarantine_aware) or not batch.all_active

        optimizer.init_state()
        optimizer.set_static_hparams(True, masked=self.masked)
        with _capture_masked_forward(batch, self.masked):
            optimizer.zero_grad(set_to_none=True)
            run_and_undo(batch, optimizer, self._body, warmup_steps)
            optimizer.zero_grad(set_to_none=True)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool):
                self._static_loss = self._body()
        assert batch.latest_losses is not None
        self.losses: Tensor = batch.latest_losses
        self._active = batch.active
        self._active_version = batch.active._version
        self._signature = self._tensor_signature()

    # ------------------------------------------------------------------ capture helpers
    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.autocast_dtype, cache_enabled=False)

    def _body(self) -> Tensor:
        with self._autocast():
            out = self.batch(*self._static_inputs, per_model=self.per_model)
            loss = self.batch.compute_loss(out, self._static_targets, self.loss_fn)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def _tensor_signature(self) -> tuple[tuple[int, int, tuple[int, ...]], ...]:
        return tuple(
            (id(t), t.data_ptr(), tuple(t.shape))
            for t in _stateful_tensors(self.batch, self.optimizer)
        )

    # ------------------------------------------------------------------ replay
    def _check(self) -> None:
        batch = self.batch
        if batch.active is not self._active or self._tensor_signature() != self._signature:
            raise RuntimeError(
                "the ModelBatch's or the optimizer's tensors were replaced since the CUDA graph "
                "was captured (drop, keep_positions, .to(), optimizer.load_state_dict); "
                "capture the step again"
            )
        if not self.masked and batch.active._version != self._active_version:
            if not batch.all_active:
                raise RuntimeError(
                    "models were quarantined after the CUDA graph was captured without "
                    "quarantine_aware=True; capture again with quarantine_aware=True"
                )
            self._active_version = batch.active._version

    def __call__(self, inputs: Tensor | Sequence[Tensor], targets: Tensor) -> Tensor:
        """Run one training step on ``inputs`` / ``targets`` (shapes as captured).

        Returns the summed loss of the N models (a static tensor, see the class doc)."""
        self._check()
        xs = _as_tuple(inputs)
        if len(xs) != len(self._static_inputs):
            raise ValueError(
                f"the step was captured with {len(self._static_inputs)} inputs, got {len(xs)}"
            )
        for k, (x, static) in enumerate(zip(xs, self._static_inputs, strict=True)):
            if x.shape != static.shape or x.dtype != static.dtype:
                raise ValueError(
                    f"input {k} has shape {tuple(x.shape)} and dtype {x.dtype}; the CUDA graph "
                    f"was captured for {tuple(static.shape)} {static.dtype}"
                )
            static.copy_(x, non_blocking=True)
        t = self._static_targets
        if targets.shape != t.shape or targets.dtype != t.dtype:
            raise ValueError(
                f"targets have shape {tuple(targets.shape)} and dtype {targets.dtype}; the CUDA "
                f"graph was captured for {tuple(t.shape)} {t.dtype}"
            )
        t.copy_(targets, non_blocking=True)
        self.optimizer.refresh_hparams()
        self.graph.replay()
        self.batch.latest_losses = self.losses
        return self._static_loss
