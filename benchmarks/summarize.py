"""Summarise a benchmark output folder (what benchmarks/run_gpu.sh wrote): merge every
``*/bench-*.csv`` into ``all.csv``, join the markdown reports into ``summary.md`` and print
a short table (best ModelBatch method per point against the baselines) and the targets.

    python3 benchmarks/summarize.py OUT_DIR
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

BASELINES = ("sequential", "recipe", "recipe-bf16params", "processes")


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__)
        return 2
    root = Path(argv[0])
    files = sorted(root.glob("*/bench-*.csv"))
    rows: list[dict[str, str]] = []
    fields: list[str] = []
    for f in files:
        with open(f, newline="") as fh:
            reader = csv.DictReader(fh)
            fields = list(reader.fieldnames or fields)
            for r in reader:
                r["run"] = f.parent.name
                rows.append(r)
    if not rows:
        print(f"no results under {root}")
        return 1
    with open(root / "all.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["run", *fields])
        w.writeheader()
        w.writerows(rows)
    parts = [
        f"<!-- {f.parent.name} -->\n" + f.with_suffix(".md").read_text()
        for f in files
        if f.with_suffix(".md").exists()
    ]
    checks = root / "cuda_checks.txt"
    if checks.exists():
        parts.insert(0, "# GPU correctness checks\n\n```\n" + checks.read_text() + "```\n")
    (root / "summary.md").write_text("\n\n".join(parts))

    print(
        f"{'run':18s} {'arch':8s} {'prec':5s} {'method':18s} {'N':>5s} "
        f"{'img/s':>9s} {'vs seq':>7s} {'peak GiB':>8s} {'opt%':>5s}"
    )
    for r in rows:
        if r["status"] != "ok":
            print(
                f"{r['run']:18s} {r['arch']:8s} {r['precision']:5s} {r['method']:18s} "
                f"{r['n_models']:>5s} {r['status']}: {r['note'][:60]}"
            )
            continue
        ips = float(r["model_images_per_s"])
        sp = r["speedup_vs_sequential"]
        mem = r["peak_mem_bytes"]
        opt = r["opt_share"]
        print(
            f"{r['run']:18s} {r['arch']:8s} {r['precision']:5s} {r['method']:18s} "
            f"{r['n_models']:>5s} {ips / 1e6:8.3f}M {(float(sp) if sp else 0):6.1f}x "
            f"{(float(mem) / 2**30 if mem else 0):8.2f} "
            f"{(f'{100 * float(opt):.0f}' if opt else '-'):>5s}"
        )
    for f in files:
        text = f.with_suffix(".md").read_text() if f.with_suffix(".md").exists() else ""
        if "## Targets" in text:
            print(f"\n[{f.parent.name}] targets")
            for line in text.split("## Targets", 1)[1].splitlines()[4:]:
                if line.startswith("|"):
                    print("  " + " ".join(c.strip() for c in line.strip("|").split("|")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
