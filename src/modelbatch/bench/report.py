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
    "step_ms_min",
    "step_ms_max",
    "windows",
    "spread",
    "reliable",
    "model_images_per_s",
    "speedup_vs_sequential",
    "speedup_reliable",
    "peak_mem_bytes",
    "mem_per_model_bytes",
    "gpu_util_pct",
    "tflops",
    "tflops_frac",
    "bytes_per_s",
    "bytes_frac",
    "opt_ms",
    "opt_share",
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

    ``ratio`` > 1 means each model-image got dearer as N doubled. ``saturates_at`` is the
    first N after which the throughput grows by less than 10% per doubling.
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


def _unreliable(r: dict[str, Any]) -> bool:
    return r.get("status") == "ok" and r.get("reliable") is False


def write_markdown(rows: Sequence[dict[str, Any]], meta: dict[str, Any], path: Path) -> str:
    """The markdown report (also returned): setup, the main table and scaling.

    The "vs sequential" column is there only when sequential fp32 was measured in the same
    run; a cell whose timing windows never agreed within ``meta["max_spread"]`` is marked
    *unreliable*, and so is every speedup computed from one.
    """
    with_ref = any(r.get("speedup_vs_sequential") for r in rows)
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
    spread = meta.get("max_spread")
    if spread:
        lines.append(
            f"- step time: median of the fastest timing windows, which must agree within "
            f"±{50 * spread:.0f}%; cells whose windows never did are marked *unreliable*"
        )
    if not with_ref:
        lines.append(
            "- no 'vs sequential' column: sequential fp32 was not measured in this run, or failed"
        )
    head = ["precision", "method", "N", "model-images/s"]
    if with_ref:
        head.append("vs sequential")
    head += ["step ms (spread)", "peak mem", "per model", "GPU util", "TFLOP/s (frac)"]
    head += ["B/s (frac)", "opt share", "note"]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["precision"]), str(r["method"]), str(r["n_models"])]
        if r["status"] != "ok":
            cells.append(str(r["status"]))
            cells += [""] * (len(head) - 5)
            cells.append(str(r.get("note", "")))
            lines.append("| " + " | ".join(cells) + " |")
            continue
        util = "-" if r.get("gpu_util_pct") is None else f"{r['gpu_util_pct']:.0f}%"
        speed = r.get("speedup_vs_sequential")
        noise = "" if r.get("spread") is None else f" (±{50 * r['spread']:.0f}%)"
        if _unreliable(r):
            noise += " *unreliable*"
        cells.append(_si(r["model_images_per_s"]))
        if with_ref:
            sp = "-" if speed is None else f"{speed:.1f}x"
            if speed is not None and not r.get("speedup_reliable"):
                sp += " *unreliable*"
            cells.append(sp)
        exceeded = r.get("ceiling_exceeded")
        cells += [
            f"{r['step_ms']:.3g}{noise}",
            _si(r.get("peak_mem_bytes"), "B"),
            _si(r.get("mem_per_model_bytes"), "B"),
            util,
            f"{_si(r.get('tflops'))} ({_pct(r.get('tflops_frac'))})",
            f"{_si(r.get('bytes_per_s'))} ({_pct(r.get('bytes_frac'))})",
            _pct(r.get("opt_share")),
            str(r.get("note", ""))
            + (f" above the measured {exceeded} ceiling: fraction left out" if exceeded else ""),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    scaling = scaling_summary(rows)
    if scaling:
        lines += ["", "## Scaling (cost per model-image, ratio per doubling of N)", ""]
        for s in scaling:
            parts = ", ".join(f"{a}->{b}: {ratio:.2f}" for a, b, ratio in s["steps"])
            sat = s["saturates_at"]
            tail = f"; throughput flat (<10%/doubling) from N={sat}" if sat else ""
            lines.append(f"- {s['precision']} {s['method']}: {parts}{tail}")
    text = "\n".join(lines) + "\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return text


def write_plots(
    rows: Sequence[dict[str, Any]], meta: dict[str, Any], out_dir: Path, stem: str
) -> list[Path]:
    """Throughput (with the spread of the timing windows as error bars) and peak memory
    against N (log-log), one colour per method, one line style per precision.

    A plot with nothing to show is not written: no throughput plot without a measured
    cell, no memory plot without a peak-memory measurement (the CPU has none).
    Sequential (one model alone) is a dotted horizontal line with its band. Unreliable cells
    (timing windows that never agreed) have hollow markers and "[unreliable]" in the legend.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the benchmark plots need matplotlib: pip install -e '.[demo]'") from e
    ok = [r for r in rows if r["status"] == "ok" and r.get("model_images_per_s")]
    methods = list(dict.fromkeys(r["method"] for r in ok))
    palette = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
    colour = {m: palette(i % palette.N) for i, m in enumerate(methods)}
    styles = {"fp32": "-", "bf16": "--"}
    markers = {"fp32": "o", "bf16": "s"}
    all_n = sorted({r["n_models"] for r in rows}) or [1]
    paths = []
    for kind in ("throughput", "memory"):
        key = "model_images_per_s" if kind == "throughput" else "peak_mem_bytes"
        pts = [r for r in ok if r.get(key)]
        if not pts:
            continue
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        for method in methods:
            for prec in ("fp32", "bf16"):
                series = sorted(
                    (r for r in pts if r["method"] == method and r["precision"] == prec),
                    key=lambda r: r["n_models"],
                )
                if not series:
                    continue
                label = f"{method} ({prec})"
                if any(_unreliable(r) for r in series):
                    label += " [unreliable]"
                ys = [r[key] for r in series]
                if kind == "throughput":
                    # Error bars: the throughput of the slowest and fastest window used.
                    lo = [
                        y - r["n_models"] * r["batch_per_model"] / (r["step_ms_max"] / 1e3)
                        if r.get("step_ms_max")
                        else 0.0
                        for r, y in zip(series, ys, strict=True)
                    ]
                    hi = [
                        r["n_models"] * r["batch_per_model"] / (r["step_ms_min"] / 1e3) - y
                        if r.get("step_ms_min")
                        else 0.0
                        for r, y in zip(series, ys, strict=True)
                    ]
                    if method == "sequential":
                        y0 = ys[0]
                        ax.axhspan(y0 - lo[0], y0 + hi[0], color=colour[method], alpha=0.15)
                        ax.axhline(
                            y0, color=colour[method], linestyle=":", linewidth=1.5, label=label
                        )
                        continue
                    ax.errorbar(
                        [r["n_models"] for r in series],
                        ys,
                        yerr=[lo, hi],
                        color=colour[method],
                        linestyle=styles.get(prec, "-"),
                        marker=markers.get(prec, "o"),
                        capsize=3,
                        label=label,
                    )
                    shaky = [r for r in series if _unreliable(r)]
                    if shaky:  # hollow markers: cells whose windows never agreed
                        ax.scatter(
                            [r["n_models"] for r in shaky],
                            [r[key] for r in shaky],
                            marker=markers.get(prec, "o"),
                            facecolors="white",
                            edgecolors=colour[method],
                            zorder=3,
                        )
                else:
                    ax.plot(
                        [r["n_models"] for r in series],
                        ys,
                        color=colour[method],
                        linestyle=styles.get(prec, "-"),
                        marker=markers.get(prec, "o"),
                        label=label,
                    )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(all_n, [str(n) for n in all_n])
        ax.set_xlabel("N (models trained together)")
        if kind == "throughput":
            ax.set_ylabel("model-images / s (bars: fastest to slowest window)")
        else:
            ax.set_ylabel("peak device memory (bytes)")
        title = f"{meta['arch']} on {meta['device_name']}, {meta['date']}"
        if any(_unreliable(r) for r in pts):
            title += "\nhollow markers: unreliable (the timing windows never agreed)"
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = out_dir / f"{stem}-{kind}.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        paths.append(p)
    return paths
