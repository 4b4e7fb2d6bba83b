"""Timing, memory, GPU utilisation and the device's own ceilings, measured the same way for
every method.

Timing: warm-up steps first (compilation, cuDNN autotuning, allocator growth stay out), then
windows of ``steps`` steps each, timed with CUDA events on a GPU (host clock after
``synchronize`` on the CPU). At least ``repeats`` windows are timed; more are added (up to
``max_windows``) until the ``repeats`` fastest windows agree within ``max_spread``. The
reported step time is the median of those fastest windows: other work on a shared machine
only ever slows a window down, so the fastest consistent windows are what the method costs.
A measurement whose windows never agree is returned with ``reliable=False``.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "MAX_SPREAD",
    "Ceilings",
    "Timing",
    "UtilSampler",
    "measure_ceilings",
    "memory_allocated",
    "peak_memory",
    "reset_peak_memory",
    "settle",
    "synchronize",
    "time_steps",
]


def synchronize(device: torch.device) -> None:
    """Wait for all queued work on ``device`` (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window (CUDA only)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int | None:
    """Peak bytes allocated by PyTorch since the last reset (None on the CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None


def memory_allocated(device: torch.device) -> int | None:
    """Bytes currently allocated by PyTorch (None on the CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    return None


#: Default agreement asked of the fastest windows: (max - min) / median <= 10% (about ±5%).
MAX_SPREAD = 0.10


@dataclass
class Timing:
    """Result of :func:`time_steps`.

    ``step_ms`` is the median milliseconds per step over the ``used_ms`` windows (the
    fastest ``repeats`` windows); ``windows_ms`` holds every timed window in the order
    measured; ``reliable`` is False when the used windows still disagree by more than
    ``max_spread``.
    """

    step_ms: float
    windows_ms: list[float] = field(default_factory=list)
    steps: int = 0
    used_ms: list[float] = field(default_factory=list)
    max_spread: float = MAX_SPREAD

    @property
    def spread(self) -> float:
        """(max - min) / median over the used windows: the noise of this measurement."""
        used = self.used_ms or self.windows_ms
        if len(used) < 2 or self.step_ms <= 0:
            return 0.0
        return (max(used) - min(used)) / self.step_ms

    @property
    def reliable(self) -> bool:
        """Whether the used windows agree within ``max_spread``."""
        return self.spread <= self.max_spread

    @property
    def fastest_ms(self) -> float:
        """The fastest used window (ms per step)."""
        return min(self.used_ms or self.windows_ms)

    @property
    def slowest_ms(self) -> float:
        """The slowest used window (ms per step)."""
        return max(self.used_ms or self.windows_ms)


def settle(windows_ms: list[float], repeats: int, max_spread: float) -> tuple[float, list[float]]:
    """The median of the ``repeats`` fastest windows, and those windows (in ms per step).

    >>> settle([10.0, 30.0, 11.0, 10.5], repeats=3, max_spread=0.1)
    (10.5, [10.0, 10.5, 11.0])
    """
    used = sorted(windows_ms)[: max(1, repeats)]
    return statistics.median(used), used


def time_steps(
    step: Callable[[int], Any],
    device: torch.device,
    *,
    warmup: int = 3,
    steps: int = 20,
    repeats: int = 3,
    target_seconds: float | None = None,
    sampler: UtilSampler | None = None,
    max_spread: float = MAX_SPREAD,
    max_windows: int | None = None,
) -> Timing:
    """Time ``step(k)`` (k = running step index, to rotate input batches).

    Times ``repeats`` windows of ``steps`` steps, then adds windows (at most
    ``max_windows``, default ``3 * repeats``) until the ``repeats`` fastest agree within
    ``max_spread`` ((max - min) / median). With ``target_seconds``, the number of steps per
    window is lowered so that one window lasts about that long (at least 2 steps), judged
    from the last warm-up step. ``sampler`` (a :class:`UtilSampler`) runs only during the
    timed windows, not the warm-up.
    """
    if steps < 1 or repeats < 1:
        raise ValueError(f"steps ({steps}) and repeats ({repeats}) must be at least 1")
    limit = max(repeats, max_windows if max_windows is not None else 3 * repeats)
    k = 0
    last = 0.0
    for _ in range(max(warmup, 1)):
        synchronize(device)
        t0 = time.perf_counter()
        step(k)
        synchronize(device)
        last = time.perf_counter() - t0
        k += 1
    if target_seconds is not None and last > 0:
        steps = max(min(2, steps), min(steps, int(target_seconds / last)))
    windows: list[float] = []
    if sampler is not None:
        sampler.start()
    while len(windows) < limit:
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                step(k)
                k += 1
            end.record()
            end.synchronize()
            windows.append(start.elapsed_time(end) / steps)
        else:
            t0 = time.perf_counter()
            for _ in range(steps):
                step(k)
                k += 1
            windows.append((time.perf_counter() - t0) * 1e3 / steps)
        if len(windows) >= repeats:
            median, used = settle(windows, repeats, max_spread)
            if repeats < 2 or (max(used) - min(used)) <= max_spread * median:
                break
    if sampler is not None:
        sampler.stop()
    median, used = settle(windows, repeats, max_spread)
    return Timing(median, windows, steps, used, max_spread)


_NVML_HANDLES: dict[int, tuple[Any, Any] | None] = {}


def _nvml_handle(index: int) -> tuple[Any, Any] | None:
    """``(pynvml, handle)`` of GPU ``index``, initialised once per process; None when the
    ``nvidia-ml-py`` package or the driver's NVML library is missing or fails."""
    if index not in _NVML_HANDLES:
        try:
            import pynvml  # provided by nvidia-ml-py

            pynvml.nvmlInit()
            _NVML_HANDLES[index] = (pynvml, pynvml.nvmlDeviceGetHandleByIndex(index))
        except Exception:  # NVML missing or not working: no utilisation column
            _NVML_HANDLES[index] = None
    return _NVML_HANDLES[index]


class UtilSampler:
    """Samples NVML GPU utilisation (and device memory in use) in a background thread
    between :meth:`start` and :meth:`stop` (or over a ``with`` block).

    ``mean`` is the average of the utilisation samples in percent, or None when NVML (the
    ``nvidia-ml-py`` package) or a GPU is unavailable, or no sample was taken. NVML reports
    the fraction of its own sample period (1/6 s to 1 s) in which a kernel ran, so a timed
    region much shorter than that mixes in what came just before it.
    ``mem_used_max`` is the largest device memory in use seen by NVML (bytes, every process
    and CUDA context included), or None.
    """

    def __init__(self, device: torch.device, interval: float = 0.02) -> None:
        self.device = device
        self.interval = interval
        self.samples: list[float] = []
        self.mem_used_max: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._handle: Any = None
        self._nvml: Any = None
        if device.type != "cuda" or not torch.cuda.is_available():
            return
        index = device.index if device.index is not None else torch.cuda.current_device()
        found = _nvml_handle(index)
        if found is not None:
            self._nvml, self._handle = found

    @property
    def available(self) -> bool:
        """Whether NVML answers for this device."""
        return self._handle is not None

    def _sample(self) -> bool:
        try:
            rates = self._nvml.nvmlDeviceGetUtilizationRates(self._handle)
            self.samples.append(float(rates.gpu))
            used = int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)
            self.mem_used_max = max(self.mem_used_max or 0, used)
        except Exception:
            return False
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if not self._sample():
                return

    def start(self) -> None:
        """Start sampling (no-op without NVML or when already started)."""
        if self._handle is None or self._thread is not None:
            return
        self._stop.clear()
        self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling (takes a last sample); later calls do nothing."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            self._sample()
        self._handle = None

    def __enter__(self) -> UtilSampler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.samples) if self.samples else None


@dataclass
class Ceilings:
    """What the device reaches in the same run: a large matmul and a large copy."""

    matmul_flops: float
    matmul_dtype: str
    copy_bytes_per_s: float
    matmul_size: int
    copy_bytes: int


def _best_time(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):  # library handles, kernel choice, clocks up
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            s = torch.cuda.Event(enable_timing=True)
            e = torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return min(times)


def measure_ceilings(device: torch.device, dtype: torch.dtype, *, tf32: bool = False) -> Ceilings:
    """Measure the matmul FLOP/s (in ``dtype``, random data) and the device-to-device copy
    bytes/s (bytes read + written) on ``device``: the best of several runs.

    ``tf32=True`` (float32 on CUDA) lets the float32 matmul use TF32 tensor cores, as cuDNN
    does by default for float32 convolutions; otherwise the float32 matmul is IEEE float32
    (PyTorch's default for matmuls). The global setting is restored afterwards.
    """
    gpu = device.type == "cuda"
    n = 8192 if gpu else 1024
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        t_mm = _best_time(lambda: torch.mm(a, b), device, 10)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    nbytes = (1 << 30) if gpu else (64 << 20)
    src = torch.empty(nbytes // 4, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    t_cp = _best_time(lambda: dst.copy_(src), device, 10 if gpu else 5)
    name = str(dtype).replace("torch.", "")
    return Ceilings(
        matmul_flops=2.0 * n**3 / t_mm,
        matmul_dtype=f"{name} (tf32)" if tf32 and gpu and dtype == torch.float32 else name,
        copy_bytes_per_s=2.0 * nbytes / t_cp,
        matmul_size=n,
        copy_bytes=nbytes,
    )
