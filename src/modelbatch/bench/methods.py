"""The training methods the benchmark compares, each timed on the same device and data.

* ``sequential``: one model alone, plain eager PyTorch with ``torch.optim.Adam`` (a sweep
  run one model after another costs N times this).
* ``recipe``: the torch.func recipe of the PyTorch "model ensembling" tutorial:
  ``stack_module_state`` + ``functional_call`` + ``vmap`` and one ``torch.optim.Adam`` over
  the stacked tensors, loss = N x mean cross-entropy over all models.
* ``recipe-bf16params``: the same with every parameter and input in bfloat16 (what a user
  does when autocast fails); bf16 runs only.
* ``processes``: K processes on one GPU, each training one model (a fractional-GPU sweep
  in Ray Tune); GPU only.
* ``eager``, ``compile``, ``compile-opt``, ``cudagraph``, ``compile-opt-cudagraph``,
  ``compile-cudagraph``: ModelBatch with ``modelbatch.optim.Adam``, eager /
  ``enable_compile()`` + ``compile_optimizer()`` / only ``compile_optimizer()`` /
  ``capture_cuda_graph()`` / compiled optimizer + graph / compile + graph.
* ``eager-cl``, ``cudagraph-cl``: ``eager`` / ``cudagraph`` with
  ``ModelBatch(..., conv_layout="channels_last")`` (every ``nn.Conv2d`` as one channels_last
  grouped convolution over the N models; see :mod:`modelbatch.layers.conv`).

Every method uses Adam (lr 1e-3), cross-entropy, one shared input batch per step, and bf16
autocast with float32 master weights when the precision is ``bf16``.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modelbatch.bench.measure import (
    MAX_SPREAD,
    Timing,
    UtilSampler,
    memory_allocated,
    peak_memory,
    reset_peak_memory,
    synchronize,
    time_steps,
)
from modelbatch.bench.workloads import Workload, get_workload, make_batches

__all__ = [
    "ALL_METHODS",
    "MB_METHODS",
    "RECIPE_METHODS",
    "BenchContext",
    "MethodResult",
    "run_method",
]

#: The ModelBatch methods (every speed-up toggle).
MB_METHODS = (
    "eager",
    "compile",
    "compile-opt",
    "cudagraph",
    "compile-opt-cudagraph",
    "compile-cudagraph",
    "eager-cl",
    "cudagraph-cl",
)
#: The hand-written torch.func recipe, in float32/autocast and with bf16 parameters.
RECIPE_METHODS = ("recipe", "recipe-bf16params")

ALL_METHODS = ("sequential", *RECIPE_METHODS, "processes", *MB_METHODS)


@dataclass
class BenchContext:
    """Everything a method needs: workload, device, precision, data and timing settings."""

    workload: Workload
    device: torch.device
    precision: str
    batches: list[tuple[Tensor, Tensor]]
    warmup: int = 3
    steps: int = 20
    repeats: int = 3
    target_seconds: float | None = 1.0
    max_spread: float = MAX_SPREAD
    lr: float = 1e-3
    seed: int = 0
    max_procs: int = 16
    channels_last: bool = False
    data_dir: str | None = None
    proc_timeout: float = 180.0

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.precision == "bf16" else None

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """``torch.autocast`` for bf16 runs, else a no-op context."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def batch(self, k: int) -> tuple[Tensor, Tensor]:
        """The k-th input batch (rotating among the prepared ones)."""
        return self.batches[k % len(self.batches)]


@dataclass
class MethodResult:
    """One cell of the benchmark: a method at one number of models."""

    method: str
    n_models: int
    status: str = "ok"  # ok | error | skipped
    step_ms: float | None = None
    peak_bytes: int | None = None
    base_bytes: int | None = None
    gpu_util: float | None = None
    opt_ms: float | None = None
    opt_share: float | None = None
    spread: float | None = None
    reliable: bool | None = None
    fastest_ms: float | None = None
    slowest_ms: float | None = None
    windows: int | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _make_models(ctx: BenchContext, n: int) -> list[nn.Module]:
    torch.manual_seed(ctx.seed)
    return [ctx.workload.make_model().to(ctx.device) for _ in range(n)]


def _prepared_batches(ctx: BenchContext, dtype: torch.dtype | None = None) -> list[Any]:
    out = []
    for x, y in ctx.batches:
        if dtype is not None:
            x = x.to(dtype)
        if ctx.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        out.append((x, y))
    return out


def _timed(ctx: BenchContext, step: Callable[[int], Any], result: MethodResult, n: int) -> Timing:
    util = UtilSampler(ctx.device)
    try:
        timing = time_steps(
            step,
            ctx.device,
            warmup=ctx.warmup,
            steps=ctx.steps,
            repeats=ctx.repeats,
            target_seconds=ctx.target_seconds,
            sampler=util,
            max_spread=ctx.max_spread,
        )
    finally:
        util.stop()
    result.step_ms = timing.step_ms
    result.spread = timing.spread
    result.reliable = timing.reliable
    result.fastest_ms = timing.fastest_ms
    result.slowest_ms = timing.slowest_ms
    result.windows = len(timing.windows_ms)
    result.gpu_util = util.mean
    result.peak_bytes = peak_memory(ctx.device)
    result.extra["timed_steps"] = timing.steps * len(timing.windows_ms)
    return timing


def _optimizer_share(
    ctx: BenchContext,
    forward_backward: Callable[[int], Any],
    opt: torch.optim.Optimizer,
    steps: int,
    start: int,
) -> float:
    """The optimizer's share of a training step, measured inside ``steps`` whole steps.

    Each step runs ``forward_backward(k)`` then ``opt.step()``; the time from the end of
    the backward to the end of ``opt.step()`` (CUDA events on a GPU, the host clock after
    ``synchronize`` on the CPU) is summed and divided by the time of the same steps, so the
    share is a fraction of the very steps it was measured in: between 0 and 1.
    """
    synchronize(ctx.device)
    total = 0.0
    in_opt = 0.0
    if ctx.device.type == "cuda":
        marks = []
        for k in range(start, start + steps):
            e0, e1, e2 = (torch.cuda.Event(enable_timing=True) for _ in range(3))
            e0.record()
            forward_backward(k)
            e1.record()
            opt.step()
            e2.record()
            marks.append((e0, e1, e2))
        marks[-1][2].synchronize()
        for e0, e1, e2 in marks:
            total += e0.elapsed_time(e2)
            in_opt += e1.elapsed_time(e2)
    else:
        for k in range(start, start + steps):
            t0 = time.perf_counter()
            forward_backward(k)
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            total += t2 - t0
            in_opt += t2 - t1
    return in_opt / total if total > 0 else 0.0


# ---------------------------------------------------------------------------- methods
def _sequential(ctx: BenchContext, n: int, result: MethodResult) -> None:
    model = _make_models(ctx, 1)[0]
    opt = torch.optim.Adam(model.parameters(), lr=ctx.lr)
    batches = _prepared_batches(ctx)

    def step(k: int) -> None:
        x, y = batches[k % len(batches)]
        with ctx.autocast():
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    _timed(ctx, step, result, 1)
    result.note = "one model alone; a sweep of N models costs N x this step"


def _recipe(ctx: BenchContext, n: int, result: MethodResult, bf16_params: bool) -> None:
    from torch.func import functional_call, stack_module_state, vmap

    models = _make_models(ctx, n)
    if bf16_params:
        models = [m.to(torch.bfloat16) for m in models]
    params, buffers = stack_module_state(models)  # type: ignore[arg-type]
    base = copy.deepcopy(models[0]).to("meta")
    del models

    def fmodel(p: dict[str, Tensor], b: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(base, (p, b), (x,))

    ensemble = vmap(fmodel, in_dims=(0, 0, None), randomness="different")
    opt = torch.optim.Adam(list(params.values()), lr=ctx.lr)
    batches = _prepared_batches(ctx, torch.bfloat16 if bf16_params else None)
    amp = contextlib.nullcontext() if bf16_params else None

    def step(k: int) -> None:
        x, y = batches[k % len(batches)]
        with amp if amp is not None else ctx.autocast():
            out = ensemble(params, buffers, x)  # [N, B, classes]
            loss = n * F.cross_entropy(out.reshape(-1, out.shape[-1]).float(), y.repeat(n))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    _timed(ctx, step, result, n)
    if bf16_params:
        result.note = "all parameters and inputs bf16, no autocast"


def _modelbatch(
    ctx: BenchContext,
    n: int,
    result: MethodResult,
    compiled: bool,
    graph: bool,
    compiled_opt: bool | None = None,
    conv_layout: str = "default",
) -> None:
    import modelbatch
    from modelbatch.speed import compile_optimizer

    batch = modelbatch.ModelBatch(_make_models(ctx, n), conv_layout=conv_layout)
    opt = modelbatch.optim.Adam(batch, lr=ctx.lr)
    batches = _prepared_batches(ctx)
    notes = []
    if compiled:
        batch.enable_compile()
    if compiled_opt or (compiled_opt is None and compiled):
        compile_optimizer(opt)

    def forward_backward(k: int) -> Tensor:
        x, y = batches[k % len(batches)]
        with ctx.autocast():
            out = batch(x)
            loss = batch.compute_loss(out, y, F.cross_entropy)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        return loss

    def eager_step(k: int) -> Tensor:
        loss = forward_backward(k)
        opt.step()
        return loss

    step: Callable[[int], Any] = eager_step
    t0 = time.perf_counter()
    if graph:
        x0, y0 = batches[0]
        graph_step = batch.capture_cuda_graph(
            opt, F.cross_entropy, x0, y0, autocast_dtype=ctx.autocast_dtype
        )

        def step(k: int) -> Tensor:
            x, y = batches[k % len(batches)]
            return graph_step(x, y)

        synchronize(ctx.device)
        notes.append(f"capture {time.perf_counter() - t0:.1f} s")
    elif compiled or compiled_opt:
        eager_step(0)
        synchronize(ctx.device)
        notes.append(f"first step (compile) {time.perf_counter() - t0:.1f} s")
    timing = _timed(ctx, step, result, n)
    if not graph:
        share = _optimizer_share(ctx, forward_backward, opt, max(2, timing.steps), 10**6)
        result.opt_share = share
        result.opt_ms = share * timing.step_ms
    result.note = "; ".join(notes)


def _proc_worker(
    rank: int,
    arch: str,
    batch_size: int,
    precision: str,
    lr: float,
    warmup: int,
    seconds: float,
    seed: int,
    go: Any,
    queue: Any,
    device_type: str = "cuda",
) -> None:
    """One process of the ``processes`` method: set up, warm up, report ``ready``, wait for
    ``go``, train for ``seconds`` (at least 3 steps), report ``done`` with the step count
    and its own start/end times (``time.monotonic``, system-wide on Linux)."""
    try:
        # One CPU thread per process, as Ray gives each trial (OMP_NUM_THREADS=1): K
        # processes with a thread per core each would fight over the cores.
        torch.set_num_threads(1)
        device = torch.device(device_type)
        wl = get_workload(arch, batch_size)
        torch.manual_seed(seed + rank)
        model = wl.make_model().to(device)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        batches = make_batches(wl, 4, device, seed)
        amp = precision == "bf16"

        def step(k: int) -> None:
            x, y = batches[k % len(batches)]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for k in range(max(warmup, 1)):
            step(k)
        synchronize(device)
        queue.put(("ready", rank))
        if not go.wait(timeout=600):
            return
        t0 = time.monotonic()
        k = 0
        while k < 3 or time.monotonic() - t0 < seconds:
            step(k)
            k += 1
        synchronize(device)
        t1 = time.monotonic()
        queue.put(("done", rank, t0, t1, k, peak_memory(device) or 0))
    except BaseException as e:
        queue.put(("error", rank, f"{type(e).__name__}: {e}"))


def _gather(procs: list[Any], queue: Any, kind: str, deadline: float) -> dict[int, tuple[Any, ...]]:
    """Collect one ``kind`` message (``ready`` or ``done``) from every worker process.

    Raises RuntimeError naming the worker on an ``error`` message, on a worker that exited
    without reporting (a crash, the OOM killer), or when ``deadline`` (``time.monotonic``)
    passes first.
    """
    import queue as queue_mod

    got: dict[int, tuple[Any, ...]] = {}
    n = len(procs)
    while len(got) < n:
        try:
            msg = queue.get(timeout=0.5)
        except queue_mod.Empty:
            dead = [r for r, p in enumerate(procs) if r not in got and p.exitcode is not None]
            if dead:
                try:  # a message sent just before the exit may still be in the pipe
                    msg = queue.get(timeout=1.0)
                except queue_mod.Empty:
                    r = dead[0]
                    raise RuntimeError(
                        f"worker {r} of {n} exited (code {procs[r].exitcode}) before "
                        f"reporting {kind!r}"
                    ) from None
            elif time.monotonic() > deadline:
                missing = [r for r in range(n) if r not in got]
                raise RuntimeError(
                    f"timed out waiting for {kind!r} from workers {missing[:8]} of {n}"
                ) from None
            else:
                continue
        if msg[0] == "error":
            raise RuntimeError(f"worker {msg[1]} of {n}: {msg[2]}")
        if msg[0] == kind:
            got[msg[1]] = msg
    return got


def _processes(ctx: BenchContext, n: int, result: MethodResult, allow_cpu: bool = False) -> None:
    import multiprocessing as mp

    if ctx.device.type != "cuda" and not allow_cpu:
        result.status = "skipped"
        result.note = "GPU only (K processes sharing one GPU)"
        return
    if n > ctx.max_procs:
        result.status = "skipped"
        result.note = f"N > --max-procs {ctx.max_procs}"
        return
    spawn = mp.get_context("spawn")
    go = spawn.Event()
    queue = spawn.Queue()
    seconds = max(0.5, (ctx.target_seconds or 1.0) * ctx.repeats)
    procs = [
        spawn.Process(
            target=_proc_worker,
            args=(
                r,
                ctx.workload.name,
                ctx.workload.batch_size,
                ctx.precision,
                ctx.lr,
                max(ctx.warmup, 3),
                seconds,
                ctx.seed,
                go,
                queue,
                ctx.device.type,
            ),
            daemon=True,
        )
        for r in range(n)
    ]
    t_start = time.monotonic()
    util = UtilSampler(ctx.device)
    finished = False
    try:
        for p in procs:
            p.start()
        # Start-up (interpreter, CUDA context, warm-up steps) is excluded: every worker
        # reports "ready" first, then all start together.
        _gather(procs, queue, "ready", time.monotonic() + ctx.proc_timeout)
        startup = time.monotonic() - t_start
        util.start()
        go.set()
        done = _gather(procs, queue, "done", time.monotonic() + ctx.proc_timeout)
        util.stop()
        finished = True
    finally:
        util.stop()
        go.set()  # workers still waiting finish their short run and exit
        deadline = time.monotonic() + (30.0 if finished else 5.0)
        for p in procs:
            p.join(timeout=max(0.1, deadline - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=5)
        queue.close()
    rows = list(done.values())
    start = min(r[2] for r in rows)
    end = max(r[3] for r in rows)
    steps_total = sum(r[4] for r in rows)
    # step_ms such that n * batch / step_ms is the total throughput of the n processes.
    result.step_ms = (end - start) * 1e3 * n / steps_total
    result.peak_bytes = sum(r[5] for r in rows)
    result.base_bytes = 0
    result.gpu_util = util.mean
    result.extra["timed_steps"] = steps_total
    nvml = (
        f"; NVML peak device memory in use {util.mem_used_max / 2**30:.2f} GiB (contexts included)"
        if util.mem_used_max
        else ""
    )
    skew = max(r[2] for r in rows) - start
    per = sorted(r[4] for r in rows)
    result.note = (
        f"{n} processes, {steps_total} steps in total over {end - start:.2f} s "
        f"({per[0]}-{per[-1]} per process, starts within {1e3 * skew:.0f} ms; start-up "
        f"{startup:.1f} s excluded), random data; memory = sum of the "
        f"processes' PyTorch peaks (CUDA contexts not counted){nvml}"
    )


# ---------------------------------------------------------------------------- dispatch
def available(method: str, ctx: BenchContext) -> str | None:
    """None if ``method`` can run in ``ctx``, else the reason it is skipped."""
    if "cudagraph" in method and ctx.device.type != "cuda":
        return "needs CUDA"
    if method == "processes" and ctx.device.type != "cuda":
        return "GPU only (K processes sharing one GPU)"
    if method == "recipe-bf16params" and ctx.precision != "bf16":
        return "bf16 runs only"
    return None


def run_method(ctx: BenchContext, method: str, n: int) -> MethodResult:
    """Run one benchmark cell; errors (a crash, out of memory) are recorded, not raised."""
    result = MethodResult(method=method, n_models=n)
    reason = available(method, ctx)
    if reason is not None:
        result.status = "skipped"
        result.note = reason
        return result
    _cleanup(ctx.device)
    reset_peak_memory(ctx.device)
    result.base_bytes = memory_allocated(ctx.device)
    try:
        if method == "sequential":
            _sequential(ctx, n, result)
        elif method == "recipe":
            _recipe(ctx, n, result, bf16_params=False)
        elif method == "recipe-bf16params":
            _recipe(ctx, n, result, bf16_params=True)
        elif method == "processes":
            _processes(ctx, n, result)
        elif method == "eager":
            _modelbatch(ctx, n, result, compiled=False, graph=False)
        elif method == "compile":
            _modelbatch(ctx, n, result, compiled=True, graph=False)
        elif method == "compile-opt":
            _modelbatch(ctx, n, result, compiled=False, graph=False, compiled_opt=True)
        elif method == "cudagraph":
            _modelbatch(ctx, n, result, compiled=False, graph=True)
        elif method == "compile-opt-cudagraph":
            _modelbatch(ctx, n, result, compiled=False, graph=True, compiled_opt=True)
        elif method == "compile-cudagraph":
            _modelbatch(ctx, n, result, compiled=True, graph=True)
        elif method == "eager-cl":
            _modelbatch(ctx, n, result, compiled=False, graph=False, conv_layout="channels_last")
        elif method == "cudagraph-cl":
            _modelbatch(ctx, n, result, compiled=False, graph=True, conv_layout="channels_last")
        else:
            raise ValueError(f"unknown method {method!r}; choose from {', '.join(ALL_METHODS)}")
    except Exception as e:
        result.status = "error"
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        result.note = f"{type(e).__name__}: {first}"[:300]
        result.extra["traceback"] = traceback.format_exc()
        result.step_ms = None
    finally:
        _cleanup(ctx.device, reset_compiler=method.startswith("compile"))
    return result


def _cleanup(device: torch.device, reset_compiler: bool = False) -> None:
    if reset_compiler:
        torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
