#!/usr/bin/env bash
# The GPU check: run once per session on the lent GPU machine (H100 / H200), well inside 8 minutes.
#   bash benchmarks/gpu_check.sh [OUT_DIR]      (default: $OUT, else benchmarks/results/gpu)
# Builds the project with CUDA, runs the GPU tests (and the CUDA ones under compute-sanitizer), runs
# the GPU benchmarks at N = 16384 tokens, V = 32000 and 128256, bf16 (fused_sppo_loss; and
# fused_linear_sppo_loss at H = 4096 against Liger-Kernel and cut-cross-entropy when their wheels were
# carried over and installed), writes CSV + logs under OUT_DIR, and prints a short table last.
# Commit what it wrote under benchmarks/results/ with the card's name.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-benchmarks/results/gpu}}
mkdir -p "$OUT_DIR"
status=0

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT_DIR/device.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT_DIR/device.txt"

echo "== build (SPPO_FAST_CUDA=ON)"
if ! SPPO_FAST_CUDA=ON timeout 240 pip install --no-build-isolation -e . > "$OUT_DIR/build.log" 2>&1; then
  tail -40 "$OUT_DIR/build.log"; exit 1
fi

echo "== GPU tests"
timeout 200 python -m pytest -q tests/test_triton.py tests/test_cuda.py tests/test_build.py -m "not slow" \
  > "$OUT_DIR/pytest.log" 2>&1 || status=1
tail -3 "$OUT_DIR/pytest.log"
if command -v compute-sanitizer >/dev/null 2>&1; then
  echo "== compute-sanitizer memcheck over the CUDA tests (small shapes)"
  timeout 150 compute-sanitizer --tool memcheck --error-exitcode 9 \
    python -m pytest -q tests/test_cuda.py -k "not full_size" > "$OUT_DIR/memcheck.log" 2>&1 || status=1
  grep -E "ERROR SUMMARY|passed|failed" "$OUT_DIR/memcheck.log" | tail -3
fi

echo "== benchmarks"
for V in 32000 128256; do
  timeout 150 python benchmarks/bench_fused_sppo.py --cuda --B 8 --T 1024 --V "$V" --dtype bfloat16 \
    --modes full --providers copy reference reference-compile triton cuda \
    --out "$OUT_DIR/fused_sppo_loss-bf16-V$V.csv" 2>&1 | tee "$OUT_DIR/bench-V$V.log" | tail -12 \
    || status=1
done

for V in 32000 128256; do
  timeout 120 python benchmarks/bench_fused_linear.py --cuda --B 8 --T 1024 --H 4096 --V "$V" --dtype bfloat16 \
    --modes full --out "$OUT_DIR/fused_linear_sppo_loss-bf16-V$V.csv" 2>&1 \
    | tee "$OUT_DIR/bench-linear-V$V.log" | tail -12 || status=1
done

echo "== summary"
python benchmarks/summarize.py "$OUT_DIR"/*.csv
exit $status
