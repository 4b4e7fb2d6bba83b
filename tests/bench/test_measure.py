"""Timing, utilisation sampling and ceilings of the benchmark (CPU; nothing asserts a speed)."""

from __future__ import annotations

import time

import pytest
import torch

from modelbatch.bench.measure import UtilSampler, measure_ceilings, settle, time_steps


class RecordingSampler(UtilSampler):
    """A UtilSampler (NVML unavailable here) that notes when it was started and stopped."""

    def __init__(self, calls: list[int]) -> None:
        super().__init__(torch.device("cpu"))
        self.calls = calls
        self.events: list[tuple[str, int]] = []

    def start(self) -> None:
        self.events.append(("start", len(self.calls)))
        super().start()

    def stop(self) -> None:
        self.events.append(("stop", len(self.calls)))
        super().stop()


def test_time_steps_samples_utilisation_only_over_the_timed_windows() -> None:
    calls: list[int] = []
    sampler = RecordingSampler(calls)
    timing = time_steps(
        calls.append,
        torch.device("cpu"),
        warmup=2,
        steps=3,
        repeats=2,
        sampler=sampler,
        max_spread=1e9,  # any two windows agree: exactly `repeats` windows
    )
    assert calls == list(range(8))  # step index keeps running: inputs rotate
    assert sampler.events == [("start", 2), ("stop", 8)]  # warm-up steps left out
    assert timing.steps == 3 and len(timing.windows_ms) == 2 and timing.reliable
    assert sampler.mean is None  # no GPU, no NVML: no utilisation, no error


@pytest.mark.skipif(torch.cuda.is_available(), reason="NVML answers on a GPU machine")
def test_util_sampler_without_nvml_is_a_no_op() -> None:
    # Without a GPU (and so without a working NVML) the column is simply empty.
    with UtilSampler(torch.device("cuda")) as s:
        pass
    assert not s.available and s.mean is None and s.mem_used_max is None
    s.stop()  # stopping twice is harmless


def test_ceilings_restore_the_tf32_setting() -> None:
    before = torch.backends.cuda.matmul.allow_tf32
    c = measure_ceilings(torch.device("cpu"), torch.float32, tf32=not before)
    assert torch.backends.cuda.matmul.allow_tf32 == before
    assert c.matmul_flops > 0 and c.copy_bytes_per_s > 0 and c.matmul_dtype == "float32"


def test_a_disturbed_window_is_repeated_until_the_fastest_agree() -> None:
    # Window 1 is slowed down (as by another job on the machine); windows 2 and 3 are not.
    def step(k: int) -> None:
        time.sleep(0.1 if k == 1 else 0.02)

    timing = time_steps(step, torch.device("cpu"), warmup=1, steps=1, repeats=2, max_spread=0.5)
    assert len(timing.windows_ms) == 3  # one more window than asked, then the two agree
    assert timing.reliable and timing.spread <= 0.5
    assert timing.step_ms < 60  # the disturbed window is not in the median
    assert timing.slowest_ms < 60 <= max(timing.windows_ms)


def test_windows_that_never_agree_are_reported_unreliable() -> None:
    def step(k: int) -> None:  # every window twice as slow as the one before
        time.sleep(0.002 * 2**k)

    timing = time_steps(
        step, torch.device("cpu"), warmup=1, steps=1, repeats=2, max_spread=0.1, max_windows=4
    )
    assert len(timing.windows_ms) == 4
    assert not timing.reliable and timing.spread > 0.1


def test_settle_takes_the_median_of_the_fastest_windows() -> None:
    assert settle([10.0, 30.0, 11.0, 10.5], repeats=3, max_spread=0.1) == (10.5, [10.0, 10.5, 11.0])


def test_time_steps_refuses_zero_steps() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        time_steps(lambda k: None, torch.device("cpu"), steps=0)
