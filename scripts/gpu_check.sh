#!/usr/bin/env bash
# The GPU routine in one call, offline, on one GPU machine (README: "Results on a GPU"). Steps:
#   build      pip install -e . --no-build-isolation --no-deps for this GPU only (SEQGEN_FAST_CUDA_ARCHS=native,
#              nvcc in parallel across files)
#   info       nvidia-smi and seqgen-fast info (versions, what was built, each backend's state); fails
#              when torch sees no CUDA device
#   pytest     the smoke tier: pytest -m "gpu and smoke", one case per kernel x dtype x forward/backward
#              (with pytest-xdist's -n when it is installed)
#   memcheck   compute-sanitizer memcheck over `seqgen-fast check --backend cuda` (small shapes, every dtype)
#   racecheck  compute-sanitizer racecheck over the same, one dtype (GPU_CHECK_RACECHECK_DTYPE, default float16)
#   check      seqgen-fast check (every op, every backend, against the float64 reference)
#   bench      seqgen-fast bench --headline (one case per family, its anchors timed in the same run)
# then scripts/gpu_report.py gathers the logs into RESULTS_DIR/results.json, results.md and bench.png.
#
# Usage: bash scripts/gpu_check.sh [--dry-run | --full] RESULTS_DIR [PART]
#   (default)   the steps above, within 8 minutes on one H100/H200 with 16 CPU cores
#   --dry-run   the same pipeline on a CPU (the CPU test suite runs it): no build, no sanitizer (both
#               recorded as skipped), the CPU smoke tests (Triton interpreter), check on the CPU, and
#               bench --dry-run (tiny shapes: proves the pipeline, measures nothing)
#   --full      part PART (1..GPU_CHECK_PARTS, default 4) of the whole GPU suite and every benchmark:
#               build, info, 1/N of `pytest -m gpu` (--shard PART/N), `bench --full` of some families;
#               then one part more per SOLO family (decode): build, info and that family's `bench --full`
#               alone, its compiles filling a device call; each part fits in one device call of ~9 minutes.
#               Without PART: prints the parts.
# Each step has a time limit in seconds, GPU_CHECK_TIMEOUT_<STEP> to override (GPU_CHECK_TIMEOUT_PYTEST=300).
# A failed or timed-out step is recorded and the later steps still run; the exit status is 1 if any step
# (or the report) failed. Wheels in .whl/ (diffusers, ...) are installed to /tmp/site first (GPU modes).
# Also: GPU_CHECK_WORKERS (xdist workers, default half the cores), GPU_CHECK_RACECHECK_DTYPE,
# SEQGEN_FAST_CUDA_ARCHS (default native), GPU_CHECK_GIT_SHA (the sha to record where the copy has no .git),
# GPU_CHECK_PYTHON (default python3).
set -u -o pipefail
PY=${GPU_CHECK_PYTHON:-python3}

usage() { awk '/^# Usage:/ {p = 1} /^# Each step/ {p = 0} p {sub(/^# ?/, ""); print}' "$0" >&2; exit 2; }

MODE=default
case ${1:-} in
  --dry-run) MODE=dry-run; shift ;;
  --full) MODE=full; shift ;;
  -h|--help|"") usage ;;
esac
[ $# -ge 1 ] || usage
[ "$MODE" = full ] || [ $# -eq 1 ] || usage  # PART belongs to --full only
RESULTS_DIR=$1
[[ $RESULTS_DIR == /* ]] || RESULTS_DIR=$PWD/$RESULTS_DIR  # relative to the caller, not the checkout
PART=${2:-}
cd "$(dirname "$0")/.."
PARTS=${GPU_CHECK_PARTS:-4}
read -ra FAMILIES <<<"$("$PY" -c 'import runpy; print(*runpy.run_path("seqgen_fast/_families.py")["NAMES"])')"
# Families whose --full bench takes a part of its own: decode compiles ~25 kernel variants and 6
# flex_attention graphs (~4-5 minutes), beyond a shared part's bench limit.
SOLO=(decode)
SHARED=()
for f in "${FAMILIES[@]}"; do [[ " ${SOLO[*]} " == *" $f "* ]] || SHARED+=("$f"); done
TOTAL=$((PARTS + ${#SOLO[@]}))

part_families() {  # part K <= PARTS benchmarks every PARTS-th shared family from the K-th; later parts one SOLO each
  local k=$1 i
  if ((k > PARTS)); then echo -n "${SOLO[k - PARTS - 1]} "; return; fi
  for i in "${!SHARED[@]}"; do ((i % PARTS == k - 1)) && echo -n "${SHARED[i]} "; done
}

if [ "$MODE" = full ]; then
  echo "gpu_check --full: $TOTAL parts, one device call each (GPU_CHECK_PARTS to change the shared ones):"
  for ((k = 1; k <= TOTAL; k++)); do
    fams=$(part_families "$k")
    if ((k > PARTS)); then
      echo "  part $k/$TOTAL: build, info, bench --full of: $fams(alone)"
    else
      echo "  part $k/$TOTAL: build, info, pytest -m gpu --shard $k/$PARTS, bench --full of: ${fams:-no family}"
    fi
  done
  if ! [[ $PART =~ ^[0-9]+$ ]] || ((PART < 1 || PART > TOTAL)); then
    echo "usage: bash scripts/gpu_check.sh --full RESULTS_DIR PART   (PART in 1..$TOTAL)" >&2
    exit 2
  fi
fi
OUT=$(mkdir -p "$RESULTS_DIR" && cd "$RESULTS_DIR" && pwd) || { echo "gpu_check: no $RESULTS_DIR" >&2; exit 2; }

# Time limits (seconds). Default run: 90+20+150+50+35+55+75 = 475 s of steps, plus the wheels and the
# report (a few seconds each), inside 8 minutes. build: nvcc compiles csrc/ for one architecture in
# ~10 s of CPU per file, in parallel, so pip's overhead dominates. pytest: ~160 smoke tests on 8 xdist
# workers, mostly Triton compiles and attention autotuning. memcheck/racecheck: only the CUDA kernels'
# small checks (no Triton), slowed by the tools. check: every op and backend, reusing the compiled
# Triton kernels of the smoke tier (Triton's disk cache). bench: 5 cases and their anchors, including
# a torch.compile anchor's compile. A --full part: 150+20+270+90 = 530 s. A dry run is sized for a slow
# 2-core CI machine. Each run's results.md lists the seconds each step took, to re-size these.
declare -A LIMIT
case $MODE in
  default) LIMIT=([build]=90 [info]=20 [pytest]=150 [memcheck]=50 [racecheck]=35 [check]=55 [bench]=75) ;;
  full) LIMIT=([build]=150 [info]=20 [pytest]=270 [bench]=90) ;;
  dry-run) LIMIT=([info]=60 [pytest]=300 [check]=240 [bench]=300) ;;
esac
[ "$MODE" = full ] && ((PART > PARTS)) && LIMIT[bench]=360  # a SOLO part: 150+20+360 = 530 s

export PYTHONUNBUFFERED=1
export TRITON_CACHE_AUTOTUNING=1  # autotune choices on disk, shared by the xdist workers and check (not bench)
if [ "$MODE" = dry-run ]; then
  export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1  # a CPU run even on a GPU machine
elif compgen -G ".whl/*.whl" >/dev/null; then
  timeout 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl >"$OUT/wheels.log" 2>&1 && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

STEPS=$OUT/steps.tsv  # name, status, rc, seconds, limit, log, note: read by gpu_report.py
: >"$STEPS"
FAILED=0

run_step() {  # run_step NAME NOTE COMMAND...: run under the step's limit, log to NAME.log, record the outcome
  local name=$1 note=$2; shift 2
  local var=GPU_CHECK_TIMEOUT_${name^^}
  local limit=${!var:-${LIMIT[$name]}} log=$name.log status=pass
  echo "== $name (limit ${limit}s): $*" | tee "$OUT/$log"
  local t0=$SECONDS
  # SIGINT first: pytest still writes its junit report and summary; KILL 15 s later if needed.
  timeout -s INT -k 15 "$limit" "$@" >>"$OUT/$log" 2>&1
  local rc=$? secs=$((SECONDS - t0))
  if ((rc == 124 || rc == 137)); then status=timeout; elif ((rc != 0)); then status=fail; fi
  [ "$status" = pass ] || FAILED=1
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$secs" "$limit" "$log" "$note" >>"$STEPS"
  echo "== $name: $status (rc=$rc, ${secs}s)" | tee -a "$OUT/$log"
}

skip_step() {  # skip_step NAME REASON
  printf '%s\tskipped\t\t0\t\t\t%s\n' "$1" "$2" >>"$STEPS"
  echo "== $1: skipped ($2)"
}

# --- build, info
if [ "$MODE" = dry-run ]; then
  skip_step build "dry run: no nvcc build on a CPU machine; the installed package runs (see info)"
  run_step info "" "$PY" -m seqgen_fast info
else
  run_step build "SEQGEN_FAST_CUDA_ARCHS=${SEQGEN_FAST_CUDA_ARCHS:-native}" \
    env SEQGEN_FAST_CUDA_ARCHS="${SEQGEN_FAST_CUDA_ARCHS:-native}" \
    "$PY" -m pip install -e . --no-build-isolation --no-deps -v
  run_step info "" bash -c 'nvidia-smi; "$0" -m seqgen_fast info && "$0" -c "import sys, torch; sys.exit(
    0 if torch.cuda.is_available() else \"gpu_check: torch sees no CUDA device\")"' "$PY"
fi

# --- pytest (never tests/test_gpu_check.py: the dry run is itself run by it)
case $MODE in
  default) marks="gpu and smoke"; extra=() ;;
  dry-run) marks=smoke; extra=() ;;  # the CPU smoke tests run; the GPU ones are listed as skipped
  full) marks=gpu; extra=("--shard=$PART/$PARTS") ;;
esac
workers=${GPU_CHECK_WORKERS:-$(($(nproc) / 2))}
omp=()
if ((workers >= 2)) && "$PY" -c "import xdist" 2>/dev/null; then
  extra+=(-n "$workers")
  omp=("OMP_NUM_THREADS=$(($(nproc) / workers))")  # each worker's CPU references, without oversubscription
fi
if [ "$MODE" = full ] && ((PART > PARTS)); then
  skip_step pytest "part $PART/$TOTAL benchmarks $(part_families "$PART")alone; parts 1..$PARTS run the GPU tests"
else
  run_step pytest "-m '$marks'${extra[*]:+ ${extra[*]}}" env "${omp[@]}" "$PY" -m pytest tests \
    --ignore=tests/test_gpu_check.py -m "$marks" "${extra[@]}" -q -rfEs -p no:cacheprovider --junitxml="$OUT/pytest.xml"
fi

# --- sanitizer
if [ "$MODE" = default ]; then
  sanitize=(compute-sanitizer --error-exitcode 9 --target-processes all)
  run_step memcheck "seqgen-fast check --backend cuda" \
    "${sanitize[@]}" --tool memcheck "$PY" -m seqgen_fast check --backend cuda
  dtype=${GPU_CHECK_RACECHECK_DTYPE:-float16}
  run_step racecheck "seqgen-fast check --backend cuda --dtype $dtype" \
    "${sanitize[@]}" --tool racecheck "$PY" -m seqgen_fast check --backend cuda --dtype "$dtype"
else
  why="dry run: compute-sanitizer needs a GPU"
  [ "$MODE" = full ] && why="--full runs the GPU suite and the benchmarks; the default run covers the sanitizer"
  skip_step memcheck "$why"
  skip_step racecheck "$why"
fi

# --- check
if [ "$MODE" = full ]; then
  skip_step check "--full runs the GPU suite and the benchmarks; the default run covers check"
else
  run_step check "" "$PY" -m seqgen_fast check
fi

# --- bench (autotuning afresh: choices made while xdist workers shared the GPU are noisy)
bench=(env TRITON_CACHE_AUTOTUNING=0 "$PY" -m seqgen_fast bench --json "$OUT/bench.json" --csv "$OUT/bench.csv")
case $MODE in
  default) run_step bench "--headline" "${bench[@]}" --headline ;;
  dry-run) run_step bench "--dry-run" "${bench[@]}" --dry-run ;;
  full)
    read -ra fams <<<"$(part_families "$PART")"
    if ((${#fams[@]})); then
      run_step bench "--full: ${fams[*]}" "${bench[@]}" --full "${fams[@]/#/--family=}"
    else
      skip_step bench "no family falls to part $PART of $TOTAL"
    fi ;;
esac

# --- report
echo
timeout 60 "$PY" scripts/gpu_report.py "$OUT" --mode "$MODE" ${PART:+--part "$PART/$TOTAL"}
report_rc=$?
((report_rc == 0)) || echo "gpu_check: the report failed (rc=$report_rc); the logs are in $OUT" >&2
echo "gpu_check ($MODE): ${SECONDS} s in all; results in $OUT"
((FAILED == 0 && report_rc == 0))
