"""The recurrent benchmark workloads: shapes, FLOP count and one run of the CLI."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from modelbatch.bench.workloads import (
    ARCHS,
    count_flops_per_image,
    estimate_activation_bytes_per_image,
    get_workload,
    make_batches,
)
from modelbatch.cli import main as cli_main


@pytest.mark.parametrize("arch", ["lstm", "gru"])
def test_recurrent_workload_shapes_and_flops(arch: str) -> None:
    wl = get_workload(arch, 4)
    assert arch in ARCHS and wl.input_shape == (32, 96)
    (x, y), *_ = make_batches(wl, 1, torch.device("cpu"))
    assert x.shape == (4, 32, 96) and y.shape == (4,)
    model = wl.make_model()
    assert model(x).shape == (4, 10)
    gates = 4 if arch == "lstm" else 3
    # Each weight matrix once per time step: W_ih fed by the data (forward + weight
    # gradient), W_hh and the classifier (forward + weight and input gradients); 2 FLOPs
    # per multiply-add.
    macs = 2 * 32 * gates * 128 * 96 + 3 * 32 * gates * 128 * 128 + 3 * 128 * 10
    assert count_flops_per_image(model, wl.input_shape) == 2.0 * macs
    assert estimate_activation_bytes_per_image(model, wl.input_shape, 4) > 0


def test_bench_lstm_smoke(tmp_path: Path) -> None:
    args = "bench --arch lstm --models 2 --batch-size 2 --steps 1 --repeats 1 --warmup 1"
    args += " --no-plots --methods sequential eager --device cpu --out"
    code = cli_main([*args.split(), str(tmp_path)])
    assert code == 0
    with open(tmp_path / "bench-lstm.csv") as f:
        rows = {(r["method"], r["n_models"]): r for r in csv.DictReader(f)}
    assert set(rows) == {("sequential", "1"), ("eager", "2")}
    for r in rows.values():
        assert r["status"] == "ok", r["note"]
        assert float(r["model_images_per_s"]) > 0
