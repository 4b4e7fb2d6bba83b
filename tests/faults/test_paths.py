"""Where a save writes: through symlinks (every time), never beside the folder, never into
a folder that is not a checkpoint, one writer at a time; hostile names are harmless."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from modelbatch import CheckpointError, ModelBatch
from modelbatch.checkpoint import list_versions, load_all, save_all


def batch_of(value: float) -> ModelBatch:
    batch = ModelBatch([nn.Linear(2, 2) for _ in range(2)])
    with torch.no_grad():
        for _, p in batch.stacked_parameters():
            p.fill_(value)
    return batch


def value_of(root: Path, **kwargs: object) -> float:
    batch = batch_of(-1.0)
    load_all(batch, root, **kwargs)  # type: ignore[arg-type]
    values = {float(v) for _, p in batch.stacked_parameters() for v in p.detach().flatten()}
    assert len(values) == 1
    return values.pop()


def test_saves_through_a_symlink_write_where_it_points(tmp_path: Path) -> None:
    target = tmp_path / "data" / "ck"
    target.mkdir(parents=True)
    link = tmp_path / "ck"
    link.symlink_to(target)
    for k in range(1, 4):
        assert save_all(batch_of(k), link, step=k, keep=2).parent == target
        assert link.is_symlink() and link.resolve() == target
        assert value_of(link) == k == value_of(target)
    assert [v["step"] for v in list_versions(link)] == [2, 3]
    assert sorted(os.listdir(tmp_path)) == ["ck", "data"]
    # A dangling link: the save creates the folder it points to.
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "elsewhere" / "ck")
    save_all(batch_of(7.0), dangling)
    assert dangling.is_symlink() and value_of(tmp_path / "elsewhere" / "ck") == 7.0


def test_hostile_names_touch_only_their_own_folder(tmp_path: Path) -> None:
    """``ck[ab]`` (a glob matching ``cka``), ``ck*``, ``ck?`` and others next to ``cka``,
    whose save is in progress (a temporary folder inside it): nothing of ``cka`` changes."""
    save_all(batch_of(1.0), tmp_path / "cka", step=1)
    in_progress = tmp_path / "cka" / ".tmp-0123456789abcdef"
    in_progress.mkdir()
    (in_progress / "model.safetensors").write_bytes(b"half written")
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "cka").rglob("*"))
    names = ["ck[ab]", "ck*", "ck?", "-ck", "ck a", "ck\u00e9", ".ck", "ck.prev"]
    for k, name in enumerate(names):
        save_all(batch_of(10.0 + k), tmp_path / name, step=k)
        save_all(batch_of(20.0 + k), tmp_path / name, step=k)
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "cka").rglob("*")) == before
    assert value_of(tmp_path / "cka") == 1.0
    for k, name in enumerate(names):
        assert value_of(tmp_path / name) == 20.0 + k
    assert sorted(os.listdir(tmp_path)) == sorted(["cka", *names])


def test_a_folder_that_is_not_a_checkpoint_is_left_alone(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    with pytest.raises(CheckpointError, match="not a ModelBatch checkpoint"):
        save_all(batch_of(1.0), mine)
    assert os.listdir(mine) == ["notes.txt"]  # not even a lock file
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is not a folder"):
        save_all(batch_of(1.0), tmp_path / "file")
    # Files of the user's inside a checkpoint folder survive saves.
    save_all(batch_of(1.0), tmp_path / "ck")
    (tmp_path / "ck" / "README").write_text("mine")
    save_all(batch_of(2.0), tmp_path / "ck")
    assert (tmp_path / "ck" / "README").read_text() == "mine"


def test_one_writer_at_a_time(tmp_path: Path) -> None:
    fcntl = pytest.importorskip("fcntl")
    save_all(batch_of(1.0), tmp_path / "ck")
    fd = os.open(tmp_path / "ck" / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as another saving process would hold it
        with pytest.raises(CheckpointError, match="another process is saving to"):
            save_all(batch_of(2.0), tmp_path / "ck")
    finally:
        os.close(fd)
    save_all(batch_of(2.0), tmp_path / "ck")
    assert value_of(tmp_path / "ck") == 2.0


def test_keep_versions_and_orphans(tmp_path: Path) -> None:
    root = tmp_path / "ck"
    for k in range(1, 6):
        save_all(batch_of(k), root, step=k, keep=3)
    assert [(v["version"], v["step"]) for v in list_versions(root)] == [(3, 3), (4, 4), (5, 5)]
    assert sorted(n for n in os.listdir(root) if n.startswith("v")) == [
        "v00000003",
        "v00000004",
        "v00000005",
    ]
    assert value_of(root, version=3) == 3.0
    with pytest.raises(CheckpointError, match="no version 1 in the checkpoint"):
        value_of(root, version=1)
    # A complete version the pointer does not list (a save killed before its commit) is
    # never loaded by default; the next save takes a higher number and removes it.
    shutil.copytree(root / "v00000005", root / "v00000009")
    assert value_of(root) == 5.0
    save_all(batch_of(6.0), root, step=6, keep=3)
    assert [v["version"] for v in list_versions(root)] == [4, 5, 10]
    assert not (root / "v00000009").exists()
    with pytest.raises(ValueError, match="keep must be a positive int"):
        save_all(batch_of(1.0), root, keep=0)
