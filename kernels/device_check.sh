#!/usr/bin/env bash
# One prepared GPU session for the fused kernels (issue 6), under 9 minutes on an H100/H200:
#   1. environment (card, driver, torch, triton),
#   2. correctness of every Triton kernel in bf16 and fp32 against the torch references
#      (the fused head: both schedules, with and without main_grad accumulation),
#   3. bench_cross_entropy.py (loss; fused head: token and vocab schedules, each also with
#      main_grad, timed against the 3-GEMM floor, with extra memory beside its expectation),
#      bench_fused_linear_memory.py (the memory table of the head) and bench_ppl.py, all at
#      N=8192, H=4096, V=128256, bf16.
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

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    $PY -c 'import sys, torch, triton; print(sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())'
    $PY -c 'import megatron.core as m; print("megatron-core", m.__version__)' 2>&1 | tail -1
    $PY -c 'import liger_kernel; print("liger-kernel present")' 2>&1 | tail -1
    $PY -c 'import transformers; print("transformers", transformers.__version__)' 2>&1 | tail -1
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

status=0
timeout 150 $PY kernels/check_gpu.py --output "$OUT/gpu_correctness.md" \
    > "$OUT/check_gpu.log" 2>&1 || status=1
tail -5 "$OUT/check_gpu.log"
timeout 160 $PY kernels/bench_cross_entropy.py --output "$OUT/bench_cross_entropy.md" \
    > "$OUT/bench_cross_entropy.log" 2>&1 || status=1
cat "$OUT/bench_cross_entropy.md" 2> /dev/null || tail -30 "$OUT/bench_cross_entropy.log"
timeout 60 $PY kernels/bench_fused_linear_memory.py --output "$OUT/fused_linear_memory.md" \
    > "$OUT/bench_fused_linear_memory.log" 2>&1 || status=1
cat "$OUT/fused_linear_memory.md" 2> /dev/null || tail -30 "$OUT/bench_fused_linear_memory.log"
timeout 130 $PY kernels/bench_ppl.py --output "$OUT/bench_ppl.md" \
    > "$OUT/bench_ppl.log" 2>&1 || status=1
cat "$OUT/bench_ppl.md" 2> /dev/null || tail -30 "$OUT/bench_ppl.log"
echo "device_check: exit status $status (tables in $OUT)"
exit $status
