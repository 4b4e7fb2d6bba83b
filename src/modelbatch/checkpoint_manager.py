"""Periodic checkpoints of a training run: save every k steps, keep the newest K, resume.

A thin layer over :func:`modelbatch.checkpoint.save_all` / ``load_all``: the folder is an
ordinary checkpoint folder (``latest.json`` + ``vNNNNNNNN/`` versions), readable without
the manager.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from modelbatch.checkpoint import (
    _POINTER,
    _checkpoint_root,
    list_versions,
    load_all,
    save_all,
)

if TYPE_CHECKING:
    from modelbatch.amp import BatchGradScaler
    from modelbatch.core import ModelBatch

__all__ = ["CheckpointManager"]


class CheckpointManager:
    """Save a run's checkpoint every ``every`` steps into ``directory``, keeping the newest
    ``keep`` versions, and resume from the latest one.

    Args:
        directory: the checkpoint folder (created on the first save; a symlink is followed).
        every: :meth:`save` writes when ``step % every == 0`` (or with ``force=True``).
        keep: how many versions to keep; older ones are deleted after each commit.
        signing_key: optional secret: versions are signed and :meth:`restore` refuses
            unsigned or forged ones (see :func:`modelbatch.checkpoint.save_all`).

    Example::

        manager = CheckpointManager("runs/sweep1", every=100, keep=3)
        info = manager.restore(batch, optimizer=opt, scheduler=sched)
        start = 0 if info is None else info["step"] + 1
        for step in range(start, total):
            ...  # train one step
            manager.save(batch, step, optimizer=opt, scheduler=sched)
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        every: int = 1,
        keep: int = 3,
        signing_key: bytes | None = None,
    ) -> None:
        for name, v in (("every", every), ("keep", keep)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.directory = Path(directory)
        self.every = every
        self.keep = keep
        self.signing_key = signing_key

    def should_save(self, step: int) -> bool:
        """Whether :meth:`save` writes at ``step``."""
        return step % self.every == 0

    def save(
        self,
        batch: ModelBatch,
        step: int,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        scaler: BatchGradScaler | None = None,
        extra: dict[str, Any] | None = None,
        force: bool = False,
    ) -> Path | None:
        """Save at ``step`` if it is a multiple of ``every`` (or ``force``); returns the new
        version's folder, or None when nothing was saved."""
        if not force and not self.should_save(step):
            return None
        return save_all(
            batch,
            self.directory,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            step=step,
            extra=extra,
            keep=self.keep,
            signing_key=self.signing_key,
        )

    def steps(self) -> list[int | None]:
        """The steps of the kept versions, oldest first (``[]`` before the first save)."""
        if not self._committed():
            return []
        return [v["step"] for v in list_versions(self.directory)]

    def latest_step(self) -> int | None:
        """The step of the latest version, or None before the first save."""
        steps = self.steps()
        return steps[-1] if steps else None

    def restore(
        self,
        batch: ModelBatch,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        scaler: BatchGradScaler | None = None,
        **kwargs: Any,
    ) -> dict[str, Any] | None:
        """Load the latest version into ``batch`` (and the optimizer, schedulers, scaler,
        RNG), returning :func:`~modelbatch.checkpoint.load_all`'s dict; None when nothing
        was committed yet (no folder, or no ``latest.json`` in it: e.g. the first save was
        killed before its commit), so the run starts afresh."""
        if not self._committed():
            return None
        return load_all(
            batch,
            self.directory,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            signing_key=self.signing_key,
            **kwargs,
        )

    def _committed(self) -> bool:
        return (_checkpoint_root(self.directory) / _POINTER).exists()

    def __repr__(self) -> str:
        return f"CheckpointManager({str(self.directory)!r}, every={self.every}, keep={self.keep})"
