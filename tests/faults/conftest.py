"""Every fault-injection test is bounded in time: a test that blocks (on a FIFO, a device,
a hung child) fails with a TimeoutError instead of hanging the suite."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

LIMIT_S = 60


@pytest.fixture(autouse=True)
def _time_bound() -> Iterator[None]:
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"fault-injection test still running after {LIMIT_S} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(LIMIT_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def tmp_path(tmp_path: Path) -> Iterator[Path]:
    """A fresh folder on tmpfs (``/dev/shm``) when there is one, else pytest's ``tmp_path``.

    These tests kill processes, not machines: what they check (which files exist, what
    loads) does not depend on ``fsync`` reaching a disk, and on tmpfs an ``fsync`` costs
    microseconds instead of milliseconds, which keeps hundreds of saves fast.
    """
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    folder = Path(tempfile.mkdtemp(prefix="modelbatch-faults-", dir=shm))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
