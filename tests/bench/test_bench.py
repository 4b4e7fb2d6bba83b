"""CPU smoke test of ``modelbatch bench`` (the files it writes, their columns) and of the
workloads and the CIFAR-10 loader. Timings are never asserted."""

from __future__ import annotations

import csv
import importlib.util
import os
import pickle
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from modelbatch.bench.report import COLUMNS, scaling_summary
from modelbatch.bench.workloads import (
    MLP,
    ResNet8,
    count_flops_per_image,
    load_cifar10,
)
from modelbatch.cli import main as cli_main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def write_cifar_batches(folder: Path, sizes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Files in the cifar-10-batches-py format: pickled dicts with bytes keys."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    xs, ys = [], []
    for i, n in enumerate(sizes, start=1):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        record = {
            b"batch_label": f"training batch {i} of {len(sizes)}".encode(),
            b"labels": labels,
            b"data": data,
            b"filenames": [f"img_{i}_{k}.png".encode() for k in range(n)],
        }
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump(record, f, protocol=2)
        xs.append(data)
        ys.append(np.array(labels))
    return np.concatenate(xs), np.concatenate(ys)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames or ()) == COLUMNS
        return list(reader)


def check_outputs(out: Path, arch: str) -> list[dict[str, str]]:
    rows = read_csv(out / f"bench-{arch}.csv")
    md = (out / f"bench-{arch}.md").read_text()
    assert "| precision | method | N | model-images/s |" in md
    assert "target" not in md.lower()  # the project's targets live in benchmarks/targets.py
    assert (out / f"bench-{arch}-throughput.png").read_bytes()[:8] == PNG_MAGIC
    # The CPU has no peak-memory counter: no (empty) memory plot is written.
    assert not (out / f"bench-{arch}-memory.png").exists()
    assert (out / f"bench-{arch}.json").stat().st_size > 0
    for r in rows:  # nothing impossible: shares and fractions of a ceiling are at most 1
        for key in ("opt_share", "tflops_frac", "bytes_frac"):
            if r[key]:
                assert 0 < float(r[key]) <= 1, (key, r)
    return rows


def test_bench_mlp_smoke_with_cifar_data(tmp_path: Path) -> None:
    write_cifar_batches(tmp_path / "cifar-10-batches-py", [20, 20])
    out = tmp_path / "out"
    code = cli_main(
        [
            "bench",
            "--arch",
            "mlp",
            "--models",
            "1",
            "2",
            "--batch-size",
            "16",
            "--steps",
            "2",
            "--repeats",
            "1",
            "--warmup",
            "1",
            "--data",
            str(tmp_path),
            "--out",
            str(out),
            "--methods",
            "sequential",
            "recipe",
            "processes",
            "eager",
            "cudagraph",
        ]
    )
    assert code == 0
    rows = check_outputs(out, "mlp")
    cells = {(r["method"], r["n_models"]): r for r in rows}
    assert set(cells) == {("sequential", "1")} | {
        (m, n) for m in ("recipe", "processes", "eager", "cudagraph") for n in ("1", "2")
    }
    for method in ("sequential", "recipe", "eager"):
        r = cells[(method, "1")]
        assert r["status"] == "ok", r["note"]
        assert float(r["model_images_per_s"]) > 0
        assert float(r["tflops_frac"]) > 0
    assert float(cells[("eager", "2")]["opt_ms"]) > 0
    assert 0 < float(cells[("eager", "2")]["opt_share"]) < 1
    assert float(cells[("eager", "2")]["speedup_vs_sequential"]) > 0
    assert cells[("processes", "2")]["status"] == "skipped"
    assert "GPU only" in cells[("processes", "2")]["note"]
    assert cells[("cudagraph", "1")]["status"] == "skipped"
    assert "CIFAR-10" in (out / "bench-mlp.md").read_text()


def test_bench_resnet8_smoke_two_precisions(tmp_path: Path) -> None:
    code = cli_main(
        [
            "bench",
            "--arch",
            "resnet8",
            "--models",
            "2",
            "--batch-size",
            "4",
            "--steps",
            "1",
            "--repeats",
            "1",
            "--warmup",
            "1",
            "--precision",
            "bf16",
            "--out",
            str(tmp_path),
            "--methods",
            "sequential",
            "recipe-bf16params",
            "eager",
        ]
    )
    assert code == 0
    rows = check_outputs(tmp_path, "resnet8")
    got = {(r["precision"], r["method"], r["n_models"]): r["status"] for r in rows}
    # fp32 sequential is always measured: it is the reference of every speedup.
    assert got == {
        ("fp32", "sequential", "1"): "ok",
        ("bf16", "sequential", "1"): "ok",
        ("bf16", "recipe-bf16params", "2"): "ok",
        ("bf16", "eager", "2"): got[("bf16", "eager", "2")],
    }
    eager = next(r for r in rows if r["method"] == "eager")
    # bf16 autocast with BatchNorm either runs or its error is recorded, never a crash.
    assert eager["status"] == "ok" or eager["note"]


def test_cifar_loader_reads_the_python_batches(tmp_path: Path) -> None:
    raw_x, raw_y = write_cifar_batches(tmp_path / "cifar-10-batches-py", [5, 7])
    images, labels = load_cifar10(tmp_path)
    assert images.shape == (12, 3, 32, 32) and images.dtype == torch.float32
    assert torch.equal(labels, torch.from_numpy(raw_y).long())
    # Normalised per channel; the pixel order is the file's (channel-major rows of 32).
    assert images.mean(dim=(0, 2, 3)).abs().max() < 1e-5
    first = torch.from_numpy(raw_x[0].reshape(3, 32, 32).astype(np.float32))
    corr = torch.corrcoef(torch.stack([first.flatten(), images[0].flatten()]))[0, 1]
    assert corr > 0.99


def test_cifar_loader_refuses_code_in_the_pickle(tmp_path: Path) -> None:
    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (print, ("this must never run",))

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({b"data": Payload(), b"labels": [0]}, f, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load .*print"):
        load_cifar10(tmp_path)


def test_workload_sizes_and_flops() -> None:
    mlp, resnet = MLP(), ResNet8()
    assert sum(p.numel() for p in mlp.parameters()) == 118_282
    assert 77_000 <= sum(p.numel() for p in resnet.parameters()) <= 79_000
    # 2 FLOPs per multiply-add; forward, weight gradient and input gradient (3 passes), but
    # no input gradient for the first layer: the data need none.
    assert count_flops_per_image(mlp, (784,)) == 2 * (2 * 784 * 128 + 3 * (128 * 128 + 128 * 10))
    assert 30e6 < count_flops_per_image(resnet, (3, 32, 32)) < 120e6


def test_scaling_summary_reports_cost_ratio_and_saturation() -> None:
    rows = [
        {"precision": "fp32", "method": "eager", "n_models": n, "model_images_per_s": t}
        for n, t in ((1, 100.0), (2, 190.0), (4, 200.0), (8, 205.0))
    ]
    (s,) = scaling_summary(rows)
    ratios = [round(r, 3) for _, _, r in s["steps"]]
    assert ratios == [round(100 / 190, 3), 0.95, round(200 / 205, 3)]
    assert s["saturates_at"] == 2


def bench_args(out: Path, *extra: str) -> list[str]:
    return [
        "bench",
        "--arch",
        "mlp",
        "--batch-size",
        "8",
        "--steps",
        "2",
        "--repeats",
        "1",
        "--warmup",
        "1",
        "--out",
        str(out),
        *extra,
    ]


def test_bench_without_matplotlib_then_summarize(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    out = tmp_path / "mlp"
    code = cli_main(bench_args(out, "--models", "2", "--methods", "sequential", "eager"))
    assert code == 0
    assert "plots skipped (ImportError" in capsys.readouterr().out
    assert not list(out.glob("*.png"))
    assert [r["status"] for r in read_csv(out / "bench-mlp.csv")] == ["ok", "ok"]

    spec = importlib.util.spec_from_file_location("summarize", BENCHMARKS / "summarize.py")
    assert spec is not None and spec.loader is not None
    summarize = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summarize)
    assert summarize.main([str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    # Every target gets a verdict; a CPU run measures none of the GPU ones.
    targets = printed.split("targets (all runs together):")[1].strip().splitlines()
    assert len(targets) >= 9
    assert all(line.strip().startswith("[not measured]") for line in targets)
    with open(tmp_path / "all.csv", newline="") as f:
        merged = list(csv.DictReader(f))
    assert [(r["run"], r["method"]) for r in merged] == [("mlp", "sequential"), ("mlp", "eager")]
    assert "| target | measured | verdict |" in (tmp_path / "summary.md").read_text()


def test_bench_stopped_by_sigterm_writes_what_it_measured(tmp_path: Path) -> None:
    """benchmarks/run_gpu.sh stops a stage with SIGTERM at its time limit."""
    out = tmp_path / "out"
    received: list[int] = []
    old = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))

    def stop_after_two_cells() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            path = out / "bench-mlp.csv"
            if path.exists() and len(path.read_text().splitlines()) >= 3:
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.02)

    killer = threading.Thread(target=stop_after_two_cells)
    killer.start()
    try:
        code = cli_main(
            bench_args(out, "--models", *["1"] * 200, "--methods", "sequential", "recipe")
        )
    finally:
        killer.join()
        signal.signal(signal.SIGTERM, old)
    assert code == 130 and not received  # handled by the benchmark, then restored
    rows = read_csv(out / "bench-mlp.csv")
    assert rows[0]["status"] == rows[1]["status"] == "ok"
    assert rows[-1]["status"] == "interrupted" and len(rows) < 20
    assert "| fp32 | recipe | 1 |" in (out / "bench-mlp.md").read_text()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--steps", "0"], "--steps must be at least 1 (got 0)"),
        (["--repeats", "0"], "--repeats must be at least 1"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--models", "0"], "--models must be positive"),
        (["--target-seconds", "0"], "--target-seconds must be positive"),
        (["--device", "nonsense"], "--device 'nonsense': not a device name"),
        (["--device", "meta"], "only cpu and cuda"),
        (["--data", "/nonexistent/folder"], "no such folder"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    assert cli_main(["bench", "--out", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()  # nothing written


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA graphs run on a GPU")
def test_cudagraph_on_cpu_measures_nothing_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(bench_args(tmp_path / "o", "--models", "2", "--methods", "cudagraph")) == 2
    err = capsys.readouterr().err
    assert "measured nothing" in err and "cudagraph: needs CUDA" in err
    assert not (tmp_path / "o").exists()


def test_no_vs_sequential_without_sequential_in_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "o"
    assert cli_main(bench_args(out, "--models", "2", "--methods", "eager")) == 0
    printed = capsys.readouterr().out
    assert "vs seq " not in printed and "sequential was not measured" in printed
    md = (out / "bench-mlp.md").read_text()
    assert "| vs sequential |" not in md and "sequential fp32 was not measured" in md
    assert all(not r["speedup_vs_sequential"] for r in read_csv(out / "bench-mlp.csv"))


def test_unreliable_cells_are_marked_in_the_report_and_plot(tmp_path: Path) -> None:
    from modelbatch.bench.report import write_markdown, write_plots

    meta = {
        "arch": "mlp",
        "device_name": "test CPU",
        "device": "cpu",
        "torch": torch.__version__,
        "python": "3",
        "date": "2026-11-29",
        "command": "modelbatch bench",
        "params_per_model": 10,
        "batch_per_model": 8,
        "flops_per_image": 1.0,
        "data": "random",
        "ceilings": {},
        "max_spread": 0.1,
    }

    def row(method: str, n: int, ms: float, reliable: bool, **kw: object) -> dict[str, object]:
        return {
            "arch": "mlp",
            "precision": "fp32",
            "method": method,
            "n_models": n,
            "batch_per_model": 8,
            "status": "ok",
            "step_ms": ms,
            "step_ms_min": ms * 0.9,
            "step_ms_max": ms * (3 if not reliable else 1.05),
            "spread": 2.1 if not reliable else 0.15,
            "reliable": reliable,
            "model_images_per_s": n * 8 / (ms / 1e3),
            **kw,
        }

    rows = [
        row("sequential", 1, 1.0, False, speedup_vs_sequential=1.0, speedup_reliable=False),
        row("eager", 4, 2.0, True, speedup_vs_sequential=2.0, speedup_reliable=False),
        row("recipe", 4, 2.5, True, speedup_vs_sequential=1.6, speedup_reliable=False),
    ]
    md = write_markdown(rows, meta, tmp_path / "r.md")
    assert "| fp32 | sequential | 1 | 8k | 1.0x *unreliable* | 1 (±105%) *unreliable* |" in md
    assert "| 2.0x *unreliable* | 2 (±8%) |" in md  # a speedup from an unreliable reference
    paths = write_plots(rows, meta, tmp_path, "bench-mlp")
    assert [p.name for p in paths] == ["bench-mlp-throughput.png"]  # no memory measured
