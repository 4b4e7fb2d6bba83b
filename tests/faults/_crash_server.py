"""A process that saves checkpoints on request and can be SIGKILLed at any step of a save.

Run as a script, it reads JSON commands from stdin, one per line, and answers each with one
JSON line. Each save runs in a child forked from this (torch already imported, so a crash
costs milliseconds, not an interpreter start):

* ``{"op": "save", "root": str, "step": int, "keep": int, "crash_at": int}``: the child
  counts the file-system calls of the save (mkdir, open, write, fsync, rename, replace,
  unlink, rmdir, ...) and SIGKILLs itself just before call number ``crash_at`` (``-1``: it
  does not). Answer: ``{"killed": bool, "exit": int | None, "events": int | None}``.
* ``{"op": "loop", "root": str, "step": int, "keep": int, "delay": float}``: the child
  saves steps ``step, step + 1, ...`` in a loop; it is SIGKILLed ``delay`` seconds after its
  first save. Answer: ``{"killed": bool}``.

:func:`make` builds the batch and optimizer of step ``s`` (every weight and every Adam
moment equals ``s``), in the server and in the tests alike.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import time
from typing import Any

import torch
from torch import nn

from modelbatch import ModelBatch
from modelbatch.checkpoint import save_all
from modelbatch.optim import Adam

IDS: list[int | str] = ["p", "q"]
_EVENT_CALLS = ("mkdir", "open", "write", "fsync", "rename", "replace", "unlink", "rmdir")


def make(step: int) -> tuple[ModelBatch, Adam]:
    """Two models and an Adam whose every tensor is filled with ``step``."""
    batch = ModelBatch([nn.Linear(3, 2).double() for _ in range(2)], model_ids=IDS)
    opt = Adam(batch, lr=0.01)
    batch(torch.ones(1, 3, dtype=torch.float64)).sum().backward()
    opt.step()  # creates the state
    with torch.no_grad():
        for _, p in batch.stacked_parameters():
            p.fill_(float(step))
        for s in opt.state.values():
            s["exp_avg"].fill_(float(step))
            s["exp_avg_sq"].fill_(float(step))
    return batch, opt


def _install_crash(crash_at: int) -> list[int]:
    """Count file-system calls; SIGKILL this process before call number ``crash_at``."""
    count = [0]

    def wrap(fn: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            if count[0] == crash_at:
                os.kill(os.getpid(), signal.SIGKILL)
            count[0] += 1
            return fn(*args, **kwargs)

        return counted

    for name in _EVENT_CALLS:
        setattr(os, name, wrap(getattr(os, name)))
    shutil.rmtree = wrap(shutil.rmtree)
    return count


def _child(cmd: dict[str, Any], out_fd: int, batch: ModelBatch, opt: Adam) -> None:
    write = os.write  # before the hooks
    if cmd["op"] == "save":
        count = _install_crash(cmd["crash_at"])
        save_all(batch, cmd["root"], optimizer=opt, step=cmd["step"], keep=cmd["keep"])
        write(out_fd, str(count[0]).encode())
        return
    step = cmd["step"]
    while True:
        save_all(batch, cmd["root"], optimizer=opt, step=step, keep=cmd["keep"])
        if step == cmd["step"]:
            write(out_fd, b"saved")
        step += 1
        batch, opt = make(step)


def _run(cmd: dict[str, Any]) -> dict[str, Any]:
    batch, opt = make(cmd["step"])
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.close(read_fd)
        code = 0
        try:
            _child(cmd, write_fd, batch, opt)
        except BaseException as e:  # reported as exit 3 with the message on stderr
            print(f"child failed: {e!r}", file=sys.stderr, flush=True)
            code = 3
        os._exit(code)
    os.close(write_fd)
    answer: dict[str, Any] = {}
    if cmd["op"] == "loop":
        first = os.read(read_fd, 16)
        if first == b"saved":
            time.sleep(cmd["delay"])
        os.kill(pid, signal.SIGKILL)
    data = b"".join(iter(lambda: os.read(read_fd, 64), b""))
    os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    answer["killed"] = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    answer["exit"] = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
    answer["events"] = int(data) if data.isdigit() else None
    return answer


def main() -> None:
    torch.set_num_threads(1)  # no thread pool: forking is safe
    warm = tempfile.mkdtemp()  # lazy imports and first-call set-up happen once, here
    try:
        batch, opt = make(0)
        save_all(batch, os.path.join(warm, "ck"), optimizer=opt)
    finally:
        shutil.rmtree(warm)
    for line in sys.stdin:
        answer = _run(json.loads(line))
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
