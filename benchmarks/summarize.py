"""Summarise a benchmark output folder (what benchmarks/run_gpu.sh wrote): merge every
``*/bench-*.json`` into ``all.csv``, join the markdown reports into ``summary.md``, and
print the stages' exit lines, the GPU correctness checks, a short table of every cell and,
last, every project target (``targets.py`` beside this file) over all the runs together
(met / NOT met / reported / not measured).

    PYTHONPATH=src python3 benchmarks/summarize.py OUT_DIR
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from targets import evaluate_targets

from modelbatch.bench.report import COLUMNS


def load_runs(root: Path) -> tuple[list[dict[str, Any]], list[Path]]:
    """Every row of every ``<run>/bench-<arch>.json`` under ``root``, tagged with ``run``."""
    rows: list[dict[str, Any]] = []
    files = sorted(root.glob("*/bench-*.json"))
    for f in files:
        try:
            payload = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            print(f"skipping {f}: {e}")
            continue
        meta = payload.get("meta", {})
        device_type = str(meta.get("device", "")).split(":")[0]
        working_set = meta.get("working_set_bytes", {})
        for r in payload.get("rows", []):
            r.setdefault("device_type", device_type)
            r.setdefault("working_set_bytes", working_set.get(r.get("precision")))
            r["run"] = f.parent.name
            rows.append(r)
    return rows, files


def _cell(v: Any, fmt: str) -> str:
    return "-" if v is None or v == "" else format(v, fmt)


def table(rows: list[dict[str, Any]]) -> list[str]:
    """One short line per cell."""
    out = [
        f"{'run':17s} {'prec':4s} {'method':21s} {'N':>5s} {'img/s':>8s} {'vs seq':>7s} "
        f"{'step ms':>8s} {'GiB':>6s} {'util':>4s} {'TF%':>5s} {'BW%':>5s} {'opt%':>4s}"
    ]
    for r in rows:
        head = f"{r['run'][:17]:17s} {r['precision']:4s} {r['method'][:21]:21s} {r['n_models']:>5d}"
        if r.get("status") != "ok" or not r.get("model_images_per_s"):
            out.append(f"{head} {r.get('status', '?')}: {str(r.get('note', ''))[:70]}")
            continue
        ips = r["model_images_per_s"]
        sp = r.get("speedup_vs_sequential")
        mem = r.get("peak_mem_bytes")
        out.append(
            f"{head} {ips / 1e6:7.3f}M {_cell(sp, '6.1f')}x {r['step_ms']:8.3f} "
            f"{_cell(mem / 2**30 if mem else None, '6.2f')} "
            f"{_cell(r.get('gpu_util_pct'), '4.0f')} "
            f"{_cell(100 * r['tflops_frac'] if r.get('tflops_frac') else None, '5.1f')} "
            f"{_cell(100 * r['bytes_frac'] if r.get('bytes_frac') else None, '5.1f')} "
            f"{_cell(100 * r['opt_share'] if r.get('opt_share') else None, '4.0f')}"
        )
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__)
        return 2
    root = Path(argv[0])
    log = root / "log.txt"
    if log.exists():
        print("stages:")
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("== ") and "(limit " not in line:  # not the command lines
                print("  " + line[3:])
    checks = root / "cuda_checks.txt"
    if checks.exists():
        text = checks.read_text(errors="replace")
        fails = [ln for ln in text.splitlines() if ln.startswith("FAIL")]
        last = text.strip().splitlines()[-1] if text.strip() else "(empty)"
        print(f"GPU correctness checks: {last}")
        for ln in fails:
            print("  " + ln[:200])
    rows, files = load_runs(root)
    if not rows:
        print(f"no results under {root}")
        return 1
    with open(root / "all.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["run", *COLUMNS], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    targets = evaluate_targets(rows)
    parts = ["# Targets (all runs together)\n", "| target | measured | verdict |", "|---|---|---|"]
    parts += [f"| {t} | {m} | {v} |" for t, m, v in targets]
    parts.append("")
    if checks.exists():
        parts.append("# GPU correctness checks\n\n```\n" + checks.read_text() + "```\n")
    for f in files:
        md = f.with_suffix(".md")
        if md.exists():
            parts.append(f"<!-- run {f.parent.name} -->\n" + md.read_text())
    (root / "summary.md").write_text("\n".join(parts))

    print()
    print("\n".join(table(rows)))
    print("\ntargets (all runs together):")
    for t, m, v in targets:
        print(f"  [{v}] {t}: {m}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
