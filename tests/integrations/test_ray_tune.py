"""Ray Tune: K x N configs as K Tune trials of N models, on a local Ray cluster (CPU)."""

from __future__ import annotations

import math
import runpy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from modelbatch.integrations.ray_tune import make_bundles, trial_resources, tune_bundles
from modelbatch.integrations.sweeping import sweep
from tests.integrations._toy import make_loader, make_mlp64

ray = pytest.importorskip("ray")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
REPO = str(Path(__file__).resolve().parents[2])


@pytest.fixture(scope="module")
def ray_cluster():
    """One local 2-CPU Ray cluster for the module (startup takes seconds)."""
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        # Workers import make_mlp64 from tests.integrations._toy by reference.
        runtime_env={"env_vars": {"PYTHONPATH": REPO}},
    )
    yield
    ray.shutdown()


def test_bundles_group_by_structure():
    configs = [{"hidden": h} for h in (4, 8, 4, 4, 8, 4)]
    assert make_bundles(configs, make_mlp64, 3) == [[0, 2, 3], [5], [1, 4]]
    with pytest.raises(ValueError, match="at least 1"):
        make_bundles(configs, make_mlp64, 0)


def test_each_config_matches_training_it_in_one_modelbatch(ray_cluster, tmp_path):
    loader = make_loader(dtype=torch.float64)
    lrs = [0.02, 0.05, 0.1, 0.2, math.inf, 0.3]  # config 4 diverges
    configs = [{"seed": i, "lr": lr, "momentum": 0.5} for i, lr in enumerate(lrs)]
    kwargs = {
        "train_loader": loader,
        "loss_fn": F.cross_entropy,
        "epochs": 2,
        "optimizer_cls": torch.optim.SGD,
    }
    results = tune_bundles(
        make_mlp64, configs, models_per_trial=3, storage_path=tmp_path, name="bundles", **kwargs
    )
    assert list(results) == list(range(6))  # K=2 trials x N=3 configs, merged back
    direct = sweep(configs, make_mlp64, **kwargs)
    for i, res in results.items():
        assert res.config == configs[i]
        assert res.status == direct[i].status
        if i == 4:
            assert res.status == "diverged"
            assert res.epochs == 1
            continue
        assert res.status == "completed"
        assert res.history == pytest.approx(direct[i].history, rel=1e-9)
        assert res.train_loss == pytest.approx(direct[i].train_loss, rel=1e-9)


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
