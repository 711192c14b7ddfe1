#!/usr/bin/env bash
# The GPU check: run once per session on the lent GPU machine (H100 / H200); it stops starting new
# steps after BUDGET seconds (default 540), so that the whole run stays inside the 600 s of one device call.
#   bash benchmarks/gpu_check.sh [OUT_DIR]      (default: $OUT, else benchmarks/results/gpu)
# In order: build with CUDA; the tests that use the GPU; DeBERTa-v3-large attention at L = 1024, 2048
# and 4096 against Hugging Face's eager attention and FlashDeBERTa; PairRM ranking against LLM-Blender
# with a sweep of the bucket budget, and again at another attention launch; a torch.profiler table of
# the ranking; three SPPO iterations on the GPU; fused_linear_sppo_loss at N = 16384, H = 4096,
# V = 32000, bf16, against the three GEMMs, the eager reference, Liger-Kernel and cut-cross-entropy
# when their wheels were carried over, its profile, a sweep of its slabs and V = 128256;
# fused_sppo_loss (N = 16384, bf16); the CUDA tests under compute-sanitizer memcheck. The CSVs, profiles and logs are
# bundled after every step, however the script ends, into OUT_DIR/gpu_check.tar.gz, with summary.txt
# beside it: the device tool brings back at most 8 files. A short table is printed last. Commit the
# CSVs under benchmarks/results/ with the card's name.
set -uo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-${OUT:-benchmarks/results/gpu}}
BUDGET=${BUDGET:-540}
# the image may have python3 only; every step below says python
if ! command -v python >/dev/null 2>&1; then
  mkdir -p /tmp/pyshim && ln -sf "$(command -v python3)" /tmp/pyshim/python && export PATH=/tmp/pyshim:$PATH
fi
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

# step NAME LIMIT CMD...: run CMD with at most LIMIT seconds, never past the budget; with STEPS set
# (a bash regex: escape the parentheses of names such as "(#5)"), only the steps whose names match it
# run (a second, shorter call in one session)
step() {
  local name=$1 limit=$2; shift 2
  if [ -n "${STEPS:-}" ] && ! [[ "$name" =~ $STEPS ]]; then return; fi
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
  python -m pip install -q --no-index --no-deps "${WHEELS:-wheels}"/*.whl > "$OUT_DIR/wheels.log" 2>&1 \
    || echo "   some carried wheels did not install (see wheels.log)"
fi

echo "== build (SPPO_FAST_CUDA=ON)"
# --no-deps: pip must not try to fetch a requirement; the check below names what is missing
if ! SPPO_FAST_CUDA=ON timeout 240 python -m pip install --no-build-isolation --no-deps -e . > "$OUT_DIR/build.log" 2>&1; then
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

# The steps run in the order of what matters most (below): a step that would pass the budget is cut
# short, and the lower ones are skipped.
bench_linear() {  # V [PROVIDERS...]
  local V=$1; shift
  python benchmarks/bench_fused_linear.py --cuda --B 8 --T 1024 --H 4096 --V "$V" --dtype bfloat16 \
    --modes full ${1:+--providers "$@"} --out "$OUT_DIR/fused_linear_sppo_loss-bf16-V$V.csv" \
    > "$OUT_DIR/bench-linear-V$V.log" 2>&1
  local s=$?; tail -14 "$OUT_DIR/bench-linear-V$V.log"; return $s
}
bench_sppo() {  # V PROVIDERS...
  local V=$1; shift
  python benchmarks/bench_fused_sppo.py --cuda --B 8 --T 1024 --V "$V" --dtype bfloat16 --modes full \
    --providers "$@" --out "$OUT_DIR/fused_sppo_loss-bf16-V$V.csv" > "$OUT_DIR/bench-sppo-V$V.log" 2>&1
  local s=$?; tail -8 "$OUT_DIR/bench-sppo-V$V.log"; return $s
}
export -f bench_sppo bench_linear
export OUT_DIR PYTHONUNBUFFERED=1

# The order follows what the last GPU session (H100, 2026-11-27) left open: its fixes and the attention
# kernel rewritten since (the tests), then what closes #7 and measures #6 with that kernel (the
# attention, the ranking twice, the ranking's profile), then the pipeline, #5 and the rest (the last
# call ran out of its 540 s before the attention step, and needed a second call). The attention
# step times the default launch (64x64w4, 3 stages: 16-25 instructions a score in Triton 3.6's sm_90
# build at 168 registers, three programs an SM, against 59 at 230 registers, two, for the kernel
# timed on 2026-11-27) beside one and two stages, a narrower tile and a wider one.
XDIST=$(python -c "import xdist" 2>/dev/null && echo "-n 8")
step "GPU tests" 150 sh -c "SPPO_FAST_GPU_TESTS_ONLY=1 python -m pytest -q $XDIST -m 'not slow' -rfEs ${TESTS:-tests} > '$OUT_DIR/pytest.log' 2>&1; \
  s=\$?; grep -E '^(FAILED|ERROR)' '$OUT_DIR/pytest.log' | head -15; tail -2 '$OUT_DIR/pytest.log'; exit \$s"
step "DeBERTa attention, large shapes, bf16 (#7)" 90 sh -c "TRITON_PRINT_AUTOTUNING=1 python benchmarks/bench_deberta_attention.py --cuda --model large --launches 64x64w4s1 64x64w4s2 64x32w4 128x64w8 \
  --out '$OUT_DIR/deberta_attention-large-cuda.csv' > '$OUT_DIR/bench-attention.log' 2>&1; s=\$?; tail -26 '$OUT_DIR/bench-attention.log'; exit \$s"
# LLM-Blender at batch size 1 (the yardstick of the scores), the engine at its default and three other
# budgets, then LLM-Blender's batch size 4 (its best, 1.04 prompts/s on the H100)
step "PairRM ranking, DeBERTa-v3-large shapes (#6, #7)" 150 sh -c "python benchmarks/bench_pairrm.py --cuda --model large \
  --prompts 32 --blender-prompts 8 --blender-batch-sizes 1 4 \
  --providers llm-blender sppo-fast sppo-fast-transposed sppo-fast-autotune \
  --sweep-budgets 16777216 33554432 134217728 --out '$OUT_DIR/pairrm-large-cuda.csv' > '$OUT_DIR/bench-pairrm.log' 2>&1; \
  s=\$?; tail -12 '$OUT_DIR/bench-pairrm.log'; exit \$s"
# a padded batch at a PairRM pair's length, as the ranker's buckets: the key lengths (the default)
# against the loaded key mask, and two launches with more programs an SM (one stage: four in Triton
# 3.9, three in 3.6; 64 x 32: four)
step "DeBERTa attention, padded batch of 4, L=1350 (#6)" 40 sh -c "python benchmarks/bench_deberta_attention.py --cuda \
  --model large --batch 4 --padded --lengths 1350 --providers hf triton triton-general-mask --launches 64x64w4s1 64x32w4 \
  --out '$OUT_DIR/deberta_attention-large-b4-padded-cuda.csv' > '$OUT_DIR/bench-attention-b4.log' 2>&1; s=\$?; \
  tail -8 '$OUT_DIR/bench-attention-b4.log'; exit \$s"
# the ranking again with the narrower tile (four programs an SM, at more instructions): whether
# occupancy or instructions bound the attention inside the whole forward
step "PairRM ranking, attention launch 64x32w4 (#6)" 45 sh -c "SPPO_FAST_ATTN_LAUNCH=64x32w4 python benchmarks/bench_pairrm.py \
  --cuda --model large --prompts 32 --providers sppo-fast --out '$OUT_DIR/pairrm-large-cuda-launch64x32w4.csv' \
  > '$OUT_DIR/bench-pairrm-64x32w4.log' 2>&1; s=\$?; tail -3 '$OUT_DIR/bench-pairrm-64x32w4.log'; exit \$s"
step "profile PairRM ranking" 60 sh -c "python benchmarks/profile_gpu.py pairrm \
  --out '$OUT_DIR/profile-pairrm.txt' > '$OUT_DIR/profile-pairrm.log' 2>&1; s=\$?; sed -n 4,14p '$OUT_DIR/profile-pairrm.txt'; exit \$s"
step "three SPPO iterations on the GPU (tiny policy, tiny PairRM)" 45 sh -c "python -m sppo_fast demo --quiet \
  --set runs_dir=/tmp/gpu_runs ranker=pairrm-tiny > '$OUT_DIR/demo.log' 2>&1; s=\$?; tail -6 '$OUT_DIR/demo.log'; exit \$s"
step "fused_linear_sppo_loss V=32000 (#5)" 125 bash -c "bench_linear 32000 ${LINEAR_32000:-}"
# what the memory bought: each provider's loss and gradients against a float64 truth, as a multiple of
# the eager bf16 reference's error (cut-cross-entropy sums both gradients in bf16 across blocks)
step "fused_linear_sppo_loss accuracy V=32000 (#5)" 60 sh -c "python benchmarks/accuracy_fused_linear.py --cuda \
  --B 8 --T 1024 --H 4096 --V 32000 --dtype bfloat16 --out '$OUT_DIR/fused_linear_sppo_loss-accuracy-bf16-V32000.csv' \
  > '$OUT_DIR/accuracy-linear.log' 2>&1; s=\$?; tail -8 '$OUT_DIR/accuracy-linear.log'; exit \$s"
step "profile fused_linear_sppo_loss (recompute) V=32000" 40 sh -c "python benchmarks/profile_gpu.py linear \
  --out '$OUT_DIR/profile-linear.txt' > '$OUT_DIR/profile-linear.log' 2>&1; s=\$?; sed -n 4,14p '$OUT_DIR/profile-linear.txt'; exit \$s"
# the vocabulary pass's slabs (recompute mode, #5's default): the widest slab's budget (64 MiB by
# default: 2048 columns at N = 16384, 26 slabs) and the narrowest slab, one cuda row each
step "fused_linear_sppo_loss slab sweep" 80 bash -c "for o in '--vocab-pass-mib 256' '--vocab-pass-mib 1024' \
  '--vocab-pass-mib 1024 --min-slab 512'; do python benchmarks/bench_fused_linear.py --cuda --B 8 --T 1024 --H 4096 \
  --V 32000 --dtype bfloat16 --modes full --providers cuda \$o --out \"$OUT_DIR/fused_linear_sppo_loss-bf16-V32000-slabs\$(echo \$o | tr -dc 0-9).csv\" \
  2>&1 | grep -E '^  cuda|^fused' || exit 1; done"
step "fused_linear_sppo_loss V=128256 (#5)" 100 bash -c "bench_linear 128256 ${LINEAR_128256:-gemm3 cuda cce cuda-accumulate liger}"
step "fused_sppo_loss V=32000" 50 bash -c "bench_sppo 32000 copy reference triton cuda reference-compile"
step "fused_sppo_loss V=128256" 60 bash -c "bench_sppo 128256 copy reference triton cuda"
if command -v compute-sanitizer >/dev/null 2>&1; then
  step "compute-sanitizer memcheck (CUDA tests, small shapes)" 90 sh -c "compute-sanitizer --tool memcheck \
    --error-exitcode 9 python -m pytest -q tests/test_cuda.py -k 'not full_size' > '$OUT_DIR/memcheck.log' 2>&1; \
    s=\$?; grep -E 'ERROR SUMMARY|passed|failed' '$OUT_DIR/memcheck.log' | tail -3; exit \$s"
fi

echo "== summary (${SECONDS}s)"
python benchmarks/summarize.py "$OUT_DIR"/*.csv
exit $status
