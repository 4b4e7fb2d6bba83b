"""The ``processes`` method's protocol (K worker processes, start-up excluded, failures
reported), run on the CPU."""

from __future__ import annotations

import multiprocessing as mp
import os
import time

import pytest
import torch

from modelbatch.bench.methods import BenchContext, MethodResult, _gather, _processes
from modelbatch.bench.workloads import get_workload, make_batches


def test_processes_start_together_and_count_every_timed_step() -> None:
    wl = get_workload("mlp", 8)
    cpu = torch.device("cpu")
    ctx = BenchContext(wl, cpu, "fp32", make_batches(wl, 1, cpu), warmup=1, repeats=1)
    ctx.target_seconds = 0.1
    result = MethodResult("processes", 2)
    _processes(ctx, 2, result, allow_cpu=True)
    # Each worker trains for at least 0.5 s (and 3 steps) after all reported ready.
    assert result.extra["timed_steps"] >= 6
    assert result.step_ms is not None and result.step_ms > 0
    assert "2 processes" in result.note and "start-up" in result.note


def test_a_worker_that_dies_without_reporting_is_an_error_not_a_hang() -> None:
    spawn = mp.get_context("spawn")
    queue = spawn.Queue()
    procs = [spawn.Process(target=os._exit, args=(3,))]
    procs[0].start()
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"worker 0 of 1 exited \(code 3\)"):
        _gather(procs, queue, "ready", time.monotonic() + 60)
    assert time.monotonic() - t0 < 30
    procs[0].join()
