"""Timing, utilisation sampling and ceilings of the benchmark (CPU; nothing asserts a speed)."""

from __future__ import annotations

import pytest
import torch

from modelbatch.bench.measure import UtilSampler, measure_ceilings, time_steps


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
        calls.append, torch.device("cpu"), warmup=2, steps=3, repeats=2, sampler=sampler
    )
    assert calls == list(range(8))  # step index keeps running: inputs rotate
    assert sampler.events == [("start", 2), ("stop", 8)]  # warm-up steps left out
    assert timing.steps == 3 and len(timing.windows_ms) == 2
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
