"""Ray Tune: K x N configs as K Tune trials of N models, on a local 2-node Ray cluster (CPU)."""

from __future__ import annotations

import json
import math
import os
import runpy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from modelbatch.integrations.ray_tune import make_bundles, trial_resources, tune_bundles
from modelbatch.integrations.sweeping import sweep
from tests.integrations._toy import FailOnce, make_loader, make_mlp64

ray = pytest.importorskip("ray")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
REPO = str(Path(__file__).resolve().parents[2])


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster of two 1-CPU nodes (``ray.cluster_utils.Cluster``): Tune places
    the two bundles on different nodes, as on a real multi-node cluster."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    # Workers import this worktree's modelbatch and tests.integrations._toy by reference.
    path = os.pathsep.join([os.path.join(REPO, "src"), REPO])
    ray.init(address=cluster.address, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"}})
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


KWARGS = {"loss_fn": F.cross_entropy, "epochs": 2, "optimizer_cls": torch.optim.SGD}


def _results_json(folder: Path) -> list[dict]:
    rows = []
    for path in folder.rglob("result.json"):
        rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows


def test_bundles_group_by_structure():
    configs = [{"hidden": h} for h in (4, 8, 4, 4, 8, 4)]
    assert make_bundles(configs, make_mlp64, 3) == [[0, 2, 3], [5], [1, 4]]
    with pytest.raises(ValueError, match="at least 1"):
        make_bundles(configs, make_mlp64, 0)


def test_rows_per_config_failures_stay_alone_and_tuner_restore_resumes(ray_cluster, tmp_path):
    """One sweep, two bundles on two nodes: config 1 is refused (lr=-1) and config 4
    diverges, each alone; the first bundle process to reach its 7th loss call (epoch 2) dies,
    which fails that bundle's configs only. ``resume=True`` (``Tuner.restore``) resumes
    the failed trial from its checkpoint and every config ends as if trained alone."""
    loader = make_loader(dtype=torch.float64)
    lrs = [0.02, -1.0, 0.1, 0.2, math.inf, 0.3]
    configs = [{"seed": i, "lr": lr, "momentum": 0.5} for i, lr in enumerate(lrs)]
    kwargs = {**KWARGS, "epochs": 3, "loss_fn": FailOnce(str(tmp_path / "died"), at=7)}
    first = tune_bundles(make_mlp64, configs, models_per_trial=3, storage_path=tmp_path,
                         name="sweep", train_loader=loader, **kwargs)
    assert list(first) == list(range(6))  # K=2 trials x N=3 configs, one row each
    rows = first.records()
    assert [r["lr"] for r in rows] == lrs and all(r["momentum"] == 0.5 for r in rows)
    assert first[1].status == "failed" and "lr" in first[1].error.lower()
    assert first[4].status == "diverged" and first[4].epochs == 1
    crashed = [i for i in range(6) if first[i].error and "worker lost" in first[i].error]
    assert crashed in ([0, 2], [3, 5]), crashed
    others = [i for i in range(6) if i not in crashed and i not in (1, 4)]
    assert all(first[i].status == "completed" for i in others)
    # Tune's own records: each config's hyper-parameters, per-model metrics, two nodes.
    reported = _results_json(tmp_path / "sweep")
    assert {r["config"]["trial"].get("model_0/lr") for r in reported} <= {0.02, None}
    assert any("loss/model_3" in r and "lr/model_3" in r for r in reported)
    assert len({r["node_id"] for r in reported}) == 2

    second = tune_bundles(make_mlp64, configs, models_per_trial=3, storage_path=tmp_path,
                          name="sweep", train_loader=loader, resume=True, **kwargs)
    good = [0, 2, 3, 5]
    direct = sweep([configs[i] for i in good], make_mlp64, train_loader=loader,
                   progress=False, **{**KWARGS, "epochs": 3})
    for k, i in enumerate(good):
        assert second[i].status == "completed", (i, second[i].error)
        assert second[i].history == pytest.approx(direct[k].history, rel=1e-9)
    assert second[1].status == "failed" and second[4].status == "diverged"


def test_missing_ray_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.setitem(sys.modules, "ray.tune", None)
    with pytest.raises(ImportError, match=r"modelbatch\[ray\]"):
        tune_bundles(make_mlp64, [{}], models_per_trial=1, train_loader=[], loss_fn=F.mse_loss,
                     epochs=1)


def test_ray_tune_example_runs(ray_cluster, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(sys, "argv", ["ray_tune_example.py", str(tmp_path)])
    runpy.run_path(str(EXAMPLES / "ray_tune_example.py"), run_name="__main__")
    assert "best: config" in capsys.readouterr().out


def test_resources_use_tune_names_and_unknown_keys_are_refused():
    # Tune reads any other key as a custom resource no node has, and waits for it forever.
    assert trial_resources(None) == {"cpu": 1}
    assert trial_resources({"num_cpus": 4, "num_gpus": 1}) == {"cpu": 4, "gpu": 1}
    assert trial_resources({"custom_resources": {"tpu": 1}}) == {"custom_resources": {"tpu": 1}}
    with pytest.raises(ValueError, match="unknown key 'num_gpu'"):
        tune_bundles(make_mlp64, [{}], models_per_trial=1, train_loader=[], loss_fn=F.mse_loss,
                     epochs=1, resources_per_trial={"num_gpu": 1})  # fmt: skip
    with pytest.raises(ValueError, match="sets 'gpu' twice"):
        trial_resources({"gpu": 1, "num_gpus": 1})


def test_a_successive_halving_pruner_in_sweep_kwargs_takes_the_bundles_mode():
    """``sweep_kwargs={"pruner": SuccessiveHalving(...)}`` without a mode follows the
    metric's mode (it must not prune the best accuracies); an opposite mode is refused."""
    from modelbatch.integrations.ray_tune import _sweep_opts
    from modelbatch.integrations.sweeping import SuccessiveHalving

    common = dict(make_model=None, train_loader=None, loss_fn=None, epochs=2, val_loader=None,
                  metric="accuracy", mode="max", eval_fn=None, optimizer_cls=torch.optim.SGD,
                  device=None, folder=None, n=2)
    opts = _sweep_opts(**common, extra={"pruner": SuccessiveHalving((1,))})
    assert opts["pruner"].mode == "max"
    with pytest.raises(ValueError, match="the sweep's mode is 'max'"):
        _sweep_opts(**common, extra={"pruner": SuccessiveHalving((1,), mode="min")})
