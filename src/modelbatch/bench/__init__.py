"""``modelbatch bench``: throughput, memory and efficiency of ModelBatch against training
the models one by one, the hand-written torch.func recipe and one process per model.

Example (GPU)::

    modelbatch bench --arch resnet8 --models 1 16 64 256 --precision fp32 bf16 --out results/

writes ``bench-resnet8.csv``, ``bench-resnet8.md``, ``bench-resnet8.json`` and two PNG plots
(throughput and peak memory against N). Kept apart from the tests: nothing here asserts a
timing. See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main"]


def _device_name(device: Any) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return f"{name} ({os.cpu_count()} CPUs)"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:40]


def _parser() -> argparse.ArgumentParser:
    from modelbatch.bench.methods import ALL_METHODS
    from modelbatch.bench.workloads import ARCHS
    from modelbatch.cli import OneLineParser

    p = OneLineParser(
        prog="modelbatch bench",
        description="Measure ModelBatch against sequential training, the torch.func recipe and "
        "one process per model, on one device, in one run.",
    )
    p.add_argument(
        "--arch",
        choices=ARCHS,
        default="mlp",
        help="workload: the 784-128-128-10 MLP, the CIFAR ResNet-8 with BatchNorm, or a "
        "one-layer LSTM / GRU (hidden 128) over 32 steps of 96 features",
    )
    p.add_argument(
        "--models",
        type=int,
        nargs="+",
        default=[1, 16, 64, 256, 512],
        help="numbers of models N to measure",
    )
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        nargs="+",
        default=["fp32"],
        help="fp32, and/or bf16 autocast with float32 master weights",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        choices=ALL_METHODS,
        default=list(ALL_METHODS),
        metavar="METHOD",
        help="methods to run (those the device cannot run are recorded as skipped): "
        + ", ".join(ALL_METHODS)
        + "; the -cl methods build the batch with conv_layout='channels_last'",
    )
    p.add_argument(
        "--compile-models",
        type=int,
        nargs="*",
        default=None,
        help="run the compile methods only at these N (compiling is slow)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (None: benchmarks/results/<date>-<device>)",
    )
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="folder with the CIFAR-10 python batches (None: random tensors)",
    )
    p.add_argument("--device", default=None, help="cuda, cuda:K or cpu (None: cuda if available)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="images (sequences) per model per step (None: 256 for mlp, 128 for resnet8, "
        "64 for lstm and gru)",
    )
    p.add_argument("--steps", type=int, default=20, help="steps per timing window (max)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timing windows that must agree (the median of the fastest REPEATS is reported)",
    )
    p.add_argument(
        "--max-spread",
        type=float,
        default=0.10,
        help="windows are added (up to 3 x REPEATS) until the REPEATS fastest agree within "
        "this (max - min) / median; a cell that never does is marked unreliable",
    )
    p.add_argument(
        "--target-seconds",
        type=float,
        default=1.0,
        help="shorten a window to about this long for slow cells",
    )
    p.add_argument(
        "--max-procs", type=int, default=16, help="largest K for the one-process-per-model method"
    )
    p.add_argument(
        "--channels-last",
        action="store_true",
        help="experiment: feed conv inputs in channels_last memory format",
    )
    p.add_argument(
        "--cudnn-benchmark",
        action="store_true",
        help="set torch.backends.cudnn.benchmark (cuDNN autotuning) for every method",
    )
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--seed", type=int, default=0, help="seed of the models and the data")
    return p


def _row(ctx: Any, r: Any, meta: dict[str, Any], ref: dict[str, Any] | None) -> dict[str, Any]:
    """One output row from a cell's result; ``ref`` is the sequential fp32 row of the same
    run (None when sequential was not measured: then no speedup is given)."""
    wl = ctx.workload
    row: dict[str, Any] = {
        "arch": wl.name,
        "precision": ctx.precision,
        "method": r.method,
        "n_models": r.n_models,
        "batch_per_model": wl.batch_size,
        "status": r.status,
        "step_ms": r.step_ms,
        "step_ms_min": r.fastest_ms,
        "step_ms_max": r.slowest_ms,
        "windows": r.windows,
        "spread": r.spread,
        "reliable": r.reliable,
        "gpu_util_pct": r.gpu_util,
        "opt_ms": r.opt_ms,
        "opt_share": r.opt_share,
        "device": meta["device_name"],
        "device_type": meta["device"].split(":")[0],
        "note": r.note,
    }
    if r.status != "ok" or not r.step_ms:
        return row
    seconds = r.step_ms / 1e3
    images = r.n_models * wl.batch_size
    row["model_images_per_s"] = images / seconds
    if ref is not None:
        row["speedup_vs_sequential"] = row["model_images_per_s"] / ref["model_images_per_s"]
        # A ratio of two measurements is only as good as the worse of the two.
        row["speedup_reliable"] = bool(r.reliable) and bool(ref.get("reliable"))
    if r.peak_bytes is not None:
        row["peak_mem_bytes"] = r.peak_bytes
        row["mem_per_model_bytes"] = (r.peak_bytes - (r.base_bytes or 0)) / r.n_models
    key = _ceiling_key(wl.name, ctx.precision, ctx.device)
    row["ceiling"] = key
    flops = meta["flops_per_image"] * images / seconds
    elem = 2 if ctx.precision == "bf16" else 4
    traffic = (
        images * meta["act_bytes_per_image"][str(elem)] + r.n_models * meta["params_per_model"] * 40
    )
    row["tflops"] = flops / 1e12
    row["bytes_per_s"] = traffic / seconds
    _fractions(row, meta)
    return row


def _fractions(row: dict[str, Any], meta: dict[str, Any]) -> None:
    """Achieved FLOP/s and bytes/s as fractions of the ceilings measured in this run.

    A fraction above 1 means the ceiling was measured low (the machine was busy then): it
    is left out (None) and the row says so, rather than printing an impossible number.
    """
    ceil = meta["ceilings"].get(row.get("ceiling", ""))
    if not ceil or row.get("tflops") is None:
        return
    notes = []
    for frac, value, limit, what in (
        ("tflops_frac", row["tflops"] * 1e12, ceil["matmul_flops"], "matmul"),
        ("bytes_frac", row["bytes_per_s"], ceil["copy_bytes_per_s"], "copy"),
    ):
        row[frac] = value / limit if value <= limit else None
        if value > limit:
            notes.append(what)
    row["ceiling_exceeded"] = ", ".join(notes) or None


def _ceiling_key(arch: str, precision: str, device: Any) -> str:
    """Which measured matmul ceiling a run's FLOP/s is compared with.

    bf16 autocast: the bf16 matmul. fp32: on CUDA, the TF32 matmul where the dominant op
    may use TF32 (cuDNN convolutions by default, ``torch.backends.cudnn.allow_tf32``; linear
    layers only with ``torch.backends.cuda.matmul.allow_tf32``), else IEEE fp32.
    """
    import torch

    if precision == "bf16":
        return "bf16"
    if device.type != "cuda":
        return "fp32"
    if arch == "resnet8":
        tf32 = torch.backends.cudnn.allow_tf32
    else:
        tf32 = torch.backends.cuda.matmul.allow_tf32
    return "tf32" if tf32 else "fp32"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the exit status (0 also when some cells failed: their
    errors are in the results; 130 when stopped by SIGINT/SIGTERM, after writing what was
    measured)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return _main(argv)

    def _stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    # `timeout` (benchmarks/run_gpu.sh) stops a stage with SIGTERM; SIGINT may have been
    # inherited as ignored. Both become KeyboardInterrupt: results and plots get written.
    old = {s: signal.signal(s, _stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _main(argv)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _fail(message: str) -> int:
    print(f"modelbatch bench: {message}", file=sys.stderr)
    return 2


def _check_args(args: argparse.Namespace) -> str | None:
    """The first problem with the arguments, or None."""
    for flag, value, low in (
        ("--steps", args.steps, 1),
        ("--repeats", args.repeats, 1),
        ("--warmup", args.warmup, 0),
        ("--max-procs", args.max_procs, 1),
    ):
        if value < low:
            return f"{flag} must be at least {low} (got {value})"
    if args.batch_size is not None and args.batch_size < 1:
        return f"--batch-size must be at least 1 (got {args.batch_size})"
    if any(n < 1 for n in args.models):
        return "--models must be positive integers"
    if args.compile_models and any(n < 1 for n in args.compile_models):
        return "--compile-models must be positive integers"
    if not args.target_seconds > 0:
        return f"--target-seconds must be positive (got {args.target_seconds})"
    if not args.max_spread > 0:
        return f"--max-spread must be positive (got {args.max_spread})"
    if args.data is not None and not args.data.is_dir():
        return f"--data {args.data}: no such folder"
    return None


def _unreliable(row: dict[str, Any]) -> bool:
    return row.get("status") == "ok" and row.get("reliable") is False


def _main(argv: Sequence[str] | None) -> int:
    import torch

    from modelbatch.bench.measure import measure_ceilings
    from modelbatch.bench.methods import BenchContext, MethodResult, available, run_method
    from modelbatch.bench.report import _si, write_csv, write_markdown, write_plots
    from modelbatch.bench.workloads import (
        count_flops_per_image,
        estimate_activation_bytes_per_image,
        get_workload,
        load_cifar10,
        make_batches,
    )
    from modelbatch.cli import parse_device

    parser = _parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    problem = _check_args(args)
    if problem:
        return _fail(problem)
    try:
        device = parse_device(args.device)
    except ValueError as e:
        return _fail(str(e))
    methods = list(dict.fromkeys(args.methods))
    precisions = list(dict.fromkeys(args.precision))
    wl = get_workload(args.arch, args.batch_size)

    def context(prec: str) -> BenchContext:
        return BenchContext(
            wl,
            device,
            prec,
            batches,
            args.warmup,
            args.steps,
            args.repeats,
            args.target_seconds,
            max_spread=args.max_spread,
            seed=args.seed,
            max_procs=args.max_procs,
            channels_last=args.channels_last,
        )

    batches: list[Any] = []
    runnable = [m for m in methods if any(available(m, context(p)) is None for p in precisions)]
    if not runnable:
        why = "; ".join(f"{m}: {available(m, context(precisions[0]))}" for m in methods)
        return _fail(f"measured nothing: no requested method can run on {device.type} ({why})")
    if args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    device_name = _device_name(device)
    date = _dt.date.today().isoformat()
    out_dir: Path = args.out or Path("benchmarks/results") / f"{date}-{_slug(device_name)}"

    data = None
    data_desc = "random normal tensors, uniform labels"
    if args.data is not None:
        try:
            data = load_cifar10(args.data)
        except (OSError, ValueError) as e:
            return _fail(f"--data {args.data}: {e}")
        data_desc = f"CIFAR-10 from {args.data} ({data[0].shape[0]} images)"
    out_dir.mkdir(parents=True, exist_ok=True)
    batches[:] = make_batches(wl, 8, device, args.seed, data)
    probe = wl.make_model()
    meta: dict[str, Any] = {
        "arch": wl.name,
        "device": str(device),
        "device_name": device_name,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": date,
        "command": "modelbatch bench " + shlex.join(list(sys.argv[1:] if argv is None else argv)),
        "batch_per_model": wl.batch_size,
        "params_per_model": sum(p.numel() for p in probe.parameters()),
        "flops_per_image": count_flops_per_image(probe, wl.input_shape),
        "act_bytes_per_image": {
            str(e): estimate_activation_bytes_per_image(probe, wl.input_shape, e) for e in (2, 4)
        },
        "data": data_desc,
        "cudnn_benchmark": bool(args.cudnn_benchmark),
        "tf32": {
            "matmul": torch.backends.cuda.matmul.allow_tf32,
            "cudnn": torch.backends.cudnn.allow_tf32,
        },
        "max_spread": args.max_spread,
        "ceilings": {},
        "working_set_bytes": {},
    }
    rows: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    stem = f"bench-{wl.name}"

    def flush() -> None:
        # Rewritten (atomically) after every cell, so a run cut short still leaves its results.
        write_csv(rows, out_dir / f"{stem}.csv")
        write_markdown(rows, meta, out_dir / f"{stem}.md")
        payload = {"meta": meta, "rows": rows, "errors": errors}
        _write_atomic(out_dir / f"{stem}.json", json.dumps(payload, indent=1, default=str))

    def remeasure_ceiling(key: str) -> None:
        dtype = torch.bfloat16 if key == "bf16" else torch.float32
        c = vars(measure_ceilings(device, dtype, tf32=key == "tf32"))
        old = meta["ceilings"].get(key)
        if old:  # keep the higher of the two measurements of each ceiling
            c["matmul_flops"] = max(c["matmul_flops"], old["matmul_flops"])
            c["copy_bytes_per_s"] = max(c["copy_bytes_per_s"], old["copy_bytes_per_s"])
        meta["ceilings"][key] = c

    def emit(ctx: BenchContext, r: MethodResult, ref: dict[str, Any] | None) -> None:
        row = _row(ctx, r, meta, ref)
        if row.get("ceiling_exceeded"):  # measured low while the machine was busy: again
            remeasure_ceiling(row["ceiling"])
            _fractions(row, meta)
            for other in rows:
                _fractions(other, meta)
        rows.append(row)
        if "traceback" in r.extra:
            errors.append(
                {
                    "method": r.method,
                    "n": r.n_models,
                    "precision": ctx.precision,
                    "traceback": r.extra["traceback"],
                }
            )
        ips = row.get("model_images_per_s")
        shown = f"{ips / 1e3:10.1f}k img/s" if ips else f"{r.status:>16}"
        ms = f"{r.step_ms:9.3f} ms" if r.step_ms else " " * 12
        noise = ""
        if r.spread is not None and r.status == "ok":
            noise = f" ±{50 * r.spread:.0f}%"
            if r.reliable is False:
                noise += (
                    f" UNRELIABLE ({r.windows} windows never agreed within "
                    f"±{50 * args.max_spread:.0f}%)"
                )
        print(
            f"[{ctx.precision}] {r.method:18s} N={r.n_models:<5d} {ms} {shown}{noise}  {r.note}",
            flush=True,
        )
        flush()

    print(f"modelbatch bench: {wl.name} on {device_name}; output in {out_dir}", flush=True)
    # Ceilings: the matmul of every precision the rows are compared with, and the copy.
    seq_precisions = ["fp32", *[p for p in precisions if p != "fp32"]]
    keys = {_ceiling_key(wl.name, p, device) for p in seq_precisions}
    if device.type == "cuda":
        keys |= {"fp32", "tf32"}  # both recorded, whichever the rows use
    meta["fp32_rows_ceiling"] = _ceiling_key(wl.name, "fp32", device)
    interrupted = False
    current: tuple[BenchContext, str, int] | None = None
    ref: dict[str, Any] | None = None
    try:
        for key in ("fp32", "tf32", "bf16"):
            if key not in keys:
                continue
            remeasure_ceiling(key)
            c = meta["ceilings"][key]
            print(
                f"ceiling {key}: matmul {c['matmul_dtype']} {c['matmul_flops'] / 1e12:.3g} "
                f"TFLOP/s, copy {c['copy_bytes_per_s'] / 1e9:.1f} GB/s (read + write)",
                flush=True,
            )
        # Sequential first, fp32 before anything else: the reference of every speedup, and
        # one model's training working set per precision.
        if "sequential" in methods:
            for prec in seq_precisions:
                ctx = context(prec)
                current = (ctx, "sequential", 1)
                r = run_method(ctx, "sequential", 1)
                if r.status == "ok" and r.peak_bytes is not None:
                    meta["working_set_bytes"][prec] = r.peak_bytes - (r.base_bytes or 0)
                if prec == "fp32" and r.status == "ok" and r.step_ms:
                    emit(ctx, r, None)
                    ref = rows[-1]
                    meta["sequential_fp32_throughput"] = ref["model_images_per_s"]
                    rows[-1]["speedup_vs_sequential"] = 1.0
                    rows[-1]["speedup_reliable"] = bool(r.reliable)
                else:
                    emit(ctx, r, ref)
        for prec in precisions:
            ctx = context(prec)
            for n in args.models:
                for method in methods:
                    if method == "sequential" or (method == "recipe-bf16params" and prec != "bf16"):
                        continue
                    if (
                        method.startswith("compile")
                        and args.compile_models is not None
                        and n not in args.compile_models
                    ):
                        continue
                    current = (ctx, method, n)
                    emit(ctx, run_method(ctx, method, n), ref)
        current = None
    except KeyboardInterrupt:  # e.g. the time limit of benchmarks/run_gpu.sh
        interrupted = True
        print("modelbatch bench: interrupted; writing what was measured", flush=True)
        if current is not None:  # the cell that was running is recorded as cut short
            ctx, method, n = current
            cut = MethodResult(method, n, status="interrupted", note="stopped (time limit)")
            emit(ctx, cut, ref)

    flush()
    measured = [r for r in rows if r.get("model_images_per_s")]
    plots: list[Path] = []
    if not args.no_plots and measured:
        try:
            plots = write_plots(rows, meta, out_dir, stem)
        except Exception as e:  # matplotlib missing or failing: the numbers are written
            print(f"modelbatch bench: plots skipped ({type(e).__name__}: {e})", flush=True)
    with_ref = ref is not None
    print(
        "\nmethod              prec  N      model-img/s  "
        + ("vs seq   " if with_ref else "")
        + "step spread  peak mem"
    )
    for row in rows:
        ips = row.get("model_images_per_s")
        sp = row.get("speedup_vs_sequential")
        mem = row.get("peak_mem_bytes")
        sp_text = "-" if not sp else f"{sp:.1f}x" + ("?" if not row.get("speedup_reliable") else "")
        spread = row.get("spread")
        spread_text = "-" if spread is None or not ips else f"±{50 * spread:.0f}%"
        if _unreliable(row):
            spread_text += " (unreliable)"
        print(
            f"{row['method']:19s} {row['precision']:5s} {row['n_models']:<6d} "
            f"{(_si(ips) if ips else row['status']):>11s}  "
            + (f"{sp_text:>7s}  " if with_ref else "")
            + f"{spread_text:12s} "
            f"{(f'{mem / 2**30:.2f} GiB' if mem else '-')}"
        )
    bad = [r for r in rows if _unreliable(r)]
    if bad:
        print(
            f"\nWARNING: {len(bad)} cell(s) are unreliable: their timing windows never agreed "
            f"within ±{50 * args.max_spread:.0f}% (other work on this machine?). Their numbers "
            "and speedups ('?') are only indicative; rerun on a quiet machine or with more "
            "--steps."
        )
    if not with_ref:
        print("(no 'vs sequential' column: sequential was not measured in this run, or failed)")
    print(f"wrote {out_dir / stem}.{{csv,md,json}}" + (" and plots" if plots else ""))
    if not measured and not interrupted:
        reasons = sorted({f"{r['method']}: {r['status']} ({r.get('note', '')})" for r in rows})
        print(
            "modelbatch bench: measured nothing: every cell was skipped or failed: "
            + "; ".join(reasons),
            file=sys.stderr,
        )
        return 1
    return 130 if interrupted else 0
