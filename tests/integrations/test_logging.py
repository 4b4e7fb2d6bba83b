"""Per-model loggers: CSV and JSONL (no extra), TensorBoard and W&B (real libraries, offline).

Every logger is fed the real ``ModelBatch.metrics()`` of a small batch, including a step
after a model was dropped, and its output is read back from disk.
"""

from __future__ import annotations

import csv
import json
import math
import runpy
import struct
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modelbatch import ModelBatch
from modelbatch.integrations.logging import (
    BatchLogger,
    CSVLogger,
    JSONLLogger,
    TensorBoardLogger,
    WandbLogger,
    log_batch_metrics,
    scalar_metrics,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _batch_with_metrics(ids: list[int]) -> ModelBatch:
    torch.manual_seed(0)
    batch = ModelBatch([nn.Linear(3, 2) for _ in ids], model_ids=ids)
    x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    batch.compute_loss(batch(x), y, F.cross_entropy)
    batch.log_metric("acc", torch.arange(len(ids), dtype=torch.float32) / 10)
    return batch


def _log_three_steps(logger: BatchLogger) -> list[list[dict[str, Any]]]:
    """Steps 0 and 1 with models 5, 7, 9; step 2 after model 7 was dropped."""
    batch = _batch_with_metrics([5, 7, 9])
    rows = []
    for step in range(2):
        rows.append(batch.metrics())
        log_batch_metrics(logger, batch, step)
    batch.drop(7)
    rows.append(batch.metrics())
    log_batch_metrics(logger, batch, 2)
    logger.close()
    return rows


def test_scalar_metrics_skips_ids_and_converts_flags():
    row = {"model_id": 3, "index": 0, "active": False, "loss": 0.5, "note": "x", "n": 2}
    assert scalar_metrics(row) == {"active": 0.0, "loss": 0.5, "n": 2.0}


@pytest.mark.parametrize("cls", [CSVLogger, JSONLLogger])
def test_file_loggers_follow_the_protocol(tmp_path, cls):
    logger = cls(tmp_path / "m.out")
    assert isinstance(logger, BatchLogger)
    with pytest.raises(ValueError, match="model_id"):
        logger.log([{"loss": 1.0}], 0)
    logger.close()
    logger.close()  # idempotent


def test_csv_logger_long_format_survives_a_dropped_model(tmp_path):
    path = tmp_path / "sub" / "metrics.csv"
    rows = _log_three_steps(CSVLogger(path))
    with open(path, newline="") as f:
        lines = list(csv.reader(f))
    assert lines[0] == ["step", "model_id", "metric", "value"]
    got = {(int(s), int(m), k): float(v) for s, m, k, v in lines[1:]}
    assert len(got) == len(lines) - 1  # no duplicate (step, model, metric)
    expected = {
        (step, r["model_id"], k): float(v)
        for step, step_rows in enumerate(rows)
        for r in step_rows
        for k, v in r.items()
        if k in ("loss", "acc", "active")
    }
    assert got == expected
    assert (2, 7, "loss") not in got
    assert (2, 9, "loss") in got


def test_csv_logger_append_keeps_one_header(tmp_path):
    path = tmp_path / "m.csv"
    _log_three_steps(CSVLogger(path))
    n_before = len(path.read_text().splitlines())
    _log_three_steps(CSVLogger(path, append=True))
    lines = path.read_text().splitlines()
    assert lines.count("step,model_id,metric,value") == 1
    assert len(lines) == 2 * n_before - 1


def test_jsonl_logger_writes_one_strict_json_object_per_model_and_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    logger = JSONLLogger(path)
    batch = _batch_with_metrics([0, 1])
    batch.log_metric("acc", torch.tensor([float("nan"), 0.5]))
    log_batch_metrics(logger, batch, 4)
    logger.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    metrics = batch.metrics()
    assert [r["model_id"] for r in records] == [0, 1]
    assert all(r["step"] == 4 and r["active"] is True for r in records)
    assert records[0]["acc"] is None
    assert records[1]["acc"] == 0.5
    assert [r["loss"] for r in records] == [m["loss"] for m in metrics]
    assert "index" not in records[0]


def _read_tensorboard(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_logger_writes_per_model_scalars_in_one_run(tmp_path):
    rows = _log_three_steps(TensorBoardLogger(tmp_path / "tb"))
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 1
    scalars = _read_tensorboard(tmp_path / "tb")
    assert set(scalars) == {f"{m}/model_{i}" for m in ("loss", "acc", "active") for i in (5, 7, 9)}
    for step, step_rows in enumerate(rows):
        for r in step_rows:
            got = dict(scalars[f"loss/model_{r['model_id']}"])[step]
            assert got == pytest.approx(r["loss"], rel=1e-6)
    assert [s for s, _ in scalars["loss/model_7"]] == [0, 1]
    assert [s for s, _ in scalars["loss/model_9"]] == [0, 1, 2]


def test_tensorboard_logger_metric_filter(tmp_path):
    _log_three_steps(TensorBoardLogger(tmp_path, metrics=["loss"]))
    assert set(_read_tensorboard(tmp_path)) == {"loss/model_5", "loss/model_7", "loss/model_9"}


def read_wandb_file(path: Path) -> list[Any]:
    """The records of an offline ``run-*.wandb`` file, parsed with wandb's own protobufs.

    The file is a 7-byte ``:W&B`` header followed by LevelDB-log-framed records
    (32 KiB blocks; 7-byte chunk headers: crc32, length, type 1 full / 2 first / 3 middle /
    4 last).
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, records, buf = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0:
            continue
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            records.append(record)
            buf = b""
    return records


def _finished_wandb_records(path: Path, timeout: float = 30.0) -> list[Any]:
    """Records of a finished offline run. wandb's service process writes the file
    asynchronously, after ``run.finish()`` returns: wait for the run's ``exit`` record."""
    deadline = time.monotonic() + timeout
    while True:
        records = read_wandb_file(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} has no exit record after {timeout} s")
        time.sleep(0.05)


def _wandb_runs(root: Path) -> dict[str, dict[str, Any]]:
    """{display name: {"group", "config", "history": [{key: value}]}} of offline runs."""
    runs = {}
    for path in sorted(root.glob("wandb/offline-run-*/run-*.wandb")):
        info: dict[str, Any] = {"history": [], "config": {}}
        for rec in _finished_wandb_records(path):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                info["name"] = rec.run.display_name
                info["group"] = rec.run.run_group
                for item in rec.run.config.update:
                    info["config"][item.key] = json.loads(item.value_json)
            elif kind == "config":
                for item in rec.config.update:
                    info["config"][item.key] = json.loads(item.value_json)
            elif kind == "metric":
                info.setdefault("step_metric", {})[rec.metric.glob_name or rec.metric.name] = (
                    rec.metric.step_metric
                )
            elif kind == "history":
                info["history"].append(
                    {
                        item.key or "/".join(item.nested_key): json.loads(item.value_json)
                        for item in rec.history.item
                    }
                )
        runs[info["name"]] = info
    return runs


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    return tmp_path


def test_wandb_logger_one_run_with_per_model_keys(wandb_env):
    rows = _log_three_steps(WandbLogger(project="mb", name="single", mode="offline"))
    runs = _wandb_runs(wandb_env)
    assert list(runs) == ["single"]
    history = runs["single"]["history"]
    assert [h["step"] for h in history] == [0, 1, 2]
    for step, step_rows in enumerate(rows):
        logged = {k: v for k, v in history[step].items() if k[0] != "_" and k != "step"}
        expected = {
            f"{k}/model_{r['model_id']}": pytest.approx(float(r[k]))
            for r in step_rows
            for k in ("loss", "acc", "active")
        }
        assert logged == expected


def test_wandb_logger_keeps_steps_that_go_back(wandb_env):
    # sweep() and optimize_batched() log each ModelBatch from epoch 0 again; W&B drops a log
    # at a step below its current one, so the step is a key used as every chart's x-axis.
    with WandbLogger(project="mb", name="rounds", mode="offline", dir=wandb_env) as logger:
        for ids in ([0, 1], [2]):
            for step in range(2):
                logger.log([{"model_id": i, "loss": 10 * i + step} for i in ids], step)
    run = _wandb_runs(wandb_env)["rounds"]
    logged = [(h["step"], k, v) for h in run["history"] for k, v in h.items() if "/" in k]
    assert sorted(logged) == [
        (0, "loss/model_0", 0), (0, "loss/model_1", 10), (0, "loss/model_2", 20),
        (1, "loss/model_0", 1), (1, "loss/model_1", 11), (1, "loss/model_2", 21),
    ]  # fmt: skip
    assert run["step_metric"]["*"] == "step"


def test_wandb_logger_one_run_per_model_in_a_group(wandb_env):
    logger = WandbLogger(
        project="mb",
        name="sweep",
        group="g1",
        mode="offline",
        dir=wandb_env,
        config={"epochs": 3},
        model_configs={5: {"lr": 0.1}, 7: {"lr": 0.2}},
        per_model_runs=True,
    )
    rows = _log_three_steps(logger)
    runs = _wandb_runs(wandb_env)
    assert set(runs) == {"sweep-model_5", "sweep-model_7", "sweep-model_9"}
    assert {r["group"] for r in runs.values()} == {"g1"}
    assert runs["sweep-model_5"]["config"]["lr"] == 0.1
    assert runs["sweep-model_9"]["config"]["model_id"] == 9
    assert runs["sweep-model_9"]["config"]["epochs"] == 3
    for mid, n_steps in ((5, 3), (7, 2), (9, 3)):
        history = runs[f"sweep-model_{mid}"]["history"]
        assert len(history) == n_steps
        losses = [r["loss"] for step_rows in rows for r in step_rows if r["model_id"] == mid]
        assert [h["loss"] for h in history] == pytest.approx(losses)
        assert "loss/model_5" not in history[0]


@pytest.mark.parametrize(
    ("module", "make"),
    [
        ("tensorboard", lambda p: TensorBoardLogger(p)),
        ("wandb", lambda p: WandbLogger(mode="offline", dir=p)),
    ],
)
def test_missing_extra_is_named(tmp_path, monkeypatch, module, make):
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError, match=rf"modelbatch\[{module}\]"):
        make(tmp_path)


def test_tensorboard_example_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["tensorboard_example.py", str(tmp_path)])
    runpy.run_path(str(EXAMPLES / "tensorboard_example.py"), run_name="__main__")
    scalars = _read_tensorboard(tmp_path)
    assert "train_loss/model_0" in scalars
    assert all(math.isfinite(v) for _, v in scalars["train_loss/model_0"])


def test_wandb_example_runs(wandb_env, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["wandb_example.py", str(wandb_env)])
    runpy.run_path(str(EXAMPLES / "wandb_example.py"), run_name="__main__")
    runs = _wandb_runs(wandb_env)
    assert len(runs) == 1
    (run,) = runs.values()
    assert any("train_loss/model_0" in h for h in run["history"])


def test_csv_example_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["csv_example.py", str(tmp_path)])
    runpy.run_path(str(EXAMPLES / "csv_example.py"), run_name="__main__")
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    steps_of = {m: {int(r["step"]) for r in rows if r["model_id"] == m} for m in "abcd"}
    assert steps_of == {"a": {0}, "b": {0, 1, 2}, "c": {0, 1, 2}, "d": {0, 1, 2}}
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4 + 3 * 2  # 4 models at step 0, then 3


def _read_hparams(run_dir: Path) -> dict[str, Any]:
    """The HParams session of one TensorBoard run folder, read back with tensorboard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    ea = EventAccumulator(str(run_dir))
    ea.Reload()
    out: dict[str, Any] = {}
    for content in ea.PluginTagToContent("hparams").values():
        data = plugin_data_pb2.HParamsPluginData.FromString(content)
        if data.HasField("session_start_info"):
            for k, v in data.session_start_info.hparams.items():
                out[k] = v.number_value if v.HasField("number_value") else v.string_value
    scalars = {tag: ea.Scalars(tag)[-1].value for tag in ea.Tags()["scalars"]}
    return {"hparams": out, "metrics": scalars}


def test_a_sweep_fills_tensorboard_hparams_and_logs_each_models_lr(tmp_path):
    from modelbatch.integrations import sweep
    from tests.integrations._toy import make_loader, make_mlp

    configs = [{"seed": s, "lr": lr} for s, lr in enumerate([0.01, 0.1, 0.3])]
    logger = TensorBoardLogger(tmp_path / "tb")
    res = sweep(configs, make_mlp, train_loader=make_loader(), loss_fn=F.cross_entropy,
                epochs=2, optimizer_cls=torch.optim.SGD, logger=logger, progress=False,
                scheduler_fn=lambda o: torch.optim.lr_scheduler.StepLR(o, 1, 0.5))
    logger.close()
    scalars = _read_tensorboard(tmp_path / "tb")
    for i, c in enumerate(configs):
        # The lr each model trained its epoch with: halved after every step (3 per epoch).
        assert [v for _, v in scalars[f"lr/model_{i}"]] == pytest.approx(
            [c["lr"] * 0.5**3, c["lr"] * 0.5**6]
        )
        session = _read_hparams(tmp_path / "tb" / f"model_{i}")
        assert session["hparams"] == {"seed": i, "lr": pytest.approx(c["lr"])}
        assert session["metrics"]["hparam/loss"] == pytest.approx(res[i].value, rel=1e-6)
        assert session["metrics"]["hparam/best_loss"] == pytest.approx(res[i].best_value, rel=1e-6)


def test_log_batch_metrics_adds_each_models_lr(tmp_path):
    import modelbatch

    batch = _batch_with_metrics([5, 7])
    opt = modelbatch.optim.SGD(batch, lr=[0.1, 0.2])
    logger = JSONLLogger(tmp_path / "m.jsonl")
    log_batch_metrics(logger, batch, 0, optimizer=opt)
    logger.close()
    lines = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [(r["model_id"], r["lr"]) for r in lines] == [(5, 0.1), (7, 0.2)]
