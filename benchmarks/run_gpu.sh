#!/usr/bin/env bash
# The one prepared GPU run of the ModelBatch benchmark (issue 3). Run from the repository
# root on the GPU machine with $OUT set to an empty folder:
#
#     OUT=/some/empty/dir bash benchmarks/run_gpu.sh
#
# Needs python3 with torch (CUDA), matplotlib, nvidia-ml-py; modelbatch itself is used from
# src/ (PYTHONPATH), not installed. Sized to finish in under 8 minutes: every stage gets
# what is left of a global deadline, the most important first, and each benchmark rewrites
# its CSV/markdown after every cell, so a stage cut short still leaves its results.
# Afterwards copy $OUT to benchmarks/results/<date>-<device>/ and commit it.
set -u
: "${OUT:?set OUT to an output folder}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
BUDGET=${BUDGET_S:-460}            # seconds for everything below
START=$(date +%s)
LOG="$OUT/log.txt"

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

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
    timeout --signal=INT --kill-after=10 "$t" "$@" >>"$LOG" 2>&1
    echo "== $name: exit $? after $(( $(date +%s) - t0 )) s" | tee -a "$LOG"
}

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit \
        --format=csv || true
    $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
    $PY -c "import matplotlib, pynvml; print('matplotlib', matplotlib.__version__, 'nvml ok')" || true
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

BENCH=("$PY" -m modelbatch.cli bench --steps 10 --repeats 3 --warmup 3 --target-seconds 0.5)

# 1. Correctness on the GPU: CUDA graph (and compile + graph) against training alone.
stage checks 90 "$PY" benchmarks/cuda_checks.py --out "$OUT/cuda_checks.txt"
# 2. ResNet-8, both precisions, every method but compile (the headline target: N=256 bf16).
stage resnet8 150 "${BENCH[@]}" --arch resnet8 --models 1 16 64 256 --precision fp32 bf16 \
    --methods sequential recipe recipe-bf16params eager cudagraph --out "$OUT/resnet8"
# 2b. ResNet-8 bf16 with conv_layout="channels_last" (one channels_last grouped conv per
#     layer instead of vmap's NCHW one): the conv lever, eager and in a CUDA graph.
stage resnet8-cl 60 "${BENCH[@]}" --arch resnet8 --models 1 16 64 256 --precision bf16 \
    --methods sequential eager-cl cudagraph-cl --out "$OUT/resnet8-cl"
# 3. MLP, both precisions: launch-bound small N (CUDA graphs) to N=4096; opt share at 1024.
stage mlp 100 "${BENCH[@]}" --arch mlp --models 1 32 256 1024 4096 --precision fp32 bf16 \
    --methods sequential recipe eager cudagraph --out "$OUT/mlp"
# 4. One process per model on the same GPU (a fractional-GPU sweep), ResNet-8 bf16.
stage processes 50 "${BENCH[@]}" --arch resnet8 --models 4 16 --precision bf16 \
    --methods sequential processes --out "$OUT/resnet8-processes"
# 5. torch.compile (slow to compile: only the points that matter).
stage compile-mlp 100 "${BENCH[@]}" --arch mlp --models 1024 --precision bf16 \
    --methods sequential compile-opt compile-opt-cudagraph compile compile-cudagraph \
    --out "$OUT/mlp-compile"
stage compile-resnet8 90 "${BENCH[@]}" --arch resnet8 --models 256 --precision bf16 \
    --methods sequential compile --out "$OUT/resnet8-compile"

echo "== total $(( $(date +%s) - START )) s" | tee -a "$LOG"
$PY benchmarks/summarize.py "$OUT" | tee "$OUT/summary.txt"
