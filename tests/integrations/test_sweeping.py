"""The sweep engine: configs trained as ModelBatches equal the same configs trained alone."""

from __future__ import annotations

import csv
import math
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modelbatch
from modelbatch.integrations.sweeping import (
    ConfigResult,
    SuccessiveHalving,
    group_by_structure,
    optimizer_hparams,
    sweep,
    train_bundle,
)
from tests.helpers import assert_close_models, train_alone
from tests.integrations._toy import make_loader, make_mlp, make_mlp64

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

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
        "modelbatch.integrations.ray_tune, modelbatch.integrations.sweeping\n"
        "print(sorted(m for m in ('optuna', 'ray', 'wandb', 'tensorboard', "
        "'torch.utils.tensorboard') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------------- the sweep contract
def _alone_adam_sched(configs, epochs_of, loader, gamma=0.5):
    """Each config alone: torch.optim.Adam (lr, weight_decay from the config) and its own
    StepLR(step_size=2, gamma), for ``epochs_of[i]`` epochs over ``loader``."""
    out = []
    for i, c in enumerate(configs):
        data = [b for _ in range(epochs_of[i]) for b in loader]
        hp = {k: c[k] for k in ("lr", "weight_decay") if k in c}
        out.extend(
            train_alone(
                [make_mlp64(c)],
                lambda _, m, hp=hp: torch.optim.Adam(m.parameters(), **hp),
                data,
                F.cross_entropy,
                make_scheduler=lambda _, o: torch.optim.lr_scheduler.StepLR(o, 2, gamma),
            )
        )
    return out


def test_refilled_slots_train_exactly_as_each_config_alone():
    """M=6 configs, N=2 slots: configs 0 and 3 are pruned early, their slots are refilled
    mid-sweep; every model (fresh weights, Adam state, step count, LR schedule) equals the
    same config trained alone for the epochs it ran (float64)."""
    loader = make_loader(dtype=F64)
    configs = [{"seed": s, "lr": 0.01 * (s + 1), "weight_decay": 0.01 * (s % 2)} for s in range(6)]
    stop_at = {0: 0, 3: 1}  # key -> epoch after which the pruner stops it
    seen_in_flight = []

    class Rows:
        def log(self, rows, step):
            seen_in_flight.append(rows[0]["model_id"])

    results = sweep(
        configs,
        make_mlp64,
        train_loader=loader,
        loss_fn=F.cross_entropy,
        epochs=3,
        models_per_batch=2,
        scheduler_fn=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 2, 0.5),
        pruner=lambda key, epoch, res: stop_at.get(key) == epoch,
        keep_models=True,
        logger=Rows(),
        progress=False,
    )
    epochs_of = [results[i].epochs for i in range(6)]
    assert epochs_of == [1, 3, 3, 2, 3, 3]
    assert [results[i].status for i in range(6)] == [
        "pruned", "completed", "completed", "pruned", "completed", "completed"
    ]
    alone = _alone_adam_sched(configs, epochs_of, loader)
    assert_close_models([results[i].model for i in range(6)], alone, F64)
    # Round 1 trained {0, 1}; config 2 took 0's slot for round 2: never more than N at once.
    assert sorted(seen_in_flight[:2]) == [0, 1] and sorted(seen_in_flight[2:4]) == [1, 2]


@pytest.mark.parametrize("optimizer_cls", [torch.optim.SGD, torch.optim.RMSprop])
def test_refill_resets_the_optimizer_state_for_vectorised_and_generic_optimizers(optimizer_cls):
    import warnings

    loader = make_loader(dtype=F64)
    configs = [{"seed": s, "lr": 0.05, "momentum": 0.9} for s in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # RMSprop: the generic per-model path warns once
        results = sweep(
            configs, make_mlp64, train_loader=loader, loss_fn=F.cross_entropy, epochs=2,
            models_per_batch=2, optimizer_cls=optimizer_cls, keep_models=True, progress=False,
            pruner=lambda key, epoch, res: key == 0 and epoch == 0,
        )
    epochs_of = [results[i].epochs for i in range(3)]
    assert epochs_of == [1, 2, 2]
    alone = []
    for i, c in enumerate(configs):
        data = [b for _ in range(epochs_of[i]) for b in loader]
        alone += train_alone(
            [make_mlp64(c)], lambda _, m: optimizer_cls(m.parameters(), lr=0.05, momentum=0.9),
            data, F.cross_entropy,
        )
    assert_close_models([results[i].model for i in range(3)], alone, F64)


def test_unknown_config_keys_are_an_error_naming_the_valid_ones():
    kwargs = {"train_loader": make_loader(), "loss_fn": F.cross_entropy, "epochs": 1}
    with pytest.raises(ValueError, match=r"config 1 has key\(s\) \['weight_decy'\].*"
                       r"did you mean 'weight_decay'"):
        sweep([{"lr": 0.1}, {"lr": 0.1, "weight_decy": 0.1}], make_mlp, **kwargs)
    with pytest.raises(ValueError, match=r"\['momentum'\] that nothing uses: Adam takes \[.*'lr'"):
        sweep([{"seed": 0, "lr": 0.1, "momentum": 0.9}], make_mlp, **kwargs)
    # Keys make_model reads, the result key and declared extra keys are fine.
    res = sweep([{"seed": 0, "hidden": 4, "name": "a", "note": "x"}], make_mlp, key="name",
                extra_keys=["note"], progress=False, **kwargs)
    assert list(res) == ["a"]


def test_a_bad_config_fails_alone():
    loader = make_loader()

    def build(c):
        if c["seed"] == 1:
            raise RuntimeError("no such architecture")
        return make_mlp(c)

    res = sweep(
        [{"seed": 0, "lr": 0.1}, {"seed": 1, "lr": 0.1}, {"seed": 2, "lr": -1.0},
         {"seed": 3, "lr": 0.1}],
        build, train_loader=loader, loss_fn=F.cross_entropy, epochs=2, models_per_batch=2,
        progress=False,
    )
    assert [res[i].status for i in range(4)] == ["completed", "failed", "failed", "completed"]
    assert "no such architecture" in res[1].error
    assert "lr" in res[2].error.lower()


def test_progress_bar_plain_line_without_tqdm_and_quiet(monkeypatch, capsys):
    kwargs = {"train_loader": make_loader(), "loss_fn": F.cross_entropy, "epochs": 1}
    configs = [{"seed": s, "lr": 0.1} for s in range(3)]
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # as if tqdm were not installed
    sweep(configs, make_mlp, **kwargs)
    err = capsys.readouterr().err
    assert "sweep: 3/3 configs done, best loss=" in err
    sweep(configs, make_mlp, progress=False, **kwargs)
    assert capsys.readouterr().err == ""


def test_results_table_csv_dataframe_plot_and_best_models(tmp_path):
    import csv

    pytest.importorskip("pandas")
    pytest.importorskip("matplotlib")
    loader = make_loader()
    configs = [{"seed": s, "hidden": 8, "lr": lr} for s in range(2) for lr in (1e-3, 3e-2, 3.0)]
    res = sweep(configs, make_mlp, train_loader=loader, val_loader=make_loader(seed=1),
                loss_fn=F.cross_entropy, epochs=3, models_per_batch=4, metric="accuracy",
                folder=tmp_path, top_k=2, progress=False)
    with (tmp_path / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6
    assert set(rows[0]) >= {"key", "seed", "hidden", "lr", "val_accuracy", "best_val_accuracy",
                            "best_epoch", "status", "epochs", "checkpoint"}
    assert [float(r["lr"]) for r in rows] == [c["lr"] for c in configs]
    df = res.to_pandas()
    assert list(df["status"]) == [r.status for r in res.values()]
    ranked = res.ranked()
    assert res.best_keys == ranked[:2]
    assert res[ranked[0]].best_value == max(r.best_value for r in res.values())
    # The best models are plain modules with their best weights, saved under best/<rank>.
    for rank, (k, m) in enumerate(zip(res.best_keys, res.best_models, strict=True)):
        assert type(m) is torch.nn.Sequential
        acc = modelbatch.evaluate(modelbatch.ModelBatch([m]), make_loader(seed=1))["accuracy"]
        assert float(acc[0]) == pytest.approx(res[k].best_value)
        saved = modelbatch.load_model(tmp_path / "best" / str(rank), k, make_mlp({}))
        assert_close_models([saved], [m], torch.float32)
    fig = res.plot(tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").stat().st_size > 1000
    assert [ax.get_xlabel() for ax in fig.axes] == ["seed", "lr"]


def test_early_stopping_keeps_each_models_best_weights(tmp_path):
    """A config early-stopped (its weights gone from the batch) still gives back its best
    weights by key, from memory and from the folder."""
    loader = make_loader(dtype=F64)
    configs = [{"seed": s, "lr": lr} for s, lr in enumerate([0.05, 5.0, 0.02])]
    for folder in (None, tmp_path):
        res = sweep(configs, make_mlp64, train_loader=loader, loss_fn=F.cross_entropy,
                    epochs=8, patience=2, optimizer_cls=torch.optim.SGD, folder=folder,
                    keep_models=True, progress=False, models_per_batch=2)
        stopped = [k for k, r in res.items() if r.status == "early_stopped"]
        assert stopped, [r.history for r in res.values()]
        for k in res:
            r = res[k]
            assert r.best_value == min(r.history)
            model = res.best_model(k)
            assert _full_loss(model, loader) == pytest.approx(r.best_value, rel=1e-10)
            if folder is not None:
                assert r.checkpoint == str(tmp_path / "models" / str(k))


def test_successive_halving_prunes_and_refill_keeps_n_in_flight():
    loader = make_loader()
    configs = [{"seed": s, "lr": lr} for s in range(3) for lr in (1e-3, 1e-2, 1e-1, 1.0)]
    res = sweep(configs, make_mlp, train_loader=loader, loss_fn=F.cross_entropy, epochs=4,
                models_per_batch=3, pruner=SuccessiveHalving((1, 2), mode="min"),
                progress=False)
    statuses = [r.status for r in res.values()]
    assert statuses.count("pruned") >= 6 and "completed" in statuses
    assert all(r.epochs in (1, 2, 4) for r in res.values())


def test_from_integrations_import_sweep_is_the_function():
    from modelbatch.integrations import optimize_batched
    from modelbatch.integrations import sweep as sweep_fn

    assert callable(sweep_fn) and sweep_fn is sweep
    assert callable(optimize_batched)


# ---------------------------------------------------------------------- kill and resume
_KILL_SCRIPT = r"""
import os, signal, sys
import torch, torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from modelbatch.integrations import sweep, SuccessiveHalving

torch.manual_seed(123)
kill_at = int(sys.argv[2])
calls = [0]
g = torch.Generator().manual_seed(0)
x = torch.randn(64, 4, generator=g, dtype=torch.float64)
y = (x @ torch.randn(4, 3, generator=g, dtype=torch.float64)).argmax(1)
loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)  # global RNG

def make_model(config):  # unseeded: draws from the global RNG
    return nn.Sequential(nn.Linear(4, config["hidden"]), nn.Tanh(),
                         nn.Linear(config["hidden"], 3)).double()

def loss_fn(out, target):
    calls[0] += 1
    if calls[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return F.cross_entropy(out, target)

configs = [{"hidden": h, "lr": lr} for h in (4, 6) for lr in (0.003, 0.03, 0.3)]
res = sweep(configs, make_model, train_loader=loader, loss_fn=loss_fn, epochs=4,
            models_per_batch=2, pruner=SuccessiveHalving((1, 2)), patience=2,
            scheduler_fn=lambda o: torch.optim.lr_scheduler.StepLR(o, 3, 0.5),
            folder=sys.argv[1], progress=False, top_k=2)
"""


def _run_child(script, folder, kill_at):
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(script), str(folder), str(kill_at)],
                          env=env, capture_output=True, text=True, timeout=120)


def _run_here(script, folder, monkeypatch):
    import runpy

    monkeypatch.setattr(sys, "argv", [str(script), str(folder), "0"])
    runpy.run_path(str(script), run_name="__main__")
    return (folder / "results.csv").read_text().replace(str(folder), "")


def test_a_sweep_killed_at_any_moment_resumes_to_the_same_results(tmp_path, monkeypatch):
    """SIGKILL in a child process, twice in a row (mid-epoch, then during the validation of
    the resumed run's first round); the resumed sweep ends with the uninterrupted sweep's
    table and best models, byte for byte (shuffled data and unseeded models: the RNG
    resumes too)."""
    import signal

    script = tmp_path / "run.py"
    script.write_text(_KILL_SCRIPT)
    expected = _run_here(script, tmp_path / "ref", monkeypatch)
    for n, kills in enumerate([(20, 30)]):
        folder = tmp_path / f"run{n}"
        for k in kills:
            out = _run_child(script, folder, k)
            assert out.returncode == -signal.SIGKILL, out.stderr
        assert _run_here(script, folder, monkeypatch) == expected, f"kill points {kills}"
        for rank in range(2):
            a = tmp_path / "ref" / "best" / str(rank)
            b = folder / "best" / str(rank)
            ma = next(a.glob("v*/models/*/model.safetensors")).read_bytes()
            mb = next(b.glob("v*/models/*/model.safetensors")).read_bytes()
            assert ma == mb


def test_user_callbacks_run_and_a_model_they_drop_is_recorded():
    seen = []

    class CountSteps(modelbatch.Callback):
        def on_step_end(self, pack):
            seen.append(len(pack.batch))

    configs = [{"seed": s, "lr": lr} for s, lr in enumerate([0.1, 0.0, 0.05])]  # 1 is stuck
    res = sweep(
        configs, make_mlp, train_loader=make_loader(), loss_fn=F.cross_entropy, epochs=4,
        optimizer_cls=torch.optim.SGD, progress=False,
        callbacks=lambda: [CountSteps(), modelbatch.EarlyStopping("loss", patience=1,
                                                                  action="drop")],
    )
    assert seen[0] == 3 and seen[-1] == 2  # the stuck model left the batch
    assert [r.status for r in res.values()] == ["completed", "stopped", "completed"]
    assert res[1].epochs == 2 and res[1].best_value == res[1].history[0]
    assert res.best_model(1) is not None


def test_a_freed_slot_only_takes_a_config_with_the_same_per_model_settings():
    """Dropout rates may differ inside a batch, but are fixed per slot once it is built: the
    slot config 0 (p=0.1) frees goes to config 3 (p=0.1), not config 2 (p=0.2), which
    starts in the next batch."""
    from torch import nn

    def build(c):
        torch.manual_seed(c["seed"])
        return nn.Sequential(nn.Linear(4, 8), nn.Dropout(c["p"]), nn.Linear(8, 3))

    order = []

    class Rows:
        def log(self, rows, step):
            order.append((rows[0]["model_id"], step))

    configs = [{"seed": s, "p": p, "lr": 0.01} for s, p in enumerate([0.1, 0.2, 0.2, 0.1])]
    res = sweep(configs, build, train_loader=make_loader(), loss_fn=F.cross_entropy, epochs=2,
                models_per_batch=2, pruner=lambda k, e, r: k == 0, logger=Rows(),
                progress=False)
    assert [r.status for r in res.values()] == ["pruned", "completed", "completed", "completed"]
    assert order.index((3, 0)) < order.index((2, 0))  # 3 refilled 0's slot; 2 waited


# ----------------------------------------------------------------- per-model settings, seeded
def _dropout_bn_mlp(config):
    """Unseeded on purpose: ``sweep(seeds=...)`` seeds the initialisation."""
    return nn.Sequential(
        nn.Linear(4, 8),
        nn.Tanh(),  # BatchNorm after the bias: Adam would amplify the bias's ~0 gradient
        nn.BatchNorm1d(8, momentum=config.get("momentum", 0.1)),
        nn.Dropout(config.get("p", 0.5)),
        nn.Linear(8, 3),
    ).double()


def _seeded_alone(configs, seeds, epochs, loader):
    """Config k alone: built under its seed, seeded dropout, torch.optim.Adam."""
    models = [
        modelbatch.use_seeded_dropout(
            modelbatch.seeded_models(lambda c=c: _dropout_bn_mlp(c), [s])[0], s
        )
        for c, s in zip(configs, seeds, strict=True)
    ]
    data = [batch for _ in range(epochs) for batch in loader]
    return train_alone(
        models, lambda i, m: torch.optim.Adam(m.parameters(), lr=configs[i]["lr"]), data,
        F.cross_entropy,
    )


@pytest.mark.parametrize(
    "configs",
    [
        [{"p": p, "lr": lr} for p, lr in [(0.1, 0.01), (0.3, 0.02), (0.5, 0.01), (0.7, 0.03)]],
        [{"momentum": m, "lr": 0.02, "p": 0.2} for m in (0.05, 0.1, 0.3, 0.9)],
    ],
    ids=["dropout-rate", "batchnorm-momentum"],
)
def test_seeded_settings_sweep_is_one_batch_equal_to_each_config_alone(configs):
    loader = make_loader(dtype=F64)
    built: list[int] = []

    def callbacks():
        built.append(1)  # called once per ModelBatch the sweep builds
        return []

    results = sweep(
        configs, _dropout_bn_mlp, train_loader=loader, loss_fn=F.cross_entropy, epochs=2,
        keep_models=True, seeds=11, callbacks=callbacks, progress=False,
    )
    assert len(built) == 1  # one structure group, one batch of 4
    models = [results[k].model for k in range(len(configs))]
    seeds = modelbatch.derive_seeds(11, len(configs))
    alone = _seeded_alone(configs, seeds, 2, loader)
    # Every parameter and BatchNorm buffer (the batched models have no seed/counter).
    assert_close_models(models, alone, F64)
    for k, res in results.items():
        assert res.status == "completed"
        model = res.model
        assert model[3].p == configs[k].get("p", 0.5)
        assert model[2].momentum == configs[k].get("momentum", 0.1)
        assert res.value == pytest.approx(_full_loss(alone[k].eval(), loader), rel=1e-10)


def test_refilled_slot_takes_its_configs_seed():
    """Two slots, four configs: configs 2 and 3 refill the slots of 0 and 1 (same dropout
    rates), each with its own seed (fresh dropout counters); every config equals itself
    trained alone."""
    loader = make_loader(dtype=F64)
    configs = [{"p": p, "lr": lr} for p, lr in [(0.2, 0.01), (0.4, 0.02), (0.2, 0.03), (0.4, 0.05)]]
    seeds = [3, 1, 4, 15]
    built: list[int] = []
    results = sweep(
        configs, _dropout_bn_mlp, train_loader=loader, loss_fn=F.cross_entropy, epochs=2,
        models_per_batch=2, keep_models=True, seeds=seeds, progress=False,
        callbacks=lambda: built.append(1) or [],
    )
    assert len(built) == 1  # configs 2 and 3 came in by refill, not in a new batch
    alone = _seeded_alone(configs, seeds, 2, loader)
    assert [r.status for r in results.values()] == ["completed"] * 4
    assert_close_models([results[k].model for k in range(4)], alone, F64)


def test_sweep_seeds_are_checked():
    loader = make_loader(dtype=F64)
    with pytest.raises(ValueError, match="got 1 seeds for 2"):
        sweep([{"lr": 0.1}, {"lr": 0.2}], make_mlp64, train_loader=loader,
              loss_fn=F.cross_entropy, epochs=1, seeds=[1], progress=False)
    with pytest.raises(TypeError, match="seeds must be an int"):
        sweep([{"lr": 0.1}], make_mlp64, train_loader=loader, loss_fn=F.cross_entropy,
              epochs=1, seeds="1", progress=False)


def test_a_seeded_sweep_interrupted_after_a_refill_resumes_to_the_same_models(tmp_path):
    """Seeded dropout state (per-slot seeds and counters, a refilled slot's new seed) is
    part of what a sweep folder resumes: interrupted mid-epoch after a refill, then called
    again, the sweep ends with the uninterrupted sweep's models, bit for bit."""
    loader = make_loader(dtype=F64)
    configs = [{"p": p, "lr": lr} for p, lr in [(0.2, 0.01), (0.4, 0.02), (0.2, 0.03), (0.4, 0.05)]]
    calls = [0]
    stop_at = [0]

    def loss_fn(out, target):
        calls[0] += 1
        if calls[0] == stop_at[0]:
            raise KeyboardInterrupt  # a kill between two saved round boundaries
        return F.cross_entropy(out, target)

    kwargs = dict(train_loader=loader, loss_fn=loss_fn, epochs=2, models_per_batch=2,
                  keep_models=True, seeds=[3, 1, 4, 15], progress=False)
    expected = sweep(configs, _dropout_bn_mlp, **kwargs)
    total, calls[0] = calls[0], 0
    stop_at[0] = total * 3 // 4 + 1  # in the refilled configs' second epoch
    with pytest.raises(KeyboardInterrupt):
        sweep(configs, _dropout_bn_mlp, folder=tmp_path / "s", **kwargs)
    stop_at[0] = 0
    resumed = sweep(configs, _dropout_bn_mlp, folder=tmp_path / "s", **kwargs)
    for k in range(4):
        a, b = expected[k].model.state_dict(), resumed[k].model.state_dict()
        assert all(torch.equal(a[n], b[n]) for n in a), k


def test_digits_sweep_example_runs(tmp_path, monkeypatch, capsys):
    """The README's sweep: 24 configs (three of them dropout rates) in one call."""
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    folder = tmp_path / "digits"
    monkeypatch.setattr(sys, "argv", ["sweep_digits.py", str(folder)])
    ns = runpy.run_path(str(EXAMPLES / "sweep_digits.py"), run_name="__main__")
    rows = list(csv.DictReader((folder / "results.csv").read_text().splitlines()))
    assert len(rows) == 24 and {r["status"] for r in rows} == {"completed"}
    assert max(float(r["best_val_accuracy"]) for r in rows) > 0.9
    assert (folder / "sweep.png").stat().st_size > 0
    assert isinstance(ns["best"], nn.Sequential)
    assert capsys.readouterr().out.count("best_val_accuracy") == 5


def test_resuming_with_different_arguments_is_refused_naming_the_difference(tmp_path):
    """A sweep folder resumed with another config list (or epochs, metric, ...) is refused,
    and the error names what differs: which config, which entry, both values."""
    loader = make_loader(n=32)
    configs = [{"lr": 0.1}, {"lr": 0.2}, {"lr": 0.3}]
    kwargs = dict(train_loader=loader, loss_fn=F.cross_entropy, epochs=1, progress=False,
                  folder=tmp_path / "s")
    sweep(configs, make_mlp, **kwargs)
    changed = [{"lr": 0.1}, {"lr": 0.25}, {"lr": 0.3}]
    with pytest.raises(ValueError, match=r"config 1: 'lr' was 0\.2, now 0\.25"):
        sweep(changed, make_mlp, **kwargs)
    with pytest.raises(ValueError, match=r"3 configs before, 2 now"):
        sweep(configs[:2], make_mlp, **kwargs)
    with pytest.raises(ValueError, match=r"epochs was 1, now 2"):
        sweep(configs, make_mlp, **{**kwargs, "epochs": 2})
    with pytest.raises(ValueError, match=r"grad_clip was None, now 1\.0"):
        sweep(configs, make_mlp, **{**kwargs, "grad_clip": 1.0})
    with pytest.raises(ValueError, match=r"objective was 'loss', now 'val_loss'"):
        sweep(configs, make_mlp, **{**kwargs, "val_loader": loader})
    again = sweep(configs, make_mlp, **kwargs)  # the same arguments still resume
    assert [r.status for r in again.values()] == ["completed"] * 3


def test_a_sweep_with_early_stopping_callbacks_resumes_their_patience(tmp_path):
    """User callbacks keep state across epochs (EarlyStopping's patience counters and best
    values, the pack's step count): a sweep folder saves it, so a sweep interrupted at any
    step and called again stops the same models at the same epochs."""
    loader = make_loader(n=64)
    configs = [{"lr": lr, "seed": s} for lr, s in [(3.0, 0), (1.0, 1), (5.0, 2), (0.5, 3)]]
    calls = [0]
    stop_at = [0]

    def loss_fn(out, target):
        calls[0] += 1
        if calls[0] == stop_at[0]:
            raise KeyboardInterrupt
        return F.cross_entropy(out, target)

    kwargs = dict(train_loader=loader, loss_fn=loss_fn, epochs=8, models_per_batch=2,
                  optimizer_cls=torch.optim.SGD, progress=False,
                  # "max" on a falling loss: improves once, then counts to its patience
                  callbacks=lambda: [modelbatch.EarlyStopping("loss", mode="max", patience=3)])
    expected = sweep(configs, make_mlp, **kwargs)
    want = [(r.status, r.history) for r in expected.values()]
    assert [len(h) for _, h in want] == [4, 4, 6, 4]
    total = calls[0]
    for k in range(3, total, 4):
        calls[0], stop_at[0] = 0, k
        with pytest.raises(KeyboardInterrupt):
            sweep(configs, make_mlp, folder=tmp_path / str(k), **kwargs)
        stop_at[0] = 0
        resumed = sweep(configs, make_mlp, folder=tmp_path / str(k), **kwargs)
        assert [(r.status, r.history) for r in resumed.values()] == want, k


def test_make_model_gets_a_real_dict_whose_reads_count():
    """``make_model`` receives a dict (``isinstance(config, dict)``, ``.copy()``,
    ``.setdefault``, ``|`` all work, as with the config the user wrote); keys read through
    a copy or a merge count as used, and a typo is still caught."""
    kwargs = {"train_loader": make_loader(n=32), "loss_fn": F.cross_entropy, "epochs": 1,
              "progress": False}

    def copying(config):
        assert isinstance(config, dict), type(config)
        c = config.copy()
        c.setdefault("hidden", 8)
        merged = {"act": "tanh"} | c
        return make_mlp({"seed": merged.get("seed", 0), "hidden": merged["hidden"]})

    res = sweep([{"lr": 0.1, "hidden": 4, "seed": 1}, {"lr": 0.1}], copying, **kwargs)
    assert [r.status for r in res.values()] == ["completed", "completed"]
    with pytest.raises(ValueError, match=r"\['hiden'\].*did you mean 'hidden'"):
        sweep([{"lr": 0.1, "hidden": 4, "hiden": 5}],
              lambda c: make_mlp({"hidden": c.copy()["hidden"]}), **kwargs)
    rows = sweep([{"lr": 0.1, "hidden": 4}],
                 lambda c: make_mlp({k: v for k, v in c.items()}), **kwargs)
    assert rows[0].status == "completed"
    configs = [{"lr": 0.1, "hidden": 4}]
    sweep(configs, copying, **kwargs)
    assert configs == [{"lr": 0.1, "hidden": 4}]  # make_model's edits stay its own


def test_successive_halving_follows_the_sweeps_mode_and_refuses_the_opposite():
    """``SuccessiveHalving`` without ``mode`` takes the sweep's (``"max"`` for accuracy), so
    it keeps the best configs; an explicit opposite mode is refused, naming both."""
    loader = make_loader()
    configs = [{"seed": s, "lr": lr} for s in range(2) for lr in (1e-4, 1e-1)]
    kwargs = dict(train_loader=loader, loss_fn=F.cross_entropy, epochs=2, metric="accuracy",
                  models_per_batch=2, progress=False)
    res = sweep(configs, make_mlp, pruner=SuccessiveHalving((1,)), **kwargs)
    first = {k: r.history[0] for k, r in res.items()}
    for k, r in res.items():  # the pruned ones are never better than a kept one at rung 1
        if r.status == "pruned":
            kept = [first[j] for j, q in res.items() if q.status == "completed"]
            assert first[k] <= min(kept), (first, [q.status for q in res.values()])
    with pytest.raises(ValueError, match=r"pruner's mode 'min'.*sweep's mode is 'max'"):
        sweep(configs, make_mlp, pruner=SuccessiveHalving((1,), mode="min"), **kwargs)
    with pytest.raises(ValueError, match="SuccessiveHalving needs mode="):
        SuccessiveHalving((1,))(0, 0, res)


class _PoisonAtEpochEnd(modelbatch.Callback):
    """Turns slot 0's weights NaN at the end of the first epoch (an update that blew up on
    the epoch's last step, after its loss was computed)."""

    def on_epoch_end(self, pack):
        if pack.epoch == 0:
            with torch.no_grad():
                for _, p in pack.batch.stacked_parameters():
                    p[0] = float("nan")


def test_non_finite_weights_under_a_finite_accuracy_count_as_diverged():
    """Accuracy stays finite for NaN outputs (argmax picks a class): a model whose weights
    went NaN is still diverged at once, and its NaN weights are never its best."""
    kwargs = dict(train_loader=make_loader(), loss_fn=F.cross_entropy, epochs=2,
                  metric="accuracy", progress=False, callbacks=lambda: [_PoisonAtEpochEnd()])
    res = sweep([{"lr": 0.01, "seed": 0}, {"lr": 0.01, "seed": 1}], make_mlp, **kwargs)
    assert res[0].status == "diverged" and res[0].epochs == 1
    assert math.isnan(res[0].best_value) and res.ranked() == [1]
    with pytest.raises(KeyError, match="never reached a finite"):
        res.best_weights(0)
    assert res[1].status == "completed"


def test_train_bundle_marks_a_model_with_non_finite_weights_diverged():
    """An objective can be finite for a model whose weights are NaN (accuracy, or a custom
    eval_fn): train_bundle still marks it diverged and drops it."""

    def eval_fn(batch):
        if "a" in batch.model_ids:
            with torch.no_grad():
                for _, p in batch.stacked_parameters():
                    p[batch.model_ids.index("a")] = float("nan")
        return torch.zeros(len(batch))

    results = train_bundle(
        [make_mlp({"seed": s}) for s in range(2)], [{"lr": 0.1}] * 2, model_ids=["a", "b"],
        train_loader=make_loader(), loss_fn=F.cross_entropy, epochs=2, metric="zero",
        eval_fn=eval_fn,
    )
    assert results["a"].status == "diverged" and results["a"].epochs == 1
    assert results["b"].status == "completed" and results["b"].epochs == 2


def _shuffled_loader():
    """A loader that reshuffles every epoch from its own generator (not torch's global RNG),
    built afresh as a restarted script would."""
    base = make_loader()
    return torch.utils.data.DataLoader(base.dataset, batch_size=32, shuffle=True,
                                       generator=torch.Generator().manual_seed(0))


def test_a_resumed_sweep_continues_a_seeded_loaders_shuffling(tmp_path):
    """The order a loader with its own generator shuffles in is part of the sweep state: a
    sweep interrupted after some epochs and restarted with a freshly built loader sees the
    epochs the uninterrupted sweep saw, and ends with the same models."""
    calls = [0]
    stop_at = [0]

    def loss_fn(out, target):
        calls[0] += 1
        if calls[0] == stop_at[0]:
            raise KeyboardInterrupt
        return F.cross_entropy(out, target)

    configs = [{"lr": 0.05, "seed": s} for s in range(3)]
    kwargs = dict(loss_fn=loss_fn, epochs=3, models_per_batch=2, keep_models=True,
                  progress=False)
    expected = sweep(configs, make_mlp, train_loader=_shuffled_loader(), **kwargs)
    total, calls[0] = calls[0], 0
    stop_at[0] = total // 2 + 1
    with pytest.raises(KeyboardInterrupt):
        sweep(configs, make_mlp, train_loader=_shuffled_loader(), folder=tmp_path / "s",
              **kwargs)
    stop_at[0] = 0
    resumed = sweep(configs, make_mlp, train_loader=_shuffled_loader(), folder=tmp_path / "s",
                    **kwargs)
    for k in range(3):
        a, b = expected[k].model.state_dict(), resumed[k].model.state_dict()
        assert all(torch.equal(a[n], b[n]) for n in a), k
        assert expected[k].history == resumed[k].history


def test_result_keys_map_to_distinct_checkpoint_ids(tmp_path):
    """``key=`` values become checkpoint model ids: booleans work, and two keys that would
    share a folder (``0.5`` and ``"0.5"``) are refused before training, naming them."""
    kwargs = dict(train_loader=make_loader(n=32), loss_fn=F.cross_entropy, epochs=1,
                  progress=False)
    res = sweep([{"lr": 0.1, "flag": True}, {"lr": 0.2, "flag": False}], make_mlp,
                key="flag", folder=tmp_path / "b", **kwargs)
    assert set(res) == {True, False}
    assert all(torch.equal(res.best_weights(k)["0.weight"], res.best_model(k)[0].weight)
               for k in res)
    with pytest.raises(ValueError, match=r"keys 0\.5 and '0\.5' would share"):
        sweep([{"lr": 0.1, "name": 0.5}, {"lr": 0.2, "name": "0.5"}], make_mlp, key="name",
              folder=tmp_path / "c", **kwargs)


def test_a_config_entry_named_like_a_result_column_keeps_its_own_column(tmp_path):
    """A hyper-parameter called ``epochs`` (read by ``scheduler_fn``) or ``status`` is not
    overwritten by the result columns of the same name: it appears as ``config.epochs``."""
    res = sweep(
        [{"lr": 0.1, "epochs": 10}], make_mlp, train_loader=make_loader(n=32),
        loss_fn=F.cross_entropy, epochs=1, progress=False, folder=tmp_path / "s",
        scheduler_fn=lambda opt, c: torch.optim.lr_scheduler.CosineAnnealingLR(opt, c["epochs"]),
    )
    row = res.records()[0]
    assert row["config.epochs"] == 10 and row["epochs"] == 1 and row["lr"] == 0.1
    with (tmp_path / "s" / "results.csv").open() as f:
        assert next(csv.DictReader(f))["config.epochs"] == "10"
