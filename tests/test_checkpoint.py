"""Checkpoints: per-model safetensors + JSON, bit-identical resume, atomic saves, clear
errors on bad input, no unpickling, no writes outside the checkpoint folder."""

from __future__ import annotations

import hashlib
import json
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from modelbatch import BatchGradScaler, CheckpointError, ModelBatch, load_model, seeded_models
from modelbatch.checkpoint import model_folder_name, read_manifest
from modelbatch.optim import SGD, Adam, PerModelOptimizer

ROOT = Path(__file__).resolve().parents[1]
IDS: list[int | str] = ["a", "b", 7]


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Dropout(0.3), nn.Tanh(), nn.Linear(8, 3)
    ).double()


def build(init_seed: int, *, seeded: bool, optimizer: str = "adam"):
    seeds = [init_seed + i for i in range(3)]
    batch = ModelBatch(seeded_models(mlp, seeds), seeds=seeds if seeded else None, model_ids=IDS)
    if optimizer == "adam":
        opt: Any = Adam(batch, lr=[0.01, 0.02, 0.03], weight_decay=[0.0, 0.1, 0.0])
    else:
        opt = PerModelOptimizer(batch, torch.optim.RMSprop, lr=[0.01, 0.02, 0.03], momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return batch, opt, sched


def run(batch: ModelBatch, opt: Any, sched: Any, steps: int) -> None:
    for _ in range(steps):
        x = torch.randn(6, 5, dtype=torch.float64)  # global RNG: restored by load_all
        y = torch.randint(0, 3, (6,))
        loss = batch.compute_loss(batch(x), y, F.cross_entropy)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def same_tensors(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, b[k]), k
        elif isinstance(v, dict):
            same_tensors(v, b[k])
        else:
            assert v == b[k], k


def snapshot(batch: ModelBatch) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in batch.state_dict().items()}


# --------------------------------------------------------------------------- resume
@pytest.mark.parametrize(("seeded", "optimizer"), [(True, "adam"), (False, "rmsprop")])
def test_resume_is_bit_identical(tmp_path: Path, seeded: bool, optimizer: str) -> None:
    """Stop after k steps, resume from the checkpoint in fresh objects (other init, other RNG
    state): the same parameters, buffers, optimizer and scheduler state as never stopping,
    with dropout (seeded or torch's), a StepLR and a quarantined model."""
    k = 3
    torch.manual_seed(0)
    batch, opt, sched = build(0, seeded=seeded, optimizer=optimizer)
    run(batch, opt, sched, 1)
    batch.quarantine("b")
    run(batch, opt, sched, k - 1)
    batch.save_all(tmp_path / "ck", opt, scheduler=sched, step=k, extra={"epoch": 1})
    run(batch, opt, sched, k)

    torch.manual_seed(999)
    random.seed(5)
    resumed, opt2, sched2 = build(100, seeded=seeded, optimizer=optimizer)
    info = resumed.load_all(tmp_path / "ck", opt2, scheduler=sched2)
    assert info["step"] == k and info["extra"] == {"epoch": 1}
    assert resumed.active.tolist() == [True, False, True]
    run(resumed, opt2, sched2, k)

    same_tensors(batch.state_dict(), resumed.state_dict())
    same_tensors(opt.state_dict(), opt2.state_dict())
    assert sched.state_dict() == sched2.state_dict()
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in opt2.param_groups]


def test_resume_with_batch_grad_scaler(tmp_path: Path) -> None:
    """``scaler=``: each model's loss scale and growth tracker are saved and restored (also
    for a subset loaded by id), so a resumed fp16-style run continues bit-identically."""

    def scaled_run(batch: ModelBatch, opt: Any, scaler: BatchGradScaler, steps: int) -> None:
        for _ in range(steps):
            x = torch.randn(6, 5, dtype=torch.float64)
            y = torch.randint(0, 3, (6,))
            batch.train()
            losses = batch.compute_loss(batch(x), y, F.cross_entropy, reduction="none")
            opt.zero_grad()
            scaler.scale(losses * torch.tensor([1.0, 1e308, 1.0])).backward()  # b overflows
            scaler.step(opt)
            scaler.update()

    def fresh(seed: int) -> tuple[ModelBatch, Any, BatchGradScaler]:
        batch, opt, _ = build(seed, seeded=True)
        return batch, opt, BatchGradScaler(batch, init_scale=[8.0, 16.0, 32.0], growth_interval=2)

    torch.manual_seed(0)
    batch, opt, scaler = fresh(0)
    scaled_run(batch, opt, scaler, 3)
    batch.save_all(tmp_path / "ck", opt, scaler=scaler)
    scaled_run(batch, opt, scaler, 2)

    resumed, opt2, scaler2 = fresh(100)
    resumed.load_all(tmp_path / "ck", opt2, scaler=scaler2)
    scaled_run(resumed, opt2, scaler2, 2)
    same_tensors(batch.state_dict(), resumed.state_dict())
    assert torch.equal(scaler.get_scale(), scaler2.get_scale())
    assert scaler.state_dict() == scaler2.state_dict()
    assert scaler.get_scale().tolist() == [32.0, 0.5, 128.0]  # b overflowed 5x, a and 7 grew

    pair = ModelBatch(seeded_models(mlp, [5, 6]), seeds=[5, 6])
    pair_scaler = BatchGradScaler(pair)
    pair.load_all(tmp_path / "ck", model_ids=[7, "b"], scaler=pair_scaler)
    saved = read_manifest(tmp_path / "ck")["scaler"]["per_model"]
    assert pair_scaler.get_scale().tolist() == [saved["7"]["scale"], saved['"b"']["scale"]]
    batch.save_all(tmp_path / "plain", opt)
    with pytest.raises(CheckpointError, match="has no scaler state"):
        resumed.load_all(tmp_path / "plain", scaler=scaler2)


def test_layout_and_plain_pytorch_loading(tmp_path: Path) -> None:
    torch.manual_seed(0)
    batch, opt, sched = build(0, seeded=True)
    run(batch, opt, sched, 2)
    root = batch.save_all(tmp_path / "ck", opt, scheduler=sched)
    assert root == tmp_path / "ck" / "v00000001"
    pointer = json.loads((tmp_path / "ck" / "latest.json").read_text())
    assert [v["folder"] for v in pointer["versions"]] == ["v00000001"]
    manifest = json.loads((root / "manifest.json").read_text())
    assert (
        pointer["versions"][0]["manifest_sha256"]
        == hashlib.sha256((root / "manifest.json").read_bytes()).hexdigest()
    )
    assert manifest["num_models"] == 3
    assert [m["id"] for m in manifest["models"]] == IDS
    assert manifest["optimizer"] == "modelbatch.optim.adam.Adam"
    for i, mid in enumerate(IDS):
        folder = root / "models" / model_folder_name(mid)
        # Plain PyTorch, no ModelBatch: safetensors + load_state_dict.
        plain = mlp()
        plain.load_state_dict(safetensors.torch.load_file(folder / "model.safetensors"))
        same_tensors(plain.state_dict(), batch.extract(mid).state_dict())
        hp = json.loads((folder / "hparams.json").read_text())
        assert hp["model_id"] == mid and hp["lr"] == opt.param_groups[i]["lr"]
        assert hp["weight_decay"] == [0.0, 0.1, 0.0][i]
        opt_state = safetensors.torch.load_file(folder / "optimizer.safetensors")
        assert torch.equal(opt_state["0.weight/exp_avg"], opt.state["0.weight"]["exp_avg"][i])
        batch_only = safetensors.torch.load_file(folder / "batch_state.safetensors")
        assert set(batch_only) == {"2.seed", "2.counter"}
    same_tensors(load_model(root.parent, "b", mlp()).state_dict(), batch.extract("b").state_dict())


def test_load_a_subset_by_id(tmp_path: Path) -> None:
    batch, _, _ = build(0, seeded=False)
    batch.save_all(tmp_path / "ck")
    pair = ModelBatch(seeded_models(mlp, [50, 51]), model_ids=["x", "y"])
    pair.load_all(tmp_path / "ck", model_ids=[7, "a"])
    assert pair.model_ids == [7, "a"]
    same_tensors(pair.extract(7).state_dict(), batch.extract(7).state_dict())
    same_tensors(pair.extract("a").state_dict(), batch.extract("a").state_dict())


def test_python_and_numpy_rng_are_restored(tmp_path: Path) -> None:
    batch, _, _ = build(0, seeded=False)
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    batch.save_all(tmp_path / "ck")
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(10)
    np.random.seed(20)
    torch.manual_seed(30)
    batch.load_all(tmp_path / "ck")
    assert (random.random(), np.random.rand()) == expected[:2]
    assert torch.equal(torch.rand(1), expected[2])


# --------------------------------------------------------------------------- atomicity
class NotJsonable:
    def __init__(self) -> None:
        self.table = torch.ones(2)

    def __call__(self, epoch: int) -> float:
        return 1.0


def test_exception_mid_save_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    batch, opt, _ = build(0, seeded=True)
    batch.save_all(tmp_path / "ck", opt, step=1)
    before = snapshot(batch)
    with torch.no_grad():
        for _, p in batch.stacked_parameters():
            p.add_(1.0)
    bad = torch.optim.lr_scheduler.LambdaLR(opt, NotJsonable())
    # The models are written before the scheduler state fails to encode.
    with pytest.raises(CheckpointError, match=r"scheduler 0 .*Tensor"):
        batch.save_all(tmp_path / "ck", opt, scheduler=bad, step=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # nothing beside the folder
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [
        ".lock",
        "latest.json",
        "v00000001",
    ]  # no temporary left over
    fresh, opt2, _ = build(100, seeded=True)
    assert fresh.load_all(tmp_path / "ck", opt2)["step"] == 1
    same_tensors(fresh.state_dict(), before)


# --------------------------------------------------------------------------- bad input
@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, ModelBatch, Any]:
    torch.manual_seed(0)
    batch, opt, sched = build(0, seeded=False)
    run(batch, opt, sched, 1)
    batch.save_all(tmp_path / "ck", opt, scheduler=sched)
    return tmp_path / "ck", batch, opt


def assert_unchanged_after_error(path: Path, match: str, **kwargs: Any) -> None:
    batch, opt, _ = build(100, seeded=False)
    before = snapshot(batch)
    with pytest.raises(CheckpointError, match=match):
        batch.load_all(path, opt, **kwargs)
    same_tensors(batch.state_dict(), before)
    assert opt.state == {}


def test_other_architecture(saved: tuple[Path, ModelBatch, Any]) -> None:
    path = saved[0]
    wide = ModelBatch(
        [nn.Sequential(nn.Linear(5, 9), nn.Tanh(), nn.Linear(9, 3)).double() for _ in range(3)],
        model_ids=IDS,
    )
    with pytest.raises(CheckpointError, match="another architecture"):
        wide.load_all(path)
    same_shape_other_dtype = ModelBatch(
        seeded_models(lambda: mlp().float(), [1, 2, 3]), model_ids=IDS
    )
    with pytest.raises(CheckpointError, match=r"'0.weight' is saved with .* dtype float64"):
        same_shape_other_dtype.load_all(path)
    seeded = ModelBatch(seeded_models(mlp, [1, 2, 3]), seeds=[1, 2, 3], model_ids=IDS)
    with pytest.raises(CheckpointError, match="seeds="):
        seeded.load_all(path)
    with pytest.raises(CheckpointError, match="does not fit the template"):
        load_model(path, "a", nn.Linear(5, 3))


def test_other_n_and_unknown_ids(saved: tuple[Path, ModelBatch, Any]) -> None:
    path = saved[0]
    pair = ModelBatch(seeded_models(mlp, [1, 2]), model_ids=["a", "b"])
    with pytest.raises(CheckpointError, match="holds 3 models, the batch 2"):
        pair.load_all(path)
    with pytest.raises(CheckpointError, match=r"model id\(s\) \['zzz'\] are not in the checkpoint"):
        pair.load_all(path, model_ids=["a", "zzz"])
    with pytest.raises(CheckpointError, match="names 3 models for a batch of 2"):
        pair.load_all(path, model_ids=IDS)
    other_ids = ModelBatch(seeded_models(mlp, [1, 2, 3]))
    with pytest.raises(CheckpointError, match=r"\[0, 1, 2\] are not in the checkpoint"):
        other_ids.load_all(path)
    with pytest.raises(CheckpointError, match="model id 'zzz' is not in the checkpoint"):
        load_model(path, "zzz", mlp())
    assert_unchanged_after_error(path, "not in the checkpoint", model_ids=["a", "b", "zzz"])


def test_missing_and_corrupt_files(saved: tuple[Path, ModelBatch, Any]) -> None:
    """(More in tests/faults/: links, FIFOs, devices, edited and malformed manifests.)"""
    path = saved[0]
    version = path / "v00000001"
    target = version / "models" / "b" / "optimizer.safetensors"
    original = target.read_bytes()
    target.unlink()
    assert_unchanged_after_error(path, r"missing file .*optimizer.safetensors")
    target.write_bytes(b"\xff" * 16 + original[16:])
    assert_unchanged_after_error(path, "is corrupt: its SHA-256 does not match")
    target.write_bytes(original + b"\x00")
    assert_unchanged_after_error(path, rf"has {len(original) + 1} bytes, the manifest records")
    target.write_bytes(original)
    (version / "manifest.json").unlink()
    assert_unchanged_after_error(path, "missing file .*manifest.json")
    (path / "latest.json").unlink()
    assert_unchanged_after_error(path, r"latest.json is missing; .*\['v00000001'\]")
    assert_unchanged_after_error(path.parent / "nowhere", "no checkpoint at")


def test_optimizer_and_scheduler_mismatch(saved: tuple[Path, ModelBatch, Any]) -> None:
    path = saved[0]
    batch = ModelBatch(seeded_models(mlp, [1, 2, 3]), model_ids=IDS)
    with pytest.raises(
        CheckpointError, match=r"optimizer is modelbatch\.optim\.adam\.Adam, the given one"
    ):
        batch.load_all(path, SGD(batch, lr=0.1))
    opt = Adam(batch)
    step_lr = torch.optim.lr_scheduler.StepLR(opt, 1)
    with pytest.raises(CheckpointError, match="has 1 scheduler"):
        batch.load_all(path, opt, scheduler=[step_lr, step_lr])
    with pytest.raises(CheckpointError, match=r"scheduler 0 is a .*ExponentialLR"):
        batch.load_all(path, opt, scheduler=torch.optim.lr_scheduler.ExponentialLR(opt, 0.9))
    other = ModelBatch(seeded_models(mlp, [1, 2, 3]), model_ids=IDS)
    with pytest.raises(CheckpointError, match="not built for this batch"):
        batch.load_all(path, Adam(other))
    with pytest.raises(TypeError, match=r"support the optimizers of modelbatch\.optim"):
        batch.save_all(path, torch.optim.SGD(batch.parameters(), lr=0.1))


def test_refuses_to_replace_a_folder_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    batch, _, _ = build(0, seeded=False)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(CheckpointError, match="not a ModelBatch checkpoint"):
        batch.save_all(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"


# --------------------------------------------------------------------------- security
def test_model_ids_cannot_escape_the_folder(tmp_path: Path) -> None:
    ids: list[int | str] = [
        "../evil",
        "/etc/passwd",
        "a\x00b",
        "..",
        ".",
        "3",
        3,
        "ü/x",
        "%2E",
        "C:\\win",
        "-1",
    ]
    models = [nn.Linear(2, 2) for _ in ids]
    batch = ModelBatch(models, model_ids=ids)
    root = tmp_path / "inner" / "ck"
    batch.save_all(root)
    written = [p for p in tmp_path.rglob("*")]
    assert all(root in p.parents or p == root or p == root.parent for p in written)
    folders = sorted(p.name for p in (root / "v00000001" / "models").iterdir())
    assert len(folders) == len(ids)
    assert all(f not in (".", "..") and "/" not in f and "\\" not in f for f in folders)
    assert model_folder_name(3) != model_folder_name("3")
    fresh = ModelBatch([nn.Linear(2, 2) for _ in ids], model_ids=ids)
    fresh.load_all(root)
    same_tensors(fresh.state_dict(), batch.state_dict())
    with pytest.raises(CheckpointError, match="empty string"):
        ModelBatch([nn.Linear(2, 2)], model_ids=[""]).save_all(tmp_path / "x")


def test_loading_never_unpickles(
    saved: tuple[Path, ModelBatch, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a checkpoint load must not unpickle")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    batch, opt, sched = build(100, seeded=False)
    batch.load_all(saved[0], opt, scheduler=sched)
    load_model(saved[0], "a", mlp())


@pytest.mark.cuda
def test_cuda_checkpoint_loads_on_cpu_and_back(tmp_path: Path) -> None:
    torch.manual_seed(0)
    torch.cuda.init()
    on_gpu = ModelBatch([m.cuda() for m in seeded_models(mlp, [1, 2, 3])], seeds=[1, 2, 3])
    opt = Adam(on_gpu, lr=0.01)
    x, y = torch.randn(6, 5, dtype=torch.float64).cuda(), torch.randint(0, 3, (6,)).cuda()
    on_gpu.compute_loss(on_gpu(x), y, F.cross_entropy).backward()
    opt.step()
    on_gpu.save_all(tmp_path / "ck", opt)
    assert read_manifest(tmp_path / "ck")["rng"]["cuda_devices"] == torch.cuda.device_count()
    on_cpu = ModelBatch(seeded_models(mlp, [4, 5, 6]), seeds=[7, 8, 9])
    opt_cpu = Adam(on_cpu, lr=0.5)
    on_cpu.load_all(tmp_path / "ck", opt_cpu)
    for (name, a), b in zip(on_gpu.state_dict().items(), on_cpu.state_dict().values(), strict=True):
        assert torch.equal(a.cpu(), b), name
    assert torch.equal(opt_cpu.state["0.weight"]["exp_avg"], opt.state["0.weight"]["exp_avg"].cpu())
    back = ModelBatch([m.cuda() for m in seeded_models(mlp, [4, 5, 6])], seeds=[7, 8, 9])
    back.load_all(tmp_path / "ck")
    assert torch.equal(back.stacked[0].weight, on_gpu.stacked[0].weight)


# --------------------------------------------------------------------------- state_dict
def test_state_dict_carries_and_checks_model_ids() -> None:
    """``ModelBatch.state_dict()`` names the models of its [N, ...] rows; loading it into a
    batch of other models is refused before anything is copied."""
    src = ModelBatch([nn.Linear(2, 2) for _ in range(2)], model_ids=[1, 2])
    sd = src.state_dict()
    assert json.loads(bytes(sd["model_ids"].tolist())) == [1, 2]
    other = ModelBatch([nn.Linear(2, 2) for _ in range(2)])
    before = snapshot(other)
    with pytest.raises(RuntimeError, match=r"holds models \[1, 2\], this batch holds \[0, 1\]"):
        other.load_state_dict(sd)
    same_tensors(other.state_dict(), before)
    legacy = {k: v for k, v in sd.items() if k != "model_ids"}
    with pytest.raises(RuntimeError, match=r'Missing key.* "model_ids"'):
        other.load_state_dict(legacy)
    other.load_state_dict({**legacy, "model_ids": other.state_dict()["model_ids"]})  # by position
    same_tensors(other.stacked.state_dict(), src.stacked.state_dict())
    other.load_state_dict(legacy, strict=False)
    twin = ModelBatch([nn.Linear(2, 2) for _ in range(2)], model_ids=[1, 2])
    twin.load_state_dict(sd)
    outer = nn.ModuleDict({"batch": twin})
    assert "batch.model_ids" in outer.state_dict()
    outer.load_state_dict(outer.state_dict())


# --------------------------------------------------------------------------- per-model settings
RATES = {"a": 0.1, "b": 0.3, 7: 0.5}
MOMENTA = {"a": 0.1, "b": 0.2, 7: 0.05}


def mlp_with(p: float, momentum: float) -> nn.Module:
    return nn.Sequential(
        nn.Linear(5, 8), nn.BatchNorm1d(8, momentum=momentum), nn.Dropout(p), nn.Tanh(),
        nn.Linear(8, 3),
    ).double()


def settings_batch(init_seed: int, ids: list[int | str], rates: dict[Any, float]):
    """A seeded dropout-rate (and BatchNorm-momentum) sweep: model ``mid`` has dropout
    ``rates[mid]`` and momentum ``MOMENTA[mid]``."""
    seeds = [init_seed + k for k in range(len(ids))]
    models = [
        seeded_models(lambda mid=mid: mlp_with(rates[mid], MOMENTA[mid]), [s])[0]
        for mid, s in zip(ids, seeds, strict=True)
    ]
    batch = ModelBatch(models, seeds=seeds, model_ids=ids)
    opt = Adam(batch, lr=[0.01, 0.02, 0.03][: len(ids)])
    return batch, opt


def train_steps(batch: ModelBatch, opt: Any, steps: int) -> None:
    for _ in range(steps):
        x = torch.randn(6, 5, dtype=torch.float64)
        y = torch.randint(0, 3, (6,))
        loss = batch.compute_loss(batch(x), y, F.cross_entropy)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_settings_are_recorded_in_the_manifest(tmp_path: Path) -> None:
    batch, _ = settings_batch(0, IDS, RATES)
    batch.save_all(tmp_path / "ck")
    models = read_manifest(tmp_path / "ck")["models"]
    for entry in models:
        mid = entry["id"]
        assert entry["settings"] == {
            "1": {"momentum": MOMENTA[mid], "eps": 1e-5},
            "2": {"p": RATES[mid]},
        }


def test_dropout_rate_sweep_resumes_bit_identical(tmp_path: Path) -> None:
    """A seeded dropout-rate and momentum sweep, saved mid-training and reloaded into a
    batch built with the same settings (other weights): training continues bit for bit."""
    torch.manual_seed(0)
    batch, opt = settings_batch(0, IDS, RATES)
    train_steps(batch, opt, 2)
    batch.save_all(tmp_path / "ck", opt)
    train_steps(batch, opt, 2)

    torch.manual_seed(123)
    resumed, opt2 = settings_batch(100, IDS, RATES)
    resumed.load_all(tmp_path / "ck", opt2)
    train_steps(resumed, opt2, 2)
    same_tensors(batch.state_dict(), resumed.state_dict())
    same_tensors(opt.state_dict(), opt2.state_dict())
    for mid in IDS:
        assert resumed.extract(mid)[2].p == RATES[mid]


def test_loading_into_slots_with_other_settings_is_refused(tmp_path: Path) -> None:
    torch.manual_seed(0)
    batch, opt = settings_batch(0, IDS, RATES)
    train_steps(batch, opt, 1)
    batch.save_all(tmp_path / "ck", opt)

    # Slot "b" built with p=0.1: model b (p=0.3) would run with another model's rate.
    other, opt2 = settings_batch(100, IDS, {"a": 0.1, "b": 0.1, 7: 0.5})
    before = snapshot(other)
    with pytest.raises(
        CheckpointError,
        match=r"model 'b' .* position 1 .* submodule '2' \(.*Dropout.*\), attribute 'p' is "
        r"0\.3 in the checkpoint where .* built with 0\.1",
    ):
        other.load_all(tmp_path / "ck", opt2)
    same_tensors(other.state_dict(), before)
    assert opt2.state == {} and other.model_ids == IDS

    # Loading a subset by id: position k must have model_ids[k]'s settings.
    pair = ModelBatch(
        [mlp_with(RATES["a"], MOMENTA["a"]), mlp_with(RATES[7], MOMENTA[7])],
        seeds=[5, 6], model_ids=["x", "y"],
    )
    before = snapshot(pair)
    with pytest.raises(CheckpointError, match=r"model 7 .* position 0 .*attribute 'momentum'"):
        pair.load_all(tmp_path / "ck", model_ids=[7, "a"])
    same_tensors(pair.state_dict(), before)
    assert pair.model_ids == ["x", "y"]
    pair.load_all(tmp_path / "ck", model_ids=["a", 7])

    # A layer without the setting at that path (same tensors, so the same fingerprint).
    ModelBatch([mlp_with(RATES[m], MOMENTA[m]) for m in IDS], model_ids=IDS).save_all(
        tmp_path / "plain"
    )
    no_dropout = ModelBatch(
        [nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8, momentum=MOMENTA[mid]), nn.Identity(),
                       nn.Tanh(), nn.Linear(8, 3)).double() for mid in IDS],
        model_ids=IDS,
    )
    with pytest.raises(
        CheckpointError,
        match=r"model 'a' .*submodule '2' \(Identity\), attribute 'p' is 0\.1 in the "
        r"checkpoint where .* built with <absent>",
    ):
        no_dropout.load_all(tmp_path / "plain")
    same_tensors(pair.extract(7).state_dict(), batch.extract(7).state_dict())
    assert pair.extract(7)[2].p == RATES[7] and pair.extract(7)[1].momentum == MOMENTA[7]


def test_load_model_gives_each_model_its_own_settings(tmp_path: Path) -> None:
    batch, _ = settings_batch(0, IDS, RATES)
    batch.save_all(tmp_path / "ck")
    template = mlp_with(0.9, 0.9)
    for mid in IDS:
        model = load_model(tmp_path / "ck", mid, template)
        assert model[2].p == RATES[mid] and model[1].momentum == MOMENTA[mid]
        same_tensors(model.state_dict(), batch.extract(mid).state_dict())
    assert template[2].p == 0.9  # the template is not touched
    # A template whose layer at that path cannot take the saved setting.
    no_dropout = nn.Sequential(
        nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Identity(), nn.Tanh(), nn.Linear(8, 3)
    ).double()
    with pytest.raises(CheckpointError, match=r"submodule '2' .*'p' = 0\.3 in the checkpoint"):
        load_model(tmp_path / "ck", "b", no_dropout)


def test_checkpoints_without_recorded_settings_load_as_before(tmp_path: Path) -> None:
    """A format-2 checkpoint written before settings were recorded: nothing to check, the
    batch keeps its slots' settings and load_model the template's."""
    from tests.faults._tamper import edit_manifest

    batch, _ = settings_batch(0, IDS, RATES)
    batch.save_all(tmp_path / "ck")

    def drop_settings(m: dict[str, Any]) -> None:
        for entry in m["models"]:
            del entry["settings"]

    edit_manifest(tmp_path / "ck", drop_settings)
    other, _ = settings_batch(100, IDS, {"a": 0.1, "b": 0.1, 7: 0.5})
    other.load_all(tmp_path / "ck")
    assert other.extract("b")[2].p == 0.1
    same_tensors(other.extract("b")[0].state_dict(), batch.extract("b")[0].state_dict())
    assert load_model(tmp_path / "ck", "b", mlp_with(0.9, 0.1))[2].p == 0.9


@pytest.mark.parametrize(
    "bad", [[], {"2": []}, {"2": {}}, {"2": {"p": "0.3"}}, {"2": {"p": [0.3]}}]
)
def test_malformed_settings_are_refused(tmp_path: Path, bad: Any) -> None:
    from tests.faults._tamper import edit_manifest

    batch, _ = settings_batch(0, IDS, RATES)
    batch.save_all(tmp_path / "ck")
    edit_manifest(tmp_path / "ck", lambda m: m["models"][1].__setitem__("settings", bad))
    with pytest.raises(CheckpointError, match=r"models\[1\]\.settings"):
        batch.load_all(tmp_path / "ck")


def test_a_setting_assigned_on_the_batch_is_what_the_checkpoint_records(tmp_path: Path) -> None:
    """``batch.stacked.bn.momentum = v`` applies to every model; the checkpoint records the
    momentum the models train with, not the one they were built with."""

    def net(momentum: float) -> nn.Module:
        return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, momentum=momentum))

    batch = ModelBatch([net(0.1) for _ in range(2)])
    batch.stacked[1].momentum = 0.75
    batch.save_all(tmp_path / "ck")
    with pytest.raises(CheckpointError, match=r"'momentum' is 0\.75 in the checkpoint"):
        ModelBatch([net(0.1) for _ in range(2)]).load_all(tmp_path / "ck")
    ModelBatch([net(0.75) for _ in range(2)]).load_all(tmp_path / "ck")
