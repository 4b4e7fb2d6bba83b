"""SIGKILL during saves, at every step of the commit protocol and at random moments: the
checkpoint always loads, and it is exactly one complete save (old until the commit, new
from then on); a user's ``makedirs`` between crashes changes nothing."""

from __future__ import annotations

import json
import os
import random
import select
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from modelbatch import CheckpointError, CheckpointManager
from modelbatch.checkpoint import list_versions, load_all, save_all
from tests.faults._crash_server import make

ROOT = Path(__file__).resolve().parents[2]
SERVER = Path(__file__).with_name("_crash_server.py")

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")


class Server:
    def __init__(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH", "")]
        )
        env["OMP_NUM_THREADS"] = "1"
        self.proc = subprocess.Popen(
            [sys.executable, str(SERVER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=ROOT,
            env=env,
        )

    def __call__(self, timeout: float = 30.0, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, f"the crash server did not answer {cmd} within {timeout} s"
        line = self.proc.stdout.readline()
        assert line, "the crash server died"
        return json.loads(line)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.kill()
        self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    s = Server()
    try:
        yield s
    finally:
        s.close()


def loaded_step(root: Path) -> int:
    """Load ``root`` into fresh objects; assert every tensor is exactly its step."""
    batch, opt = make(-1)
    step = load_all(batch, root, optimizer=opt, restore_rng=False)["step"]
    for name, p in batch.stacked_parameters():
        assert torch.equal(p, torch.full_like(p, float(step))), name
    for name, s in opt.state.items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(s[key], torch.full_like(s[key], float(step))), (name, key)
    return int(step)


def leftovers(root: Path) -> list[str]:
    return sorted(n for n in os.listdir(root) if n.startswith("."))


def committed(tmp_path: Path, name: str, step: int, keep: int = 1) -> Path:
    root = tmp_path / name
    batch, opt = make(step)
    save_all(batch, root, optimizer=opt, step=step, keep=keep)
    return root


def test_kill_at_every_step_of_a_save(tmp_path: Path, server: Server) -> None:
    """Versions 1 and 2 are committed (keep=2); a save of step 3 is killed before each of
    its file-system calls in turn (writes, fsyncs, the renames, the commit, the deletion
    of version 1): step 2 loads until the commit, step 3 from then on, exactly."""
    template = committed(tmp_path, "template", 1, keep=2)
    batch, opt = make(2)
    save_all(batch, template, optimizer=opt, step=2, keep=2)
    shutil.copytree(template, tmp_path / "count")
    n = server(root=str(tmp_path / "count"), op="save", step=3, keep=2, crash_at=-1)["events"]
    assert n > 20
    seen = []
    for k in range(n + 1):
        root = tmp_path / f"r{k}"
        shutil.copytree(template, root)
        answer = server(root=str(root), op="save", step=3, keep=2, crash_at=k)
        assert answer["killed"] == (k < n), (k, answer)
        seen.append(loaded_step(root))
        # The next save (by a new process, here this one) completes and cleans up.
        batch, opt = make(4)
        save_all(batch, root, optimizer=opt, step=4, keep=2)
        assert loaded_step(root) == 4
        assert leftovers(root) == [".lock"], (k, leftovers(root))
        versions = list_versions(root)
        assert [v["step"] for v in versions] == [seen[-1], 4], k  # the previous latest is kept
        on_disk = sorted(d for d in os.listdir(root) if d.startswith("v"))
        assert on_disk == [v["path"].name for v in versions], k
    # Old up to the commit (the rename of latest.json), new from then on: one switch.
    switch = seen.index(3)
    assert 0 < switch < n and seen == [2] * switch + [3] * (n + 1 - switch), seen


def test_kill_then_makedirs_then_kill_again(tmp_path: Path, server: Server) -> None:
    """A crash, the training script's ``os.makedirs(path, exist_ok=True)``, a second crash
    at another step: what loads is always one complete save, never nothing."""
    template = committed(tmp_path, "template", 1)
    shutil.copytree(template, tmp_path / "count")
    n = server(root=str(tmp_path / "count"), op="save", step=2, keep=1, crash_at=-1)["events"]
    rng = random.Random(0)
    outcomes = set()
    for k1 in range(0, n, 2):  # every other first crash point (all are in the test above)
        root = tmp_path / f"r{k1}"
        shutil.copytree(template, root)
        assert server(root=str(root), op="save", step=2, keep=1, crash_at=k1)["killed"]
        first = loaded_step(root)
        os.makedirs(root, exist_ok=True)
        for k2 in [n - 1 - k1 % 3 if k1 % 4 else rng.randrange(n)]:
            assert server(root=str(root), op="save", step=3, keep=1, crash_at=k2)["killed"]
            second = loaded_step(root)
            assert second >= first, (k1, k2)
            outcomes.add((first, second))
            first = second
            os.makedirs(root, exist_ok=True)
    assert {(1, 1), (2, 2), (2, 3)} <= outcomes


def test_kill_at_random_moments(tmp_path: Path, server: Server) -> None:
    root = tmp_path / "ck"
    rng = random.Random(1)
    last = -1
    for round_ in range(4):
        start = 1000 * (round_ + 1)
        answer = server(root=str(root), op="loop", step=start, keep=2, delay=rng.uniform(0.01, 0.3))
        assert answer["killed"]
        step = loaded_step(root)
        assert step >= start > last
        last = step
        versions = list_versions(root)
        assert 1 <= len(versions) <= 2 and versions[-1]["step"] == step
        if len(versions) == 2:  # the older kept version is complete too
            batch, opt = make(-1)
            older = load_all(batch, root, optimizer=opt, version=versions[0]["version"])
            assert older["step"] == versions[0]["step"] < step


def test_deleting_the_folder_resurrects_nothing(tmp_path: Path) -> None:
    root = committed(tmp_path, "ck", 1, keep=3)
    batch, opt = make(2)
    save_all(batch, root, optimizer=opt, step=2, keep=3)
    shutil.rmtree(root)
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        loaded_step(root)
    os.makedirs(root)
    with pytest.raises(CheckpointError, match=r"latest\.json is missing"):
        loaded_step(root)
    assert os.listdir(tmp_path) == ["ck"]  # nothing was ever stored beside the folder


def test_deleting_the_latest_version_does_not_fall_back(tmp_path: Path) -> None:
    root = committed(tmp_path, "ck", 1, keep=2)
    batch, opt = make(2)
    save_all(batch, root, optimizer=opt, step=2, keep=2)
    shutil.rmtree(root / "v00000002")
    with pytest.raises(CheckpointError, match=r"v00000002 is missing .* not loaded in its place"):
        loaded_step(root)
    fresh, fresh_opt = make(-1)
    assert load_all(fresh, root, optimizer=fresh_opt, version=1)["step"] == 1
    (root / "latest.json").unlink()
    with pytest.raises(CheckpointError, match=r"latest.json is missing; .*\['v00000001'\]"):
        loaded_step(root)
    save_all(make(3)[0], root, step=3)  # a new save commits again; the orphan goes
    assert [(v["version"], v["step"]) for v in list_versions(root)] == [(2, 3)]
    assert sorted(n for n in os.listdir(root) if not n.startswith(".")) == [
        "latest.json",
        "v00000002",
    ]


def test_kill_the_first_save_then_rerun(tmp_path: Path, server: Server) -> None:
    """The first save into a folder is killed at each step: before its commit there is no
    checkpoint (a re-run's CheckpointManager starts afresh and its save succeeds), from
    the commit on it loads exactly."""
    n = server(root=str(tmp_path / "count"), op="save", step=1, keep=1, crash_at=-1)["events"]
    committed_at = None
    for k in range(0, n, 2):
        root = tmp_path / f"r{k}"
        assert server(root=str(root), op="save", step=1, keep=1, crash_at=k)["killed"]
        manager = CheckpointManager(root, keep=1)
        batch, opt = make(-1)
        if manager.restore(batch, optimizer=opt) is None:
            assert committed_at is None, k  # once committed, always committed
            with pytest.raises(CheckpointError, match="no checkpoint at"):
                loaded_step(root)
            again, again_opt = make(2)
            manager.save(again, 2, optimizer=again_opt)
            assert loaded_step(root) == 2
        else:
            committed_at = k if committed_at is None else committed_at
            assert loaded_step(root) == 1
    assert committed_at is not None
