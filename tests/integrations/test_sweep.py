"""The sweep engine: configs trained as ModelBatches equal the same configs trained alone."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from modelbatch.integrations.sweep import (
    ConfigResult,
    group_by_structure,
    optimizer_hparams,
    sweep,
    train_bundle,
)
from tests.helpers import assert_close_models, train_alone
from tests.integrations._toy import make_loader, make_mlp, make_mlp64

F64 = torch.float64


def _alone(configs, epochs, loader, make_model=make_mlp64):
    """Each config trained on its own with torch.optim.SGD (lr, momentum from the config)."""
    data = [batch for _ in range(epochs) for batch in loader]
    models = [make_model(c) for c in configs]
    return train_alone(
        models,
        lambda i, m: torch.optim.SGD(
            m.parameters(), lr=configs[i]["lr"], momentum=configs[i].get("momentum", 0.0)
        ),
        data,
        F.cross_entropy,
    )


def _full_loss(model, loader) -> float:
    with torch.no_grad():
        losses = [F.cross_entropy(model(x), y) * len(y) for x, y in loader]
    return float(sum(losses) / sum(len(y) for _, y in loader))


def test_sweep_equals_training_each_config_alone():
    loader = make_loader(dtype=F64)
    configs = [
        {"seed": 0, "hidden": 8, "lr": 0.1, "momentum": 0.9},
        {"seed": 1, "hidden": 4, "lr": 0.05},
        {"seed": 2, "hidden": 8, "lr": 0.3, "momentum": 0.5},
        {"seed": 3, "hidden": 8, "lr": 0.01, "momentum": 0.0},
        {"seed": 4, "hidden": 4, "lr": 0.2, "momentum": 0.8},
    ]
    results = sweep(
        configs,
        make_mlp64,
        train_loader=loader,
        loss_fn=F.cross_entropy,
        epochs=2,
        models_per_batch=2,  # hidden=8: batches {0, 2} and {3}; hidden=4: {1, 4}
        optimizer_cls=torch.optim.SGD,
        keep_models=True,
    )
    assert list(results) == [0, 1, 2, 3, 4]
    alone = _alone(configs, 2, loader)
    assert_close_models([results[i].model for i in range(5)], alone, F64)
    for i, res in results.items():
        assert res.status == "completed"
        assert res.config == configs[i]
        assert res.epochs == 2
        assert res.value == pytest.approx(_full_loss(alone[i], loader), rel=1e-10)
        assert res.history[-1] == res.value


def test_a_diverging_config_is_dropped_and_does_not_disturb_the_others():
    loader = make_loader(dtype=F64)
    configs = [{"seed": s, "lr": lr} for s, lr in enumerate([0.1, math.inf, 0.05])]
    results = sweep(
        configs,
        make_mlp64,
        train_loader=loader,
        loss_fn=F.cross_entropy,
        epochs=3,
        optimizer_cls=torch.optim.SGD,
        keep_models=True,
        key="seed",
    )
    assert results[1].status == "diverged"
    assert results[1].epochs == 1  # dropped from the batch after the first epoch
    assert not math.isfinite(results[1].train_loss[0])
    assert [results[k].status for k in (0, 2)] == ["completed", "completed"]
    good = [configs[0], configs[2]]
    assert_close_models([results[0].model, results[2].model], _alone(good, 3, loader), F64)


def test_train_bundle_stops_models_early_and_shrinks_the_batch():
    loader = make_loader(dtype=F64)
    configs = [{"seed": s, "lr": 0.1} for s in range(3)]
    seen: list[list[int]] = []

    class RowCounter:  # a real BatchLogger recording which models were still training
        def log(self, metrics, step):
            seen.append([row["model_id"] for row in metrics])

        def close(self):
            pass

    results = train_bundle(
        [make_mlp64(c) for c in configs],
        [{"lr": 0.1}] * 3,
        model_ids=["a", "b", "c"],
        configs=configs,
        train_loader=loader,
        loss_fn=F.cross_entropy,
        epochs=3,
        metric="accuracy",
        optimizer_cls=torch.optim.SGD,
        should_stop=lambda epoch, values: ["b"] if epoch == 0 else [],
        logger=RowCounter(),
        keep_models=True,
    )
    assert seen == [["a", "b", "c"], ["a", "c"], ["a", "c"]]
    assert results["b"].status == "stopped"
    assert results["b"].epochs == 1
    assert_close_models([results["b"].model], _alone([configs[1]], 1, loader), F64)
    assert_close_models(
        [results["a"].model, results["c"].model], _alone([configs[0], configs[2]], 3, loader), F64
    )
    assert all(0.0 <= v <= 1.0 for v in results["a"].history)


def test_hyperparameters_come_from_the_config_with_optimizer_defaults():
    assert optimizer_hparams({"hidden": 3, "lr": 0.1, "betas": (0.8, 0.9)}, torch.optim.Adam) == {
        "lr": 0.1,
        "betas": (0.8, 0.9),
    }
    loader = make_loader()
    # Model 1 sets no weight_decay: it gets AdamW's default (0.01), like AdamW alone.
    configs = [{"seed": 0, "lr": 0.01, "weight_decay": 0.0}, {"seed": 1, "lr": 0.02}]
    results = sweep(
        configs,
        make_mlp64,
        train_loader=make_loader(dtype=F64),
        loss_fn=F.cross_entropy,
        epochs=1,
        optimizer_cls=torch.optim.AdamW,
        keep_models=True,
    )
    data = list(make_loader(dtype=F64))
    hps = [optimizer_hparams(c, torch.optim.AdamW) for c in configs]
    alone = train_alone(
        [make_mlp64(c) for c in configs],
        lambda i, m: torch.optim.AdamW(m.parameters(), **hps[i]),
        data,
        F.cross_entropy,
    )
    assert_close_models([results[0].model, results[1].model], alone, F64)
    with pytest.raises(ValueError, match=r"model 1 \(id 1\): SGD has no hyper-parameter 'betas'"):
        train_bundle(
            [make_mlp(c) for c in configs],
            [{"lr": 0.1}, {"lr": 0.1, "betas": (0.9, 0.9)}],
            train_loader=loader,
            loss_fn=F.cross_entropy,
            epochs=1,
            optimizer_cls=torch.optim.SGD,
        )


def test_bad_arguments_are_named():
    loader = make_loader()
    configs = [{"seed": 0, "lr": 0.1}, {"seed": 1, "lr": 0.1}]
    kwargs = {"train_loader": loader, "loss_fn": F.cross_entropy, "epochs": 1}
    with pytest.raises(ValueError, match="at least one config"):
        sweep([], make_mlp, **kwargs)
    with pytest.raises(ValueError, match="have no 'name'"):
        sweep(configs, make_mlp, key="name", **kwargs)
    with pytest.raises(ValueError, match="metric must be 'loss' or 'accuracy'"):
        sweep(configs, make_mlp, metric="f1", **kwargs)
    with pytest.raises(ValueError, match=r"one value per model, shape \[2\], got \(3,\)"):
        sweep(configs, make_mlp, eval_fn=lambda batch: torch.zeros(3), **kwargs)
    with pytest.raises(ValueError, match="epochs must be at least 1"):
        sweep(configs, make_mlp, train_loader=loader, loss_fn=F.cross_entropy, epochs=0)


def test_group_by_structure_and_result_round_trip():
    models = [make_mlp({"hidden": h}) for h in (4, 8, 4, 4, 8)]
    assert group_by_structure(models) == [[0, 2, 3], [1, 4]]
    assert group_by_structure(models, max_size=2) == [[0, 2], [3], [1, 4]]
    res = ConfigResult({"lr": 0.1}, 0.5, [0.7, 0.5], [1.0, 0.6], "completed")
    assert ConfigResult.from_dict(res.to_dict()) == res


def test_integration_modules_import_no_optional_library():
    code = (
        "import sys, modelbatch.integrations.logging, modelbatch.integrations.optuna, "
        "modelbatch.integrations.ray_tune, modelbatch.integrations.sweep\n"
        "print(sorted(m for m in ('optuna', 'ray', 'wandb', 'tensorboard', "
        "'torch.utils.tensorboard') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
