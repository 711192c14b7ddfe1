#!/usr/bin/env bash
# The GPU check, for the lent GPU machine (H100 / H200): build with CUDA, then the steps below in the
# order of what matters most. A step starts only if its whole limit (plus 5 s to kill it) fits before
# BUDGET seconds from the script's start (default 560, setup included); one that does not fit is skipped
# with the reason logged (never cut short), and the later, shorter ones may still run.
#
# One session (15 minutes of device time, one call <= 600 s, the machine goes back 30 s after a call):
#   here:       bash benchmarks/gpu_wheels.sh
#   1st call:   run  command="bash benchmarks/gpu_check.sh"  carry=["wheels"]  timeout_s=590
#   2nd call, at once (the machine must still be warm), with timeout_s = status's budget_left_s - 30 and
#   BUDGET = that timeout_s - 30, e.g. 270 s left:
#               run  command="STEPS=pending SKIP_BUILD=1 BUDGET=210 bash benchmarks/gpu_check.sh"  carry=["wheels"]  timeout_s=240
#
# STEPS: empty = every step; "pending" = what the last call on this machine did not run (it keeps the
# list in /tmp/gpu_check.pending; without it, every step after the first call's four); else step ids
# separated by spaces (a value that is no list of ids is a bash regex on the step names, the old form).
# The summary names the pending ids and the exact command for them.
# SKIP_BUILD=1: no wheel install, build or import check, where the warm machine already has sppo_fast's
# CUDA build (checked: on a fresh machine it builds anyway, and says so).
# TESTS (pytest paths), LINEAR_32000 and LINEAR_128256 (provider lists) narrow a step.
#
# The steps (id, limit in seconds), in priority order:
#   tests 140         the tests that use the GPU
#   linear32k 110     fused_linear_sppo_loss, N = 16384, H = 4096, V = 32000, bf16 (#5): the three GEMMs,
#                     ours (cuda, cuda-acc50, cuda-accumulate, triton), the eager reference, Liger-Kernel
#                     and cut-cross-entropy where their wheels were carried
#   attn 75           DeBERTa-v3-large attention at L = 1024, 2048, 4096 against HF eager and FlashDeBERTa (#7)
#   rank 130          PairRM ranking against LLM-Blender, with a sweep of the bucket budget (#6, #7)
#     (first call's four: 455 s of limits + 20 s of kill margins + ~60-85 s of setup <= 560)
#   acc32k 60         fused_linear_sppo_loss's errors against a float64 truth at the #5 shape
#   attn_b4 40        the attention on a padded batch of 4 at L = 1350, as the ranker runs it (#6)
#   rank_64x32 45     the ranking again at the 64x32w4 attention launch (#6)
#   prof_rank 60      torch.profiler table of the ranking
#   prof_linear 40    torch.profiler table of fused_linear_sppo_loss (recompute), V = 32000
#   slabs 80          the vocabulary pass's slab sweep (cuda, V = 32000)
#   linear128k 100    fused_linear_sppo_loss at V = 128256
#   demo 45           three SPPO iterations (tiny policy, tiny PairRM); its summary.json is bundled
#   sppo32k 45        fused_sppo_loss, N = 16384, V = 32000, bf16
#   sppo128k 60       the same at V = 128256
#   memcheck 90       the CUDA tests under compute-sanitizer memcheck (where it is installed)
#   sppo_compile 120  fused_sppo_loss's torch.compile'd reference, V = 32000 (50 s was too little on the H100)
#   (all: 1240 s of limits)
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]      (default: $OUT, else benchmarks/results/gpu)
# The CSVs, profiles and logs are bundled after every step, however the script ends, into
# OUT_DIR/gpu_check.tar.gz, with summary.txt beside it (the step table, warnings, the tables of the
# CSVs): the device tool brings back at most 8 files. Commit the CSVs under benchmarks/results/ with
# the card's name.
set -uo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-${OUT:-benchmarks/results/gpu}}
BUDGET=${BUDGET:-560}
SKIP_BUILD=${SKIP_BUILD:-0}
PENDING_FILE=${PENDING_FILE:-/tmp/gpu_check.pending}
FIRST_CALL="tests linear32k attn rank"
PLAN=(  # id|limit (s)|name, in priority order
  "tests|140|GPU tests (pytest, GPU-only)"
  "linear32k|110|fused_linear_sppo_loss V=32000 (#5)"
  "attn|75|DeBERTa attention, large shapes, bf16 (#7)"
  "rank|130|PairRM ranking, DeBERTa-v3-large shapes (#6, #7)"
  "acc32k|60|fused_linear_sppo_loss accuracy V=32000 (#5)"
  "attn_b4|40|DeBERTa attention, padded batch of 4, L=1350 (#6)"
  "rank_64x32|45|PairRM ranking, attention launch 64x32w4 (#6)"
  "prof_rank|60|profile PairRM ranking"
  "prof_linear|40|profile fused_linear_sppo_loss (recompute) V=32000"
  "slabs|80|fused_linear_sppo_loss slab sweep"
  "linear128k|100|fused_linear_sppo_loss V=128256 (#5)"
  "demo|45|three SPPO iterations on the GPU (tiny policy, tiny PairRM)"
  "sppo32k|45|fused_sppo_loss V=32000"
  "sppo128k|60|fused_sppo_loss V=128256"
  "memcheck|90|compute-sanitizer memcheck (CUDA tests, small shapes)"
  "sppo_compile|120|fused_sppo_loss V=32000, torch.compile'd reference"
)
IDS=(); declare -A LIMIT NAME STATUS
for e in "${PLAN[@]}"; do
  IFS='|' read -r id lim nm <<<"$e"; IDS+=("$id"); LIMIT[$id]=$lim; NAME[$id]=$nm
done

# the image may have python3 only; every step below says python
if ! command -v python >/dev/null 2>&1; then
  mkdir -p /tmp/pyshim && ln -sf "$(command -v python3)" /tmp/pyshim/python && export PATH=/tmp/pyshim:$PATH
fi
mkdir -p "$DEST"
DEST=$(cd "$DEST" && pwd)
OUT_DIR=$(mktemp -d /tmp/gpu_check.XXXXXX)  # every step's files; bundled into DEST at exit
: > "$OUT_DIR/notes.txt"
status=0
note() { echo "$*"; echo "$*" >> "$OUT_DIR/notes.txt"; }  # loud: in the log and at the top of the summary

# which steps: all, the pending ones, a list of ids, or (old form) a regex on the names
SEL_IDS="" SEL_REGEX=""
case "${STEPS:-}" in
  "") SEL_IDS="${IDS[*]}" ;;
  pending)
    if [ -f "$PENDING_FILE" ]; then
      SEL_IDS=$(cat "$PENDING_FILE")
      [ -n "$SEL_IDS" ] || note "STEPS=pending: the last call left nothing pending ($PENDING_FILE is empty)"
    else
      SEL_IDS=" ${IDS[*]} "
      for id in $FIRST_CALL; do SEL_IDS=${SEL_IDS/ $id / }; done
      note "!!! STEPS=pending, but there is no $PENDING_FILE (a fresh machine, not the warm one?): running every step after the first call's four ($FIRST_CALL)"
    fi ;;
  *)
    for w in $STEPS; do
      if [ -z "${LIMIT[$w]:-}" ]; then SEL_REGEX=$STEPS; break; fi
    done
    if [ -n "$SEL_REGEX" ]; then
      SEL_IDS=""; note "STEPS is no list of step ids: taken as a bash regex on the step names"
    else
      SEL_IDS=$STEPS
    fi ;;
esac
selected() {  # ID
  if [ -n "$SEL_REGEX" ]; then [[ "${NAME[$1]}" =~ $SEL_REGEX ]]; return; fi
  [[ " $SEL_IDS " == *" $1 "* ]]
}
for id in "${IDS[@]}"; do
  if selected "$id"; then STATUS[$id]="not reached"; else STATUS[$id]="not selected (STEPS)"; fi
done

pending_ids() {  # the selected steps that did not run to the end: skipped for the budget, not reached, cut
  local id out=""
  for id in "${IDS[@]}"; do
    case "${STATUS[$id]}" in "not reached"*|"skipped: budget"*|running*) out+="$id ";; esac
  done
  echo "${out% }"
}
bundle() {  # after every step too: a run killed outright still leaves what the finished steps wrote
  local id p
  p=$(pending_ids)
  echo "$p" > "$PENDING_FILE"
  {
    echo "gpu_check.sh: ${SECONDS}s of BUDGET=${BUDGET}s; STEPS=${STEPS:-(all)} SKIP_BUILD=$SKIP_BUILD"
    cat "$OUT_DIR/device.txt" 2>/dev/null
    cat "$OUT_DIR/notes.txt"
    echo "steps, in priority order (id, limit, name: status):"
    for id in "${IDS[@]}"; do
      printf '  %-13s %4ss  %-56s %s\n' "$id" "${LIMIT[$id]}" "${NAME[$id]}" "${STATUS[$id]}"
    done
    if [ -n "$p" ]; then
      echo "pending: $p"
      echo "next call (warm machine, at once): STEPS=pending SKIP_BUILD=1 BUDGET=<timeout_s - 30> bash benchmarks/gpu_check.sh"
      echo "   (the same by name: STEPS='$p' SKIP_BUILD=1 ...)"
    else
      echo "pending: none"
    fi
    timeout -k 5 60 python benchmarks/summarize.py "$OUT_DIR"/*.csv 2>&1
  } > "$OUT_DIR/summary.txt"
  cp "$OUT_DIR/summary.txt" "$DEST/summary.txt"
  tar czf "$DEST/.gpu_check.tar.gz.tmp" -C "$OUT_DIR" . && mv "$DEST/.gpu_check.tar.gz.tmp" "$DEST/gpu_check.tar.gz"
}
trap 'bundle; echo "bundled into $DEST/gpu_check.tar.gz"; rm -rf "$OUT_DIR" "$OUT_DIR.runs"' EXIT

timeout -k 5 30 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT_DIR/device.txt" \
  || note "!!! nvidia-smi failed or timed out"
timeout -k 5 90 python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
  | tee -a "$OUT_DIR/device.txt" || note "!!! torch / triton did not import within 90 s"

SETUP=1
if [ "$SKIP_BUILD" = 1 ]; then
  if timeout -k 5 90 python -c "import sys; from sppo_fast import _native as n; sys.exit(0 if n.available() and n.cuda_status()[0] else 1)"; then
    note "SKIP_BUILD=1: sppo_fast's CUDA build imports; no wheel install, build or import check (those of the last call hold)"
    SETUP=0
  else
    note "!!! SKIP_BUILD=1, but sppo_fast's CUDA build does not import here (a fresh machine, not the warm one?): installing the wheels and building as a first call does"
  fi
fi
if [ "$SETUP" = 1 ]; then
  # What the machine cannot download (no network): wheels carried over in ./wheels, fetched here by
  # benchmarks/gpu_wheels.sh. --no-deps: one unsatisfiable requirement must not block the others.
  if compgen -G "${WHEELS:-wheels}/*.whl" >/dev/null; then
    timeout -k 5 120 python -m pip install -q --no-index --no-deps "${WHEELS:-wheels}"/*.whl > "$OUT_DIR/wheels.log" 2>&1 \
      || note "!!! some carried wheels did not install, or the install timed out (see wheels.log)"
  else
    note "!!! NO WHEELS: ${WHEELS:-./wheels} was not carried (or holds no .whl): datasets, LLM-Blender, FlashDeBERTa, Liger-Kernel and cut-cross-entropy are missing unless the image has them, so their tests and peer rows are skipped. Run bash benchmarks/gpu_wheels.sh here and pass carry=[\"wheels\"]."
  fi
  echo "== build (SPPO_FAST_CUDA=ON)"
  # --no-deps: pip must not try to fetch a requirement; the check below names what is missing
  if ! SPPO_FAST_CUDA=ON timeout -k 5 240 python -m pip install --no-build-isolation --no-deps -e . > "$OUT_DIR/build.log" 2>&1; then
    tail -40 "$OUT_DIR/build.log"; note "!!! the build failed or timed out (build.log): no step ran"; exit 1
  fi
  timeout -k 5 120 python - <<'PY' 2>&1 | tee -a "$OUT_DIR/device.txt"
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
  [ "${PIPESTATUS[0]}" = 0 ] || note "!!! the import check failed or timed out"
fi
XDIST=$(timeout -k 5 60 python -c "import xdist" 2>/dev/null && echo "-n 8")

# ---- the steps: one function each, run as `timeout -k 5 LIMIT bash -c s_ID` --------------------------
bench_linear() {  # V OUT_NAME [PROVIDERS...]
  local V=$1; shift
  python benchmarks/bench_fused_linear.py --cuda --B 8 --T 1024 --H 4096 --V "$V" --dtype bfloat16 \
    --modes full ${1:+--providers "$@"} --out "$OUT_DIR/fused_linear_sppo_loss-bf16-V$V.csv" \
    > "$OUT_DIR/bench-linear-V$V.log" 2>&1
  local s=$?; tail -14 "$OUT_DIR/bench-linear-V$V.log"; return $s
}
bench_sppo() {  # V TAG PROVIDERS...
  local V=$1 tag=$2; shift 2
  python benchmarks/bench_fused_sppo.py --cuda --B 8 --T 1024 --V "$V" --dtype bfloat16 --modes full \
    --providers "$@" --out "$OUT_DIR/fused_sppo_loss-bf16-V$V$tag.csv" > "$OUT_DIR/bench-sppo-V$V$tag.log" 2>&1
  local s=$?; tail -8 "$OUT_DIR/bench-sppo-V$V$tag.log"; return $s
}
s_tests() {
  SPPO_FAST_GPU_TESTS_ONLY=1 python -m pytest -q $XDIST -m 'not slow' -rfEs ${TESTS:-tests} > "$OUT_DIR/pytest.log" 2>&1
  local s=$?; grep -E '^(FAILED|ERROR)' "$OUT_DIR/pytest.log" | head -15; tail -2 "$OUT_DIR/pytest.log"; return $s
}
# the issue's targets first inside the step (gemm3, cuda, liger, cuda-acc50, ...: bench_fused_linear's
# GPU_PROVIDERS); torch-lce is skipped up front where torch lacks F.linear_cross_entropy (2.11)
s_linear32k() { bench_linear 32000 ${LINEAR_32000:-}; }
# the default launch (64x64w4, 3 stages) beside one and two stages, a narrower tile and a wider one
s_attn() {
  TRITON_PRINT_AUTOTUNING=1 python benchmarks/bench_deberta_attention.py --cuda --model large \
    --launches 64x64w4s1 64x64w4s2 64x32w4 128x64w8 \
    --out "$OUT_DIR/deberta_attention-large-cuda.csv" > "$OUT_DIR/bench-attention.log" 2>&1
  local s=$?; tail -26 "$OUT_DIR/bench-attention.log"; return $s
}
# LLM-Blender at batch size 1 (the yardstick of the scores), the engine at its default and three other
# budgets, then LLM-Blender's batch size 4 (its best, 1.04 prompts/s on the H100). No sppo-fast-autotune:
# it must warm up on all 32 prompts (tuning every bucket shape), which doubles its time
s_rank() {
  python benchmarks/bench_pairrm.py --cuda --model large --prompts 32 --blender-prompts 8 --blender-batch-sizes 1 4 \
    --providers llm-blender sppo-fast sppo-fast-transposed --sweep-budgets 16777216 33554432 134217728 \
    --out "$OUT_DIR/pairrm-large-cuda.csv" > "$OUT_DIR/bench-pairrm.log" 2>&1
  local s=$?; tail -12 "$OUT_DIR/bench-pairrm.log"; return $s
}
# what the memory bought: each provider's loss and gradients against a float64 truth, as a multiple of
# the eager bf16 reference's error (cut-cross-entropy sums both gradients in bf16 across blocks)
s_acc32k() {
  python benchmarks/accuracy_fused_linear.py --cuda --B 8 --T 1024 --H 4096 --V 32000 --dtype bfloat16 \
    --out "$OUT_DIR/fused_linear_sppo_loss-accuracy-bf16-V32000.csv" > "$OUT_DIR/accuracy-linear.log" 2>&1
  local s=$?; tail -8 "$OUT_DIR/accuracy-linear.log"; return $s
}
# a padded batch at a PairRM pair's length, as the ranker's buckets: the key lengths (the default)
# against the loaded key mask, and two launches with more programs an SM
s_attn_b4() {
  python benchmarks/bench_deberta_attention.py --cuda --model large --batch 4 --padded --lengths 1350 \
    --providers hf triton triton-general-mask --launches 64x64w4s1 64x32w4 \
    --out "$OUT_DIR/deberta_attention-large-b4-padded-cuda.csv" > "$OUT_DIR/bench-attention-b4.log" 2>&1
  local s=$?; tail -8 "$OUT_DIR/bench-attention-b4.log"; return $s
}
# the narrower tile (four programs an SM, at more instructions): whether occupancy or instructions
# bound the attention inside the whole forward
s_rank_64x32() {
  SPPO_FAST_ATTN_LAUNCH=64x32w4 python benchmarks/bench_pairrm.py --cuda --model large --prompts 32 \
    --providers sppo-fast --out "$OUT_DIR/pairrm-large-cuda-launch64x32w4.csv" > "$OUT_DIR/bench-pairrm-64x32w4.log" 2>&1
  local s=$?; tail -3 "$OUT_DIR/bench-pairrm-64x32w4.log"; return $s
}
s_prof_rank() {
  python benchmarks/profile_gpu.py pairrm --out "$OUT_DIR/profile-pairrm.txt" > "$OUT_DIR/profile-pairrm.log" 2>&1
  local s=$?; sed -n 4,14p "$OUT_DIR/profile-pairrm.txt" 2>/dev/null; tail -3 "$OUT_DIR/profile-pairrm.log"; return $s
}
s_prof_linear() {
  python benchmarks/profile_gpu.py linear --out "$OUT_DIR/profile-linear.txt" > "$OUT_DIR/profile-linear.log" 2>&1
  local s=$?; sed -n 4,14p "$OUT_DIR/profile-linear.txt" 2>/dev/null; tail -3 "$OUT_DIR/profile-linear.log"; return $s
}
# the vocabulary pass's slabs (recompute mode, #5's default): the widest slab's budget (64 MiB by
# default: 2048 columns at N = 16384, 26 slabs) and the narrowest slab, one cuda row each
s_slabs() {
  local o tag s=0 r
  for o in "--vocab-pass-mib 256" "--vocab-pass-mib 1024" "--vocab-pass-mib 1024 --min-slab 512"; do
    tag=$(echo "$o" | tr -dc 0-9)
    # shellcheck disable=SC2086  # $o: two or four words
    python benchmarks/bench_fused_linear.py --cuda --B 8 --T 1024 --H 4096 --V 32000 --dtype bfloat16 \
      --modes full --providers cuda $o --out "$OUT_DIR/fused_linear_sppo_loss-bf16-V32000-slabs$tag.csv" \
      > "$OUT_DIR/bench-linear-slabs$tag.log" 2>&1
    r=$?
    grep -E '^  cuda|^fused' "$OUT_DIR/bench-linear-slabs$tag.log"
    if [ "$r" != 0 ]; then echo "   slabs $o: exit $r"; tail -3 "$OUT_DIR/bench-linear-slabs$tag.log"; s=$r; fi
  done
  return $s
}
s_linear128k() { bench_linear 128256 ${LINEAR_128256:-gemm3 cuda cce cuda-accumulate liger}; }
# a fresh runs_dir each call (a rerun of the same command resumes its run); summary.json and the plots
# are copied into the bundle
s_demo() {
  local runs="$OUT_DIR.runs" f
  rm -rf "$runs"
  python -m sppo_fast demo --quiet --set runs_dir="$runs" ranker=pairrm-tiny > "$OUT_DIR/demo.log" 2>&1
  local s=$?; tail -6 "$OUT_DIR/demo.log"
  for f in "$runs"/*/summary.json "$runs"/*/config.yaml "$runs"/*/*.png; do
    [ -f "$f" ] && cp "$f" "$OUT_DIR/demo-$(basename "$f")"
  done
  [ -f "$OUT_DIR/demo-summary.json" ] || echo "   demo: no summary.json under $runs"
  return $s
}
s_sppo32k() { bench_sppo 32000 "" copy reference triton cuda; }
s_sppo128k() { bench_sppo 128256 "" copy reference triton cuda; }
s_memcheck() {
  compute-sanitizer --tool memcheck --error-exitcode 9 python -m pytest -q tests/test_cuda.py -k 'not full_size' \
    > "$OUT_DIR/memcheck.log" 2>&1
  local s=$?; grep -E 'ERROR SUMMARY|passed|failed' "$OUT_DIR/memcheck.log" | tail -3; return $s
}
# its own CSV: the reference again beside it (its speed-up row), the other rows stay in sppo32k's
s_sppo_compile() { bench_sppo 32000 -compile reference reference-compile; }
export -f bench_linear bench_sppo $(printf 's_%s ' "${IDS[@]}")
export OUT_DIR XDIST PYTHONUNBUFFERED=1

sel_sum=0 sel_list=""
for id in "${IDS[@]}"; do
  selected "$id" && { sel_sum=$((sel_sum + LIMIT[$id] + 5)); sel_list+="$id(${LIMIT[$id]}) "; }
done
echo "== plan after ${SECONDS}s of setup: ${sel_list:-nothing}= ${sel_sum}s with kill margins; $((BUDGET - SECONDS))s left of BUDGET=$BUDGET"
bundle
for id in "${IDS[@]}"; do
  selected "$id" || continue
  name=${NAME[$id]} limit=${LIMIT[$id]}
  if [ "$id" = memcheck ] && ! command -v compute-sanitizer >/dev/null 2>&1; then
    STATUS[$id]="skipped: no compute-sanitizer here"; echo "== $name [$id]: skipped (no compute-sanitizer)"; continue
  fi
  left=$((BUDGET - SECONDS))
  if [ $((limit + 5)) -gt "$left" ]; then
    STATUS[$id]="skipped: budget (needs ${limit}+5 s, ${left} s left)"
    echo "== $name [$id]: SKIPPED, needs ${limit}+5 s, ${left} s left of BUDGET=$BUDGET"
    bundle; continue
  fi
  echo "== $name [$id] (<= ${limit}s; ${left}s left)"
  STATUS[$id]="running (cut short with the whole call)"
  bundle
  t0=$SECONDS
  timeout -k 5 "$limit" bash -c "s_$id"; rc=$?
  dt=$((SECONDS - t0))
  case $rc in
    0) STATUS[$id]="ok, ${dt}s" ;;
    124|137) STATUS[$id]="TIMED OUT at ${dt}s (limit ${limit}s)"; echo "   $name: timed out"; status=1 ;;
    *) STATUS[$id]="FAILED (exit $rc), ${dt}s"; echo "   $name: failed (exit $rc)"; status=1 ;;
  esac
  bundle
done

echo "== summary (${SECONDS}s)"
bundle
cat "$OUT_DIR/summary.txt"
exit $status
