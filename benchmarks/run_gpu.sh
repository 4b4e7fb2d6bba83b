#!/usr/bin/env bash
# The one prepared GPU run of the ModelBatch benchmark (issue 3). Run from the repository
# root on the GPU machine with $OUT set to an empty folder:
#
#     OUT=/some/empty/dir bash benchmarks/run_gpu.sh
#
# Needs python3 with torch (CUDA); matplotlib (plots) and nvidia-ml-py (GPU utilisation) are
# used when present. modelbatch itself is used from src/ (PYTHONPATH), not installed.
#
# Time: every stage gets `timeout` with the smaller of its cap and what is left of a global
# budget (BUDGET_S, default 450 s), most important first; a stage with under 30 s left is
# skipped. Each benchmark rewrites its CSV/markdown/JSON after every cell and writes its
# plots when stopped (SIGTERM), so a stage cut short keeps its results. Summary and packing
# take about 10 s more: call it with a limit of at least BUDGET_S + 60 s.
#
# Output: everything is written under a scratch folder ($WORK, outside $OUT) and packed
# after every stage into $OUT/results.tar.gz; $OUT also gets small copies of summary.txt,
# summary.md, all.csv, cuda_checks.txt, env.txt and the tail of log.txt: at most 7 files,
# no sub-folders (the device tool returns at most 8 files of 16 MiB). Unpack with
# `tar -xzf results.tar.gz -C benchmarks/results/<date>-<device>/` and commit that folder.
#
# CPU dry run of every command line (tiny sizes; the GPU-only methods are recorded as
# skipped):  BENCH_EXTRA="--device cpu --models 1 2 --batch-size 4 --steps 2 --repeats 1
#            --warmup 1" BUDGET_S=900 OUT=/tmp/dry bash benchmarks/run_gpu.sh
set -u
: "${OUT:?set OUT to an output folder}"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/mb-bench.XXXXXX")}
mkdir -p "$WORK"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
BUDGET=${BUDGET_S:-450}
read -r -a EXTRA <<<"${BENCH_EXTRA:-}"
START=$(date +%s)
LOG="$WORK/log.txt"
: >"$LOG"

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

pack() {  # $WORK -> $OUT/results.tar.gz (+ small copies); never more than 7 files in $OUT
    local tmp="$WORK.tar.gz"
    tar -czf "$tmp" -C "$WORK" . 2>/dev/null
    if (( $(stat -c %s "$tmp") > 15 * 1024 * 1024 )); then  # a runaway log: leave it out
        tar -czf "$tmp" -C "$WORK" --exclude=./log.txt . 2>/dev/null
    fi
    mv -f "$tmp" "$OUT/results.tar.gz"
    local f
    for f in summary.txt summary.md all.csv cuda_checks.txt env.txt; do
        [[ -f "$WORK/$f" ]] && head -c 4000000 "$WORK/$f" >"$OUT/$f"
    done
    tail -c 4000000 "$LOG" >"$OUT/log.txt"
}

stage() {  # stage NAME CAP_SECONDS COMMAND...
    local name=$1 cap=$2; shift 2
    local rem; rem=$(left)
    if (( rem < 30 )); then
        echo "== $name: skipped, $rem s left of the budget" | tee -a "$LOG"
        return
    fi
    local t=$(( cap < rem ? cap : rem ))
    echo "== $name (limit ${t}s): $*" | tee -a "$LOG"
    local t0; t0=$(date +%s)
    timeout --signal=TERM --kill-after=20 "$t" "$@" >>"$LOG" 2>&1
    local rc=$?
    local how="exit $rc"
    (( rc == 124 || rc == 137 )) && how="cut at the time limit (exit $rc)"
    echo "== $name: $how after $(( $(date +%s) - t0 )) s" | tee -a "$LOG"
    pack
}

finish() {
    trap - EXIT INT TERM
    echo "== total $(( $(date +%s) - START )) s" | tee -a "$LOG"
    timeout 60 "$PY" benchmarks/summarize.py "$WORK" >"$WORK/summary.txt" 2>&1
    pack
    cat "$WORK/summary.txt"
    echo "results: $OUT/results.tar.gz (scratch folder $WORK)"
}
trap finish EXIT
trap 'exit 130' INT TERM

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,power.limit,temperature.gpu \
        --format=csv || true
    nvidia-smi --query-compute-apps=pid,used_memory --format=csv || true
    $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
    $PY -c "import matplotlib; print('matplotlib', matplotlib.__version__)" 2>&1 | tail -1
    $PY -c "import pynvml; pynvml.nvmlInit(); print('nvml ok, driver', pynvml.nvmlSystemGetDriverVersion())" 2>&1 | tail -1
    nproc; free -g 2>/dev/null | head -2
    git rev-parse HEAD 2>/dev/null || true
    git status --short 2>/dev/null | head -20 || true
    echo "BENCH_EXTRA=${BENCH_EXTRA:-} BUDGET_S=$BUDGET"
} >"$WORK/env.txt" 2>&1
cat "$WORK/env.txt"

BENCH=("$PY" -m modelbatch.cli bench --steps 200 --repeats 3 --warmup 3 --target-seconds 0.25)

# 1. Correctness on the GPU: the CUDA graph against training alone (seconds).
stage checks 60 "$PY" benchmarks/cuda_checks.py --part graph --out "$WORK/cuda_checks.txt"
# 2. ResNet-8, bf16 first (the headline target: N=256 bf16), then fp32. Sequential fp32
#    always runs first: the reference of every speedup.
stage resnet8 130 "${BENCH[@]}" --arch resnet8 --models 1 16 64 256 --precision bf16 fp32 \
    --methods sequential recipe recipe-bf16params eager cudagraph --out "$WORK/resnet8" \
    ${EXTRA[@]+"${EXTRA[@]}"}
# 2b. ResNet-8 bf16 with conv_layout="channels_last" (one channels_last grouped conv per
#     layer instead of vmap's NCHW one), eager and in a CUDA graph, up to N=512.
stage resnet8-cl 70 "${BENCH[@]}" --arch resnet8 --models 1 16 64 256 512 --precision bf16 \
    --methods sequential eager-cl cudagraph-cl --out "$WORK/resnet8-cl" ${EXTRA[@]+"${EXTRA[@]}"}
# 3. MLP, both precisions: launch-bound small N (CUDA graphs) to N=4096; opt share at 1024.
stage mlp 90 "${BENCH[@]}" --arch mlp --models 1 32 256 1024 4096 --precision bf16 fp32 \
    --methods sequential recipe eager cudagraph --out "$WORK/mlp" ${EXTRA[@]+"${EXTRA[@]}"}
# 4. One process per model on the same GPU (a fractional-GPU sweep), ResNet-8 bf16.
stage processes 70 "${BENCH[@]}" --arch resnet8 --models 4 16 --precision bf16 \
    --methods sequential processes --out "$WORK/resnet8-processes" ${EXTRA[@]+"${EXTRA[@]}"}
# 5. torch.compile (slow to compile: only the points that matter), with its checks.
stage compile-mlp 90 "${BENCH[@]}" --arch mlp --models 1024 --precision bf16 \
    --methods sequential compile-opt compile-opt-cudagraph compile compile-cudagraph \
    --out "$WORK/mlp-compile" ${EXTRA[@]+"${EXTRA[@]}"}
stage compile-resnet8 80 "${BENCH[@]}" --arch resnet8 --models 256 --precision bf16 \
    --methods sequential compile --out "$WORK/resnet8-compile" ${EXTRA[@]+"${EXTRA[@]}"}
# 6. torch.compile on the GPU equals eager (also tested on the CPU by tests/test_speed.py).
stage checks-compile 60 "$PY" benchmarks/cuda_checks.py --part compile --append \
    --out "$WORK/cuda_checks.txt"
