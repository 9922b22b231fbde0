#!/usr/bin/env bash
# One prepared GPU session for the fused kernels (issue 6) and the training step, under 10 minutes
# on an H100/H200 (about 4 on an H200):
#   1. environment (card, driver, torch, triton),
#   2. correctness of every Triton kernel in bf16 and fp32 against the torch references
#      (the fused head: both schedules, with and without main_grad accumulation),
#   3. bench_cross_entropy.py (loss; fused head: token and vocab schedules, each also with
#      main_grad, timed against the 3-GEMM floor, with extra memory beside its expectation),
#      bench_fused_linear_memory.py (the memory table of the head) and bench_ppl.py, all at
#      N=8192, H=4096, V=128256, bf16 (bench_ppl's whole model at 4 and 32 layers),
#      kernels/tune_cross_entropy.py: where the loss's time goes, and the launch sweep,
#   4. benchmarks/train_throughput.py: the training step's tokens/s and MFU, unfused and with
#      --cross-entropy-fusion syne-linear.
# 8 files, the device tool's limit: seven tables and device_check.log (environment plus every
# script's output).
# Writes the tables and logs into $OUT (default: ./device_check_out). Installs nothing from
# the internet; if a .whl/ folder travels with the tree (e.g. megatron-core, liger-kernel
# wheels for Python 3.12), they are installed offline into /tmp/site first.
# Usage (repo root):  OUT=/some/dir bash kernels/device_check.sh
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(pwd)/device_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

if compgen -G ".whl/*.whl" > /dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi

LOG="$OUT/device_check.log"
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    $PY -c 'import sys, torch, triton; print(sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())'
    $PY -c 'import megatron.core as m; print("megatron-core", m.__version__)' 2>&1 | tail -1
    $PY -c 'import liger_kernel; print("liger-kernel present")' 2>&1 | tail -1
    $PY -c 'import transformers; print("transformers", transformers.__version__)' 2>&1 | tail -1
} > "$LOG" 2>&1
cat "$LOG"

# step NAME SECONDS COMMAND...: run one check under a time limit, its output appended to the
# one log (the device tool returns at most 8 files), and remember a failure.
status=0
step() {
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit} s) $(date -u +%T)" >> "$LOG"
    local t0=$SECONDS
    timeout "$limit" "$@" >> "$LOG" 2>&1 || { echo "=== $name FAILED (rc $?)" >> "$LOG"; status=1; }
    echo "=== $name took $((SECONDS - t0)) s" | tee -a "$LOG"
}
step check_gpu 120 $PY kernels/check_gpu.py --output "$OUT/gpu_correctness.md"
tail -3 "$OUT/gpu_correctness.md" 2> /dev/null
step bench_cross_entropy 150 $PY kernels/bench_cross_entropy.py --output "$OUT/bench_cross_entropy.md"
cat "$OUT/bench_cross_entropy.md" 2> /dev/null
step tune_cross_entropy 120 $PY kernels/tune_cross_entropy.py --output "$OUT/tune_cross_entropy.md"
cat "$OUT/tune_cross_entropy.md" 2> /dev/null
step bench_fused_linear_memory 50 $PY kernels/bench_fused_linear_memory.py \
    --output "$OUT/fused_linear_memory.md"
cat "$OUT/fused_linear_memory.md" 2> /dev/null
# Whole-model PPL scoring on 4 layers (the head's share is large) and on Llama-3-8B's 32.
step bench_ppl 100 $PY kernels/bench_ppl.py --layers 4 32 --output "$OUT/bench_ppl.md"
cat "$OUT/bench_ppl.md" 2> /dev/null
# Training step of pretrain_llama3_syne.py (issue 2's MFU), unfused loss and the fused head.
step train_native 70 $PY benchmarks/train_throughput.py --output "$OUT/train_throughput.md"
cat "$OUT/train_throughput.md" 2> /dev/null
step train_syne_linear 50 $PY benchmarks/train_throughput.py --models llama3-1b \
    --cross-entropy-fusion syne-linear --output "$OUT/train_throughput_syne_linear.md"
cat "$OUT/train_throughput_syne_linear.md" 2> /dev/null
echo "device_check: exit status $status (tables and device_check.log in $OUT)"
exit $status
