"""What a load reads and refuses: symlinks, FIFOs and devices inside the checkpoint,
oversized and truncated files, edited or forged manifests, malformed entries and
hyper-parameters. Each refusal is a CheckpointError naming the file and field, and leaves
the batch, optimizer, scheduler, scaler and RNG exactly as they were."""

from __future__ import annotations

import copy
import json
import math
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modelbatch import BatchGradScaler, CheckpointError, ModelBatch, load_model, seeded_models
from modelbatch.checkpoint import load_all, save_all
from modelbatch.optim import Adam, PerModelOptimizer
from tests.faults._tamper import edit_manifest, latest, pointer, replace_file

IDS: list[int | str] = ["a", "b", 7]


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).double()


def build(seed: int, per_model: bool = False) -> tuple[ModelBatch, Any, Any, BatchGradScaler]:
    batch = ModelBatch(seeded_models(mlp, [seed + i for i in range(3)]), model_ids=IDS)
    if per_model:
        opt: Any = PerModelOptimizer(batch, torch.optim.RMSprop, lr=[0.01, 0.02, 0.03])
    else:
        opt = Adam(batch, lr=[0.01, 0.02, 0.03])
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return batch, opt, sched, BatchGradScaler(batch, init_scale=[2.0, 4.0, 8.0])


def saved(path: Path, per_model: bool = False, **kwargs: Any) -> Path:
    torch.manual_seed(0)
    batch, opt, sched, scaler = build(0, per_model)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    batch.compute_loss(batch(x), y, F.cross_entropy).backward()
    opt.step()
    sched.step()
    save_all(batch, path, optimizer=opt, scheduler=sched, scaler=scaler, step=5, **kwargs)
    return path


@pytest.fixture
def ck(tmp_path: Path) -> Path:
    return saved(tmp_path / "ck")


def everything(batch: ModelBatch, opt: Any, sched: Any, scaler: Any) -> dict[str, Any]:
    return {
        "batch": {k: v.clone() for k, v in batch.state_dict().items()},
        "ids": batch.model_ids,
        "opt": copy.deepcopy(opt.state_dict()),
        "sched": sched.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].tolist()),
    }


def same(a: Any, b: Any) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            same(x, y)
    else:
        assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))


def refused(root: Path, match: str, per_model: bool = False, **kwargs: Any) -> str:
    """Load into fresh objects: a CheckpointError matching ``match``, nothing changed."""
    batch, opt, sched, scaler = build(100, per_model)
    before = everything(batch, opt, sched, scaler)
    with pytest.raises(CheckpointError, match=match) as info:
        load_all(batch, root, optimizer=opt, scheduler=sched, scaler=scaler, **kwargs)
    same(everything(batch, opt, sched, scaler), before)
    return str(info.value)


def loads(root: Path, **kwargs: Any) -> dict[str, Any]:
    batch, opt, sched, scaler = build(100)
    return load_all(batch, root, optimizer=opt, scheduler=sched, scaler=scaler, **kwargs)


def test_the_fixture_loads(ck: Path) -> None:
    assert loads(ck)["step"] == 5


# ------------------------------------------------------------------ links, FIFOs, devices
def _outside_copy(path: Path, tmp: Path) -> Path:
    out = tmp / f"outside-{path.name}"
    if path.is_dir():
        shutil.copytree(path, out)
    else:
        shutil.copy(path, out)
    return out


@pytest.mark.parametrize(
    "rel",
    ["models/a/model.safetensors", "models/b", "manifest.json", "models/7/hparams.json", "."],
    ids=["weights", "model-folder", "manifest", "hparams", "version-folder"],
)
def test_symlinks_to_identical_outside_copies_are_refused(
    ck: Path, tmp_path: Path, rel: str
) -> None:
    """The link targets hold the very same bytes (the checksums match): only the link
    itself is refused."""
    target = (latest(ck) / rel).resolve()
    copy_ = _outside_copy(target, tmp_path)
    if target.is_dir():
        shutil.rmtree(target)
    else:
        target.unlink()
    os.symlink(copy_, target)
    refused(ck, rf"{target.name} is a symbolic link")


def test_a_symlinked_pointer_is_refused(ck: Path, tmp_path: Path) -> None:
    copy_ = _outside_copy(ck / "latest.json", tmp_path)
    (ck / "latest.json").unlink()
    os.symlink(copy_, ck / "latest.json")
    refused(ck, "latest.json is a symbolic link")


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/null", "fifo"])
def test_links_to_devices_and_fifos_are_refused_without_reading(
    ck: Path, tmp_path: Path, device: str
) -> None:
    if device == "fifo":
        device = str(tmp_path / "fifo")
        os.mkfifo(device)
    elif not os.path.exists(device):
        pytest.skip(f"no {device} here")
    weights = latest(ck) / "models" / "a" / "model.safetensors"
    weights.unlink()
    os.symlink(device, weights)
    refused(ck, "model.safetensors is a symbolic link")
    with pytest.raises(CheckpointError, match="symbolic link"):
        load_model(ck, "a", mlp())


@pytest.mark.parametrize(
    "rel", ["models/a/model.safetensors", "manifest.json", "../latest.json", "rng.safetensors"]
)
def test_fifos_inside_are_refused_without_blocking(ck: Path, rel: str) -> None:
    path = latest(ck) / rel
    path.unlink()
    os.mkfifo(path)
    refused(ck, rf"{path.name} is a FIFO; a checkpoint is read only from regular files")


def test_a_folder_in_place_of_a_file(ck: Path) -> None:
    path = latest(ck) / "models" / "b" / "optimizer.safetensors"
    path.unlink()
    path.mkdir()
    refused(ck, "optimizer.safetensors is a folder")


# ------------------------------------------------------------------ sizes
def test_reads_are_bounded_by_the_recorded_size(ck: Path) -> None:
    weights = latest(ck) / "models" / "a" / "model.safetensors"
    size = weights.stat().st_size
    os.truncate(weights, 8 << 30)  # sparse: 8 GiB that would take 8 GiB of memory to read
    refused(ck, rf"has {8 << 30} bytes, the manifest records {size}")
    os.truncate(weights, size - 3)
    refused(ck, rf"has {size - 3} bytes, the manifest records {size}")
    os.truncate(ck / "latest.json", 1 << 30)
    refused(ck, "latest.json has 1073741824 bytes; at most")


# ------------------------------------------------------------------ edited files
@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m.update(step=6),
        lambda m: m["models"][1].update(active=False),
        lambda m: m["schedulers"][0]["state"].update(last_epoch=9),
        lambda m: m["rng"]["numpy"].update(pos=3),
        lambda m: m["rng"]["python"][1].__setitem__(0, 1),
        lambda m: m["scaler"]["per_model"]['"a"'].update(scale=1024.0),
    ],
    ids=["step", "active", "scheduler", "rng-numpy", "rng-python", "scaler"],
)
def test_an_edited_manifest_is_refused(ck: Path, edit: Callable[[dict[str, Any]], Any]) -> None:
    edit_manifest(ck, edit, rehash=False)
    # Either its size or its SHA-256 no longer matches what the pointer records.
    refused(ck, r"manifest.json is corrupt.*latest.json")


def test_an_edited_file_is_refused(ck: Path) -> None:
    path = latest(ck) / "models" / "7" / "optimizer.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    refused(ck, r"optimizer.safetensors \(model 7 optimizer state\) is corrupt: its SHA-256")


def test_a_signed_checkpoint_refuses_a_consistent_forgery(tmp_path: Path) -> None:
    key = b"secret of this sweep"
    root = saved(tmp_path / "signed", signing_key=key)
    assert loads(root, signing_key=key)["step"] == 5
    edit_manifest(root, lambda m: m.update(step=6))  # re-hashed: the digest alone passes
    assert loads(root)["step"] == 6
    refused(root, "not signed with the given signing_key .wrong signature.", signing_key=key)
    unsigned = saved(tmp_path / "unsigned")
    refused(unsigned, r"not signed with the given signing_key \(no signature\)", signing_key=key)


# ------------------------------------------------------------------ malformed entries
MALFORMED: list[tuple[str, Callable[[dict[str, Any]], Any], str]] = [
    (
        "rng-python-length",
        lambda m: m["rng"]["python"].__setitem__(1, [1, 2, 3]),
        "rng.python is not a Python random state",
    ),
    ("rng-python-type", lambda m: m["rng"].update(python="x"), r"rng.python must be"),
    (
        "rng-numpy-keys",
        lambda m: m["rng"]["numpy"].update(keys=[1, 2]),
        "rng.numpy is not a NumPy random state",
    ),
    ("rng-numpy-missing", lambda m: m["rng"].pop("numpy"), "rng.numpy must be an object"),
    (
        "rng-cuda",
        lambda m: m["rng"].update(cuda_devices=1),
        r"rng.safetensors holds \['torch_cpu'\], the manifest implies",
    ),
    (
        "sched-missing",
        lambda m: m["schedulers"][0]["state"].pop("last_epoch"),
        r"schedulers\[0\].state: missing entries \['last_epoch'\]",
    ),
    (
        "sched-length",
        lambda m: m["schedulers"][0]["state"].update(base_lrs=[0.1]),
        r"schedulers\[0\].state.base_lrs: expected a list of 3 entries, got 1",
    ),
    (
        "sched-type",
        lambda m: m["schedulers"][0]["state"].update(step_size="2"),
        r"schedulers\[0\].state.step_size: expected a int, got '2'",
    ),
    ("schedulers", lambda m: m.update(schedulers={}), "schedulers must be a list"),
    (
        "active",
        lambda m: m["models"][1].update(active="yes"),
        r"models\[1\].active must be true or false",
    ),
    ("step", lambda m: m.update(step="ten"), "step must be null or an int"),
    ("num-models", lambda m: m.update(num_models=5), "num_models must be 3"),
    (
        "folder-outside",
        lambda m: m["models"][0].update(folder="../../outside"),
        r"models\[0\].folder must be 'a'",
    ),
    (
        "duplicate-id",
        lambda m: m["models"][1].update(id="a", folder="a"),
        r"models\[\].id must be unique",
    ),
    (
        "scaler-scale",
        lambda m: m["scaler"]["per_model"]['"a"'].update(scale=-1.0),
        "scale must be a finite positive number",
    ),
    (
        "scaler-models",
        lambda m: m["scaler"]["per_model"].pop("7"),
        "scaler.per_model must be an object with one entry per model id",
    ),
    (
        "file-record",
        lambda m: m["files"]["rng.safetensors"].pop("size"),
        r"files\['rng.safetensors'\]",
    ),
    (
        "file-outside",
        lambda m: m["files"].update({"../x": {"sha256": "0" * 64, "size": 1}}),
        r"files\['../x'\] must be a file of this checkpoint's layout",
    ),
    (
        "arch-shape",
        lambda m: m["architecture"]["tensors"][0].update(shape="x"),
        r"architecture.tensors\[0\].shape must be a list",
    ),
    (
        "version",
        lambda m: m.update(version=1),
        "format version 1; this ModelBatch reads format version 2",
    ),
    ("format", lambda m: m.update(format="other"), "is not a ModelBatch checkpoint manifest"),
    ("folder", lambda m: m.update(folder="v00000009"), "folder must be 'v00000001'"),
    ("extra", lambda m: m.update(extra=[]), "extra must be an object"),
    ("models", lambda m: m.update(models={}), "models must be a non-empty list"),
]


@pytest.mark.parametrize(
    ("edit", "match"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED]
)
def test_malformed_manifest_entries(
    ck: Path, edit: Callable[[dict[str, Any]], Any], match: str
) -> None:
    """Re-hashed edits (so the checksums pass): the validation names the field."""
    edit_manifest(ck, edit)
    message = refused(ck, match)
    assert "manifest.json" in message or "rng.safetensors" in message


def test_manifest_that_is_not_json(ck: Path) -> None:
    replace_file(ck, "manifest.json", b"{not json", rehash=False)
    from tests.faults._tamper import write_manifest  # noqa: F401 (same helper family)

    p = pointer(ck)
    import hashlib

    p["versions"][-1].update(
        manifest_sha256=hashlib.sha256(b"{not json").hexdigest(), manifest_size=9
    )
    (ck / "latest.json").write_text(json.dumps(p))
    refused(ck, "manifest.json is not valid JSON")


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda p: p.update(versions=[]), "versions must be a non-empty list"),
        (lambda p: p.update(version=3), "latest.json has format version 3"),
        (lambda p: p["versions"][0].update(folder="../x"), r"versions\[0\].folder must be"),
        (lambda p: p["versions"][0].update(manifest_size="big"), "manifest_size must be"),
    ],
)
def test_malformed_pointer(ck: Path, edit: Callable[[dict[str, Any]], Any], match: str) -> None:
    p = pointer(ck)
    edit(p)
    (ck / "latest.json").write_text(json.dumps(p))
    refused(ck, match)


# ------------------------------------------------------------------ hyper-parameters
HPARAMS = [
    (
        "negative-lr",
        {"lr": -5.0},
        r"hparams.json \(model 'b'\) has invalid hyper-parameters: .*invalid lr -5.0",
    ),
    ("string-lr", {"lr": "abc"}, r"hyper-parameter 'lr': expected a float, got 'abc'"),
    (
        "nan-lr",
        {"lr": float("nan")},
        r"hyper-parameter 'lr' is nan; hyper-parameters must be finite",
    ),
    ("inf-eps", {"eps": float("inf")}, r"hyper-parameter 'eps' is inf"),
    ("betas", {"betas": [0.9]}, r"hyper-parameter 'betas': expected a list of 2 entries"),
    ("beta-range", {"betas": [0.9, 1.5]}, "invalid beta parameter at index 1"),
    ("bool", {"amsgrad": 1}, r"hyper-parameter 'amsgrad': expected a bool, got 1"),
    ("unexpected", {"momentum": 0.9}, r"unexpected \['momentum'\]"),
    ("model-id", {"model_id": "a"}, r"hparams.json does not belong to model 'b'"),
]


@pytest.mark.parametrize(("change", "match"), [h[1:] for h in HPARAMS], ids=[h[0] for h in HPARAMS])
def test_hparams_are_validated_as_the_constructor_does(
    ck: Path, change: dict[str, Any], match: str
) -> None:
    rel = "models/b/hparams.json"
    group = json.loads((latest(ck) / rel).read_text())
    group.update(change)
    replace_file(ck, rel, json.dumps(group).encode())
    refused(ck, match)


def test_hparams_of_a_wrapped_torch_optimizer(tmp_path: Path) -> None:
    root = saved(tmp_path / "rms", per_model=True)
    rel = "models/7/hparams.json"
    group = json.loads((latest(root) / rel).read_text())
    replace_file(root, rel, json.dumps({**group, "lr": -5.0}).encode())
    refused(
        root, r"model 7\) has invalid hyper-parameters: Invalid learning rate: -5.0", per_model=True
    )
    replace_file(root, rel, json.dumps({**group, "alpha": None}).encode())
    refused(root, "model 7", per_model=True)
    group.pop("alpha")
    replace_file(root, rel, json.dumps(group).encode())
    refused(root, r"missing hyper-parameters \['alpha'\]", per_model=True)


# ------------------------------------------------------------------ other files
def test_garbage_with_a_matching_checksum(ck: Path) -> None:
    replace_file(ck, "rng.safetensors", b"\x00" * 8)
    refused(ck, "rng.safetensors .RNG state. is not a valid safetensors file")
    replace_file(ck, "models/b/optimizer.safetensors", b"\xff" * 64)
    refused(ck, r"optimizer.safetensors \(model 'b'\) is not a valid safetensors file")


def test_a_bad_rng_tensor(ck: Path) -> None:
    from safetensors.torch import save

    replace_file(ck, "rng.safetensors", save({"torch_cpu": torch.zeros(7, dtype=torch.uint8)}))
    refused(ck, "torch_cpu is not a CPU generator state")
    assert loads(ck, restore_rng=False)["step"] == 5  # the RNG file is not even read


def test_a_failure_while_applying_is_undone(ck: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Everything checks out, but the scheduler raises while loading (the last step but
    the RNG): weights, optimizer, scheduler, scaler and RNG are put back."""

    calls = []

    def broken(self: Any, state: Any) -> None:
        self.__dict__.update(state)
        calls.append(1)
        if len(calls) == 1:  # the load fails; the undo succeeds
            raise RuntimeError("boom")

    monkeypatch.setattr(torch.optim.lr_scheduler.StepLR, "load_state_dict", broken)
    monkeypatch.setattr(
        torch.optim.lr_scheduler.StepLR,
        "state_dict",
        lambda self: {k: v for k, v in self.__dict__.items() if k != "optimizer"},
    )
    batch, opt, sched, scaler = build(100)
    before = everything(batch, opt, sched, scaler)
    before["sched"] = copy.deepcopy(before["sched"])
    with pytest.raises(CheckpointError, match=r"loading failed and was undone: RuntimeError..boom"):
        load_all(batch, ck, optimizer=opt, scheduler=sched, scaler=scaler)
    monkeypatch.undo()
    same(everything(batch, opt, sched, scaler), before)


def test_a_version_1_checkpoint_is_refused_clearly(ck: Path, tmp_path: Path) -> None:
    old = tmp_path / "old"
    shutil.copytree(latest(ck), old)
    edit = json.loads((old / "manifest.json").read_text())
    edit["version"] = 1
    (old / "manifest.json").write_text(json.dumps(edit))
    refused(old, "holds a checkpoint in format version 1 .* reads and writes format version 2")
    batch = build(0)[0]
    with pytest.raises(CheckpointError, match="format version 1"):
        save_all(batch, old)


def test_the_path_based_fallback_refuses_alike(
    ck: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where ``dir_fd`` is unavailable (Windows), the reads go by path with ``lstat``
    checks: the same refusals."""
    import modelbatch.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "_DIR_FD", False)
    assert loads(ck)["step"] == 5
    folder = latest(ck) / "models" / "b"
    outside = _outside_copy(folder, tmp_path)
    shutil.rmtree(folder)
    os.symlink(outside, folder)
    refused(ck, "b is a symbolic link")
    folder.unlink()
    shutil.copytree(outside, folder)
    weights = folder / "model.safetensors"
    weights.unlink()
    os.mkfifo(weights)
    refused(ck, "model.safetensors is a FIFO")
