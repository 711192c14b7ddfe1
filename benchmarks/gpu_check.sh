#!/usr/bin/env bash
# The GPU check: run once per session on the lent GPU machine (H100 / H200); it stops starting new
# steps after BUDGET seconds (default 420) so that the whole run stays inside 8 minutes.
#   bash benchmarks/gpu_check.sh [OUT_DIR]      (default: $OUT, else benchmarks/results/gpu)
# In order of priority: build with CUDA; the GPU tests (Triton and CUDA, full sizes); benchmarks of
# fused_sppo_loss (N = 16384, bf16, V = 32000 then 128256: device copy, eager reference,
# torch.compile of it, triton, cuda) and fused_linear_sppo_loss (H = 4096; torch, triton, cuda in both
# weight_grad modes, and
# Liger-Kernel / cut-cross-entropy when their wheels were carried over and installed); the CUDA tests
# under compute-sanitizer memcheck. The CSVs and logs (about 20 files) are bundled at exit, however
# the script ends, into OUT_DIR/gpu_check.tar.gz, with summary.txt beside it: the device tool brings
# back at most 8 files. A short table is printed last. Commit the CSVs under benchmarks/results/
# with the card's name.
set -uo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-${OUT:-benchmarks/results/gpu}}
BUDGET=${BUDGET:-420}
mkdir -p "$DEST"
DEST=$(cd "$DEST" && pwd)
OUT_DIR=$(mktemp -d /tmp/gpu_check.XXXXXX)  # every step's files; bundled into DEST at exit
status=0
bundle() {  # after every step too: a run killed outright still leaves what the finished steps wrote
  python benchmarks/summarize.py "$OUT_DIR"/*.csv > "$OUT_DIR/summary.txt" 2>&1
  cp "$OUT_DIR/summary.txt" "$DEST/summary.txt"
  tar czf "$DEST/.gpu_check.tar.gz.tmp" -C "$OUT_DIR" . && mv "$DEST/.gpu_check.tar.gz.tmp" "$DEST/gpu_check.tar.gz"
}
trap 'bundle; echo "bundled into $DEST/gpu_check.tar.gz"; rm -rf "$OUT_DIR"' EXIT

# step NAME LIMIT CMD...: run CMD with at most LIMIT seconds, never past the budget
step() {
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - SECONDS))
  if [ "$left" -lt 20 ]; then echo "== $name: skipped (budget spent)"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (<= ${limit}s)"
  timeout "$limit" "$@" || { echo "   $name: failed or timed out"; status=1; }
  bundle
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT_DIR/device.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT_DIR/device.txt"

# What the machine cannot download (no network): wheels carried over in ./wheels, fetched here by
# benchmarks/gpu_wheels.sh. --no-deps: one unsatisfiable requirement must not block the others.
if [ -d "${WHEELS:-wheels}" ]; then
  pip install -q --no-index --no-deps "${WHEELS:-wheels}"/*.whl > "$OUT_DIR/wheels.log" 2>&1 \
    || echo "   some carried wheels did not install (see wheels.log)"
fi

echo "== build (SPPO_FAST_CUDA=ON)"
# --no-deps: pip must not try to fetch a requirement; the check below names what is missing
if ! SPPO_FAST_CUDA=ON timeout 240 pip install --no-build-isolation --no-deps -e . > "$OUT_DIR/build.log" 2>&1; then
  tail -40 "$OUT_DIR/build.log"; exit 1
fi
python - <<'PY' | tee -a "$OUT_DIR/device.txt"
import importlib
mods = ["torch", "numpy", "transformers", "tokenizers", "datasets", "tqdm", "yaml", "matplotlib", "triton",
        "llm_blender", "liger_kernel", "cut_cross_entropy", "flashdeberta"]
missing = []
for m in mods:
    try:
        if m == "llm_blender":
            from sppo_fast import llm_blender_compat
            llm_blender_compat.import_llm_blender()
        else:
            importlib.import_module(m)
    except Exception as exc:  # noqa: BLE001 - report every failure, run what can run
        missing.append(f"{m} ({type(exc).__name__}: {str(exc)[:80]})")
print("not importable:", "; ".join(missing) if missing else "none")
PY

step "GPU tests" 150 sh -c "python -m pytest -q tests/test_triton.py tests/test_cuda.py tests/test_logprobs.py tests/test_linear.py tests/test_build.py tests/test_pairrm.py tests/test_deberta_attention.py tests/test_train.py tests/test_pipeline.py \
  -m 'not slow' > '$OUT_DIR/pytest.log' 2>&1; s=\$?; tail -3 '$OUT_DIR/pytest.log'; exit \$s"

bench_sppo() {  # V PROVIDERS...
  local V=$1; shift
  python benchmarks/bench_fused_sppo.py --cuda --B 8 --T 1024 --V "$V" --dtype bfloat16 --modes full \
    --providers "$@" --out "$OUT_DIR/fused_sppo_loss-bf16-V$V.csv" > "$OUT_DIR/bench-sppo-V$V.log" 2>&1
  local s=$?; tail -8 "$OUT_DIR/bench-sppo-V$V.log"; return $s
}
bench_linear() {  # V
  python benchmarks/bench_fused_linear.py --cuda --B 8 --T 1024 --H 4096 --V "$1" --dtype bfloat16 \
    --modes full --out "$OUT_DIR/fused_linear_sppo_loss-bf16-V$1.csv" > "$OUT_DIR/bench-linear-V$1.log" 2>&1
  local s=$?; tail -8 "$OUT_DIR/bench-linear-V$1.log"; return $s
}
export -f bench_sppo bench_linear
export OUT_DIR

step "fused_sppo_loss V=32000" 120 bash -c "bench_sppo 32000 copy reference reference-compile triton cuda"
step "fused_linear_sppo_loss V=32000" 120 bash -c "bench_linear 32000"
step "DeBERTa attention, large shapes, bf16" 60 sh -c "python benchmarks/bench_deberta_attention.py --cuda --model large \
  --out '$OUT_DIR/deberta_attention-large-cuda.csv' > '$OUT_DIR/bench-attention.log' 2>&1; s=\$?; tail -12 '$OUT_DIR/bench-attention.log'; exit \$s"
step "PairRM ranking, DeBERTa-v3-large shapes" 120 sh -c "python benchmarks/bench_pairrm.py --cuda --model large \
  --prompts 32 --blender-prompts 16 --out '$OUT_DIR/pairrm-large-cuda.csv' > '$OUT_DIR/bench-pairrm.log' 2>&1; \
  s=\$?; tail -8 '$OUT_DIR/bench-pairrm.log'; exit \$s"
step "fused_sppo_loss V=128256" 90 bash -c "bench_sppo 128256 copy reference triton cuda"
step "fused_linear_sppo_loss V=128256" 120 bash -c "bench_linear 128256"
# the GPU chunk budget (default 256 MiB of bf16 logits: ~4200 tokens at V = 32000) against smaller
# and larger chunks: time and peak memory of the cuda provider alone (bf16's default weight_grad,
# the vocabulary pass, whose slabs fill the same budget)
step "fused_linear_sppo_loss chunk sweep" 60 bash -c "for c in 1024 16384; do python benchmarks/bench_fused_linear.py \
  --cuda --B 8 --T 1024 --H 4096 --V 32000 --dtype bfloat16 --modes full --providers cuda --chunk-tokens \$c \
  --out '$OUT_DIR/fused_linear_sppo_loss-bf16-V32000-chunk'\$c.csv > '$OUT_DIR/bench-linear-chunk'\$c.log 2>&1 \
  || exit 1; grep -E '^  cuda' '$OUT_DIR/bench-linear-chunk'\$c.log || exit 1; done"
if command -v compute-sanitizer >/dev/null 2>&1; then
  step "compute-sanitizer memcheck (CUDA tests, small shapes)" 120 sh -c "compute-sanitizer --tool memcheck \
    --error-exitcode 9 python -m pytest -q tests/test_cuda.py tests/test_logprobs.py::test_backward_on_a_vocabulary_slice_cuda -k 'not full_size' > '$OUT_DIR/memcheck.log' 2>&1; \
    s=\$?; grep -E 'ERROR SUMMARY|passed|failed' '$OUT_DIR/memcheck.log' | tail -3; exit \$s"
fi

echo "== summary (${SECONDS}s)"
python benchmarks/summarize.py "$OUT_DIR"/*.csv
exit $status
