"""Benchmark output: rows with derived metrics, CSV, a markdown report and PNG plots."""

from __future__ import annotations

import csv
import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["COLUMNS", "scaling_summary", "write_csv", "write_markdown", "write_plots"]

COLUMNS = (
    "arch",
    "precision",
    "method",
    "n_models",
    "batch_per_model",
    "status",
    "step_ms",
    "model_images_per_s",
    "speedup_vs_sequential",
    "peak_mem_bytes",
    "mem_per_model_bytes",
    "mem_bound_bytes",
    "gpu_util_pct",
    "tflops",
    "tflops_frac",
    "bytes_per_s",
    "bytes_frac",
    "opt_ms",
    "opt_share",
    "spread",
    "device",
    "note",
)


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """One line per (precision, method, N) with every column of :data:`COLUMNS`
    (written to a temporary file first, then renamed: a reader never sees half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(COLUMNS), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k)) for k in COLUMNS})
    tmp.replace(path)


def _si(v: float | None, unit: str = "") -> str:
    if v is None:
        return "-"
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= scale:
            return f"{v / scale:.3g}{prefix}{unit}"
    return f"{v:.3g}{unit}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def scaling_summary(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (precision, method): cost per model-image between consecutive N, per doubling.

    ``ratio`` > 1 means each model-image got dearer; the target is at most 1.2 per
    doubling until the device saturates. ``saturates_at`` is the first N after which the
    throughput grows by less than 10% per doubling.
    """
    out = []
    keys = sorted({(r["precision"], r["method"]) for r in rows})
    for prec, method in keys:
        pts = sorted(
            (r["n_models"], r["model_images_per_s"])
            for r in rows
            if r["precision"] == prec and r["method"] == method and r.get("model_images_per_s")
        )
        if len(pts) < 2:
            continue
        steps = []
        saturates = None
        for (n0, t0), (n1, t1) in itertools.pairwise(pts):
            doublings = math.log2(n1 / n0)
            cost_ratio = (t0 / t1) ** (1 / doublings)  # per-image cost ratio per doubling
            gain = (t1 / t0) ** (1 / doublings)
            steps.append((n0, n1, cost_ratio))
            if saturates is None and gain < 1.10:
                saturates = n0
        out.append({"precision": prec, "method": method, "steps": steps, "saturates_at": saturates})
    return out


def write_markdown(
    rows: Sequence[dict[str, Any]],
    meta: dict[str, Any],
    path: Path,
    checks: Sequence[tuple[str, str, str]] = (),
) -> str:
    """The markdown report (also returned): setup, the main table, scaling and checks."""
    lines = [f"# ModelBatch benchmark: {meta['arch']}", ""]
    lines.append(f"- device: {meta['device_name']} ({meta['device']})")
    lines.append(f"- torch {meta['torch']}, python {meta['python']}, {meta['date']}")
    lines.append(f"- command: `{meta['command']}`")
    lines.append(
        f"- workload: {meta['arch']}, {meta['params_per_model']:,} parameters, batch "
        f"{meta['batch_per_model']} per model, {_si(meta['flops_per_image'], 'FLOP')} per image "
        f"(fwd+bwd), data: {meta['data']}"
    )
    for prec, c in meta["ceilings"].items():
        lines.append(
            f"- ceilings measured in this run ({prec}): matmul {c['matmul_dtype']} "
            f"{_si(c['matmul_flops'], 'FLOP/s')}, copy {_si(c['copy_bytes_per_s'], 'B/s')}"
        )
    if meta.get("fp32_rows_ceiling"):
        lines.append(
            f"- TFLOP/s fractions: bf16 rows against the bf16 matmul, fp32 rows against the "
            f"{meta['fp32_rows_ceiling']} matmul; B/s fractions against the copy"
        )
    for prec, ws in meta.get("working_set_bytes", {}).items():
        if ws:
            lines.append(f"- one model's training working set ({prec}): {_si(ws, 'B')}")
    lines += [
        "",
        "| precision | method | N | model-images/s | vs sequential | step ms (spread) | "
        "peak mem | per model | GPU util | TFLOP/s (frac) | B/s (frac) | opt share | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["status"] != "ok":
            lines.append(
                f"| {r['precision']} | {r['method']} | {r['n_models']} | {r['status']} | | | | | "
                f"| | | | {r.get('note', '')} |"
            )
            continue
        util = "-" if r.get("gpu_util_pct") is None else f"{r['gpu_util_pct']:.0f}%"
        speed = r.get("speedup_vs_sequential")
        spread = "" if not r.get("spread") else f" (±{50 * r['spread']:.0f}%)"
        lines.append(
            f"| {r['precision']} | {r['method']} | {r['n_models']} | "
            f"{_si(r['model_images_per_s'])} | {'-' if speed is None else f'{speed:.1f}x'} | "
            f"{r['step_ms']:.3g}{spread} | {_si(r.get('peak_mem_bytes'), 'B')} | "
            f"{_si(r.get('mem_per_model_bytes'), 'B')} | {util} | "
            f"{_si(r.get('tflops'))} ({_pct(r.get('tflops_frac'))}) | "
            f"{_si(r.get('bytes_per_s'))} ({_pct(r.get('bytes_frac'))}) | "
            f"{_pct(r.get('opt_share'))} | {r.get('note', '')} |"
        )
    scaling = scaling_summary(rows)
    if scaling:
        lines += [
            "",
            "## Scaling (cost per model-image, ratio per doubling of N; target <= 1.2)",
            "",
        ]
        for s in scaling:
            parts = ", ".join(f"{a}->{b}: {ratio:.2f}" for a, b, ratio in s["steps"])
            sat = s["saturates_at"]
            tail = f"; throughput flat (<10%/doubling) from N={sat}" if sat else ""
            lines.append(f"- {s['precision']} {s['method']}: {parts}{tail}")
    if checks:
        lines += [
            "",
            "## Targets (this run alone; benchmarks/summarize.py joins the runs)",
            "",
            "| target | measured | verdict |",
            "|---|---|---|",
        ]
        for target, measured, verdict in checks:
            lines.append(f"| {target} | {measured} | {verdict} |")
    text = "\n".join(lines) + "\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return text


def write_plots(
    rows: Sequence[dict[str, Any]], meta: dict[str, Any], out_dir: Path, stem: str
) -> list[Path]:
    """Throughput and peak memory against N (log-log), one line per (method, precision)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the benchmark plots need matplotlib: pip install 'modelbatch[demo]'"
        ) from e
    paths = []
    series: dict[str, list[tuple[int, float, float | None]]] = {}
    for r in rows:
        if r["status"] != "ok" or not r.get("model_images_per_s"):
            continue
        label = f"{r['method']} ({r['precision']})"
        series.setdefault(label, []).append(
            (r["n_models"], r["model_images_per_s"], r.get("peak_mem_bytes"))
        )
    all_n = sorted({r["n_models"] for r in rows}) or [1]
    for kind in ("throughput", "memory"):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, pts in sorted(series.items()):
            pts.sort()
            if label.startswith("sequential") and kind == "throughput":
                ax.hlines(pts[0][1], all_n[0], all_n[-1], linestyles="dashed", label=label)
                continue
            ys = [p[1] if kind == "throughput" else p[2] for p in pts]
            xs = [p[0] for p in pts]
            keep = [(x, y) for x, y in zip(xs, ys, strict=True) if y]
            if not keep:
                continue
            ax.plot(*zip(*keep, strict=True), marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N (models trained together)")
        ax.set_ylabel("model-images / s" if kind == "throughput" else "peak device memory (bytes)")
        ax.set_title(f"{meta['arch']} on {meta['device_name']}")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        fig.tight_layout()
        p = out_dir / f"{stem}-{kind}.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        paths.append(p)
    return paths
