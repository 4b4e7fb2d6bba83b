"""The project's targets (benchmarks/targets.py, used by benchmarks/summarize.py) evaluated on
benchmark rows: each verdict from made-up GPU rows."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from modelbatch.bench import _ceiling_key

_spec = importlib.util.spec_from_file_location(
    "benchmark_targets", Path(__file__).resolve().parents[2] / "benchmarks" / "targets.py"
)
assert _spec is not None and _spec.loader is not None
targets = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(targets)
evaluate_targets = targets.evaluate_targets


def row(arch: str, prec: str, method: str, n: int, ips: float | None, **kw: Any) -> dict[str, Any]:
    r: dict[str, Any] = {
        "arch": arch,
        "precision": prec,
        "method": method,
        "n_models": n,
        "status": "ok" if ips else kw.pop("status", "error"),
        "note": kw.pop("note", ""),
        "device_type": kw.pop("device_type", "cuda"),
    }
    if ips:
        r["model_images_per_s"] = ips
    r.update(kw)
    return r


def verdicts(rows: list[dict[str, Any]]) -> dict[str, tuple[str, str]]:
    return {t: (m, v) for t, m, v in evaluate_targets(rows)}


def find(got: dict[str, tuple[str, str]], prefix: str) -> tuple[str, str]:
    (key,) = [k for k in got if k.startswith(prefix)]
    return got[key]


def test_every_target_is_answered_from_gpu_rows() -> None:
    seq = 29e3
    rows = [
        row("resnet8", "fp32", "sequential", 1, seq, speedup_vs_sequential=1.0),
        row("resnet8", "bf16", "recipe", 256, None, note="RuntimeError: Expected running_mean"),
        row("resnet8", "bf16", "recipe-bf16params", 256, 0.24e6),
        # the best ModelBatch cell may come from another run (channels_last)
        row("resnet8", "bf16", "eager", 64, 0.3e6, speedup_vs_sequential=0.3e6 / seq),
        row("resnet8", "bf16", "eager", 256, 0.4e6, speedup_vs_sequential=0.4e6 / seq),
        row("resnet8", "bf16", "cudagraph-cl", 256, 1.1e6, speedup_vs_sequential=1.1e6 / seq),
        row("mlp", "fp32", "cudagraph", 32, 20e6, speedup_vs_sequential=117.0),
        row("mlp", "bf16", "eager", 4096, 40e6, speedup_vs_sequential=234.0),
        row("mlp", "bf16", "eager", 1024, 38e6, opt_share=0.25),
        row(
            "mlp",
            "bf16",
            "cudagraph",
            1024,
            43e6,
            peak_mem_bytes=3e9,
            mem_bound_bytes=2e9,
            mem_per_model_bytes=2.5e6,
        ),
    ]
    got = verdicts(rows)
    assert find(got, "ResNet-8 N=256 bf16 autocast >= 1.0M")[1] == "met"
    assert "cudagraph-cl" in find(got, "ResNet-8 N=256 bf16 autocast >= 1.0M")[0]
    measured, verdict = find(got, "ResNet-8 N=256 bf16 >= 4x")
    assert verdict == "met" and measured.startswith("4.58x")
    assert find(got, "ResNet-8 N=256 bf16 >= 34x")[1] == "met"  # 37.9x
    assert find(got, "MLP N=32 >= 100x")[1] == "met"
    assert find(got, "MLP N=4096 >= 300x")[1] == "NOT met"
    assert find(got, "bf16 autocast works with BatchNorm")[1] == "met"
    # eager bf16: 0.3M -> 0.4M over two doublings: cost ratio 0.87 per doubling
    measured, verdict = find(got, "scaling resnet8 eager bf16")
    assert verdict == "met" and "64->256 0.87" in measured
    measured, verdict = find(got, "mlp memory")
    assert verdict == "NOT met" and "1.50 of the bound" in measured and "2.4 MiB" in measured
    assert find(got, "resnet8 memory")[1] == "not measured"  # no peak in these rows
    measured, verdict = find(got, "optimizer share of the step at N=1024")
    assert verdict == "reported" and "mlp eager bf16 25%" in measured


def test_failures_and_missing_cells_are_not_met_or_not_measured() -> None:
    rows = [
        row("resnet8", "bf16", "eager", 256, None, note="RuntimeError: Expected running_mean"),
        row("resnet8", "bf16", "eager", 16, 0.2e6),
        row("resnet8", "bf16", "eager", 64, 0.1e6),  # dearer per image: 1.41 per doubling
    ]
    got = verdicts(rows)
    measured, verdict = find(got, "ResNet-8 N=256 bf16 autocast >= 1.0M")
    assert verdict == "NOT met" and "running_mean" in measured
    measured, verdict = find(got, "bf16 autocast works with BatchNorm")
    assert verdict == "NOT met" and "eager N=256" in measured
    assert find(got, "scaling resnet8 eager bf16")[1] == "NOT met"
    assert find(got, "MLP N=32")[1] == "not measured"
    assert find(got, "optimizer share")[1] == "not measured"
    # The same rows from a CPU run answer nothing about the GPU targets.
    cpu = [dict(r, device_type="cpu") for r in rows]
    assert {v for _, v in verdicts(cpu).values()} == {"not measured"}


def test_fp32_flops_are_compared_with_the_ceiling_the_layers_use() -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert _ceiling_key("resnet8", "bf16", cuda) == "bf16"
    # cuDNN convolutions use TF32 by default; matmuls stay IEEE fp32 by default.
    conv = "tf32" if torch.backends.cudnn.allow_tf32 else "fp32"
    mm = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"
    assert _ceiling_key("resnet8", "fp32", cuda) == conv
    assert _ceiling_key("mlp", "fp32", cuda) == mm
    assert _ceiling_key("resnet8", "fp32", cpu) == "fp32"
