"""The project's own performance targets, evaluated on benchmark rows: each one met, NOT
met, reported, or not measured. Used by ``benchmarks/summarize.py`` (all the runs of
``benchmarks/run_gpu.sh`` together); ``modelbatch bench`` itself reports measurements only.

A row is a dict as written to ``bench-<arch>.json``: ``arch``, ``precision``, ``method``,
``n_models``, ``status``, ``note``, ``device_type`` and, for cells that ran,
``model_images_per_s``, ``speedup_vs_sequential``, ``peak_mem_bytes``,
``mem_per_model_bytes``, ``opt_share`` and (added by ``summarize.py`` from the run's meta)
``working_set_bytes``, one model's training working set at the row's precision. Throughput
targets count GPU rows only.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from modelbatch.bench.methods import MB_METHODS, RECIPE_METHODS
from modelbatch.bench.report import scaling_summary

__all__ = ["evaluate_targets", "mem_bound_bytes"]

MET, NOT_MET, NOT_MEASURED, REPORTED = "met", "NOT met", "not measured", "reported"

Check = tuple[str, str, str]


def _ok(r: dict[str, Any]) -> bool:
    return r.get("status") == "ok" and bool(r.get("model_images_per_s"))


def _select(
    rows: Iterable[dict[str, Any]],
    arch: str,
    methods: Sequence[str],
    n: int | None = None,
    precision: str | None = None,
) -> list[dict[str, Any]]:
    return [
        r
        for r in rows
        if r.get("arch") == arch
        and r.get("method") in methods
        and (n is None or r.get("n_models") == n)
        and (precision is None or r.get("precision") == precision)
    ]


def _best(rows: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    ok = [r for r in rows if _ok(r)]
    return max(ok, key=lambda r: r["model_images_per_s"]) if ok else None


def _desc(r: dict[str, Any]) -> str:
    run = f", run {r['run']}" if r.get("run") else ""
    return f"{r['model_images_per_s'] / 1e6:.3g}M ({r['method']} {r['precision']}{run})"


def _failed(cells: Sequence[dict[str, Any]]) -> str:
    notes = sorted({f"{r['method']}: {str(r.get('note', ''))[:70]}" for r in cells})
    return "no cell ran to the end: " + "; ".join(notes[:3])


def _throughput_targets(gpu: list[dict[str, Any]]) -> list[Check]:
    out: list[Check] = []
    cells = _select(gpu, "resnet8", MB_METHODS, 256, "bf16")
    best = _best(cells)
    t1 = "ResNet-8 N=256 bf16 autocast >= 1.0M model-images/s"
    t2 = "ResNet-8 N=256 bf16 >= 4x the torch.func recipe's best at N=256"
    t3 = "ResNet-8 N=256 bf16 >= 34x sequential fp32 (one model alone)"
    if best is None:
        why = _failed(cells) if cells else "no ModelBatch cell at N=256 bf16"
        verdict = NOT_MET if any(r.get("status") == "error" for r in cells) else NOT_MEASURED
        out += [(t1, why, verdict), (t2, why, verdict), (t3, why, verdict)]
    else:
        out.append((t1, _desc(best), MET if best["model_images_per_s"] >= 1.0e6 else NOT_MET))
        rec = _best(_select(gpu, "resnet8", RECIPE_METHODS, 256))
        if rec is None:
            out.append((t2, "no recipe cell ran at N=256", NOT_MEASURED))
        else:
            ratio = best["model_images_per_s"] / rec["model_images_per_s"]
            out.append((t2, f"{ratio:.2f}x (recipe {_desc(rec)})", MET if ratio >= 4 else NOT_MET))
        sp = best.get("speedup_vs_sequential")
        if not sp:
            out.append((t3, "no sequential fp32 reference in that run", NOT_MEASURED))
        else:
            out.append((t3, f"{sp:.1f}x", MET if sp >= 34 else NOT_MET))
    for n, target in ((32, 100), (4096, 300)):
        name = f"MLP N={n} >= {target}x sequential fp32"
        cells = _select(gpu, "mlp", MB_METHODS, n)
        best = _best(cells)
        if best is None:
            out.append((name, _failed(cells) if cells else f"no cell at N={n}", NOT_MEASURED))
        elif not best.get("speedup_vs_sequential"):
            out.append((name, "no sequential fp32 reference in that run", NOT_MEASURED))
        else:
            sp = best["speedup_vs_sequential"]
            out.append((name, f"{sp:.0f}x ({_desc(best)})", MET if sp >= target else NOT_MET))
    return out


def _batchnorm_target(gpu: list[dict[str, Any]]) -> Check:
    name = "bf16 autocast works with BatchNorm (ResNet-8, ModelBatch)"
    cells = [r for r in _select(gpu, "resnet8", MB_METHODS, precision="bf16")]
    cells = [r for r in cells if r.get("status") not in ("skipped", "interrupted")]
    if not cells:
        return (name, "no ModelBatch bf16 ResNet-8 cell", NOT_MEASURED)
    oom = [r for r in cells if "out of memory" in str(r.get("note", "")).lower()]
    bad = [r for r in cells if r.get("status") != "ok" and r not in oom]
    ok = [r for r in cells if r.get("status") == "ok"]
    measured = f"{len(ok)} cells ran" + (f", {len(oom)} out of memory" if oom else "")
    if bad:
        r = bad[0]
        measured += (
            f", {len(bad)} failed (first: {r['method']} N={r['n_models']}: "
            f"{str(r.get('note', ''))[:80]})"
        )
    return (name, measured, MET if ok and not bad else NOT_MET)


def _scaling_targets(gpu: list[dict[str, Any]]) -> list[Check]:
    out: list[Check] = []
    for arch in ("resnet8", "mlp"):
        series = [r for r in _select(gpu, arch, MB_METHODS) if _ok(r)]
        # One point per (precision, method, N): the best, should two runs share a cell.
        best: dict[tuple[str, str, int], dict[str, Any]] = {}
        for r in series:
            key = (r["precision"], r["method"], r["n_models"])
            if key not in best or r["model_images_per_s"] > best[key]["model_images_per_s"]:
                best[key] = r
        for s in scaling_summary(list(best.values())):
            worst = max(ratio for _, _, ratio in s["steps"])
            pts = ", ".join(f"{a}->{b} {ratio:.2f}" for a, b, ratio in s["steps"])
            sat = s["saturates_at"]
            where = f"saturates at N={sat}" if sat else "not saturated by the largest N"
            out.append(
                (
                    f"scaling {arch} {s['method']} {s['precision']}: per-image cost per "
                    "doubling of N <= 1.2",
                    f"{pts}; {where}",
                    MET if worst <= 1.2 else NOT_MET,
                )
            )
    if not out:
        out.append(("scaling: per-image cost per doubling of N <= 1.2", "", NOT_MEASURED))
    return out


def mem_bound_bytes(r: dict[str, Any]) -> float | None:
    """The memory target for a row: 1.5 GB + 1.1 x N x one model's working set."""
    ws = r.get("working_set_bytes")
    return 1.5e9 + 1.1 * r["n_models"] * ws if ws else None


def _memory_targets(rows: list[dict[str, Any]]) -> list[Check]:
    out: list[Check] = []
    rows = [{**r, "mem_bound_bytes": r.get("mem_bound_bytes") or mem_bound_bytes(r)} for r in rows]
    for arch in ("resnet8", "mlp"):
        name = f"{arch} memory: peak <= 1.5 GB + 1.1 x N x one model's working set"
        cells = [
            r
            for r in _select(rows, arch, MB_METHODS)
            if _ok(r) and r.get("mem_bound_bytes") and r.get("peak_mem_bytes")
        ]
        if not cells:
            if _select(rows, arch, MB_METHODS):
                out.append((name, "no peak memory or no working set measured", NOT_MEASURED))
            continue
        worst = max(cells, key=lambda r: r["peak_mem_bytes"] / r["mem_bound_bytes"])
        n_max = max(r["n_models"] for r in cells)
        per_model = ", ".join(
            f"{r['method']} {r['precision']} {r['mem_per_model_bytes'] / 2**20:.1f} MiB"
            for r in cells
            if r["n_models"] == n_max and r.get("mem_per_model_bytes") is not None
        )
        bad = [r for r in cells if r["peak_mem_bytes"] > r["mem_bound_bytes"]]
        out.append(
            (
                name,
                f"worst {worst['peak_mem_bytes'] / worst['mem_bound_bytes']:.2f} of the bound "
                f"({worst['method']} {worst['precision']} N={worst['n_models']}: "
                f"{worst['peak_mem_bytes'] / 2**30:.2f} GiB); per model at N={n_max}: {per_model}",
                NOT_MET if bad else MET,
            )
        )
    return out


def _optimizer_share(rows: list[dict[str, Any]]) -> Check:
    name = "optimizer share of the step at N=1024"
    cells = [r for r in rows if r.get("n_models") == 1024 and r.get("opt_share") is not None]
    if not cells:
        return (name, "no N=1024 cell with an optimizer timing", NOT_MEASURED)
    parts = ", ".join(
        f"{r['arch']} {r['method']} {r['precision']} {100 * r['opt_share']:.0f}%"
        for r in sorted(cells, key=lambda r: (r["arch"], r["method"], r["precision"]))
    )
    return (name, parts, REPORTED)


def evaluate_targets(rows: Sequence[dict[str, Any]]) -> list[Check]:
    """Every target of the issue as ``(target, measured, verdict)``; verdict is ``met``,
    ``NOT met``, ``reported`` or ``not measured``. Throughput, scaling and BatchNorm targets
    use GPU rows only (``device_type == "cuda"``); memory uses any row with a peak."""
    gpu = [r for r in rows if r.get("device_type") == "cuda"]
    out = _throughput_targets(gpu)
    out.append(_batchnorm_target(gpu))
    out += _scaling_targets(gpu)
    out += _memory_targets(list(rows))
    out.append(_optimizer_share(list(rows)))
    if not gpu:
        out = [
            (t, m or "no GPU rows", NOT_MEASURED if v in (MET, NOT_MET) else v) for t, m, v in out
        ]
    return out
