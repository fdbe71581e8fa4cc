#!/usr/bin/env bash
# Everything a GPU machine without internet access runs in one go:
#   install (--no-build-isolation --no-deps, so nothing is fetched), pytest -m gpu,
#   compute-sanitizer memcheck + racecheck over the CUDA kernels, seqgen-fast check, seqgen-fast bench --quick.
# Logs, JSON and the chart go to RESULTS_DIR; a short summary is printed last.
#
# Usage: bash scripts/gpu_check.sh RESULTS_DIR [STEP ...]
#   STEPs (default: all, in this order): install pytest sanitizer check bench
#   Optional wheels (diffusers, importlib_metadata, ...) in .whl/ are installed to /tmp/site first.
#   Per-step time limits (seconds) via GPU_CHECK_TIMEOUT_<STEP>, e.g. GPU_CHECK_TIMEOUT_PYTEST=300.
set -u -o pipefail
OUT_DIR=${1:?usage: gpu_check.sh RESULTS_DIR [install pytest sanitizer check bench]}
shift
STEPS=${*:-install pytest sanitizer check bench}
mkdir -p "$OUT_DIR"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
declare -A STATUS

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

step() {  # step NAME LOGFILE COMMAND...: run with a time limit, record pass/fail
  local name=$1 log=$2; shift 2
  local var="GPU_CHECK_TIMEOUT_${name^^}"
  local limit=${!var:-900}
  echo "== $name: $*" | tee -a "$OUT_DIR/$log"
  local t0=$SECONDS
  timeout "$limit" "$@" >>"$OUT_DIR/$log" 2>&1
  local rc=$?
  STATUS[$name]="rc=$rc $((SECONDS - t0))s"
  echo "== $name done: rc=$rc in $((SECONDS - t0))s" | tee -a "$OUT_DIR/$log"
}

for s in $STEPS; do
  case $s in
    install)
      step install build.log python3 -m pip install -e . --no-build-isolation --no-deps -v
      nvidia-smi >>"$OUT_DIR/build.log" 2>&1
      python3 -m seqgen_fast info >>"$OUT_DIR/build.log" 2>&1 ;;
    pytest)
      step pytest pytest.log python3 -m pytest -m gpu tests -q -rfEs -p no:cacheprovider --junitxml="$OUT_DIR/pytest.xml" ;;
    sanitizer)
      # Every CUDA-backend op once on small fresh inputs (the check suite), under both tools.
      step memcheck sanitizer.log compute-sanitizer --tool memcheck --error-exitcode 9 --target-processes all \
        python3 -m seqgen_fast check --backend cuda
      step racecheck sanitizer.log compute-sanitizer --tool racecheck --error-exitcode 9 --target-processes all \
        python3 -m seqgen_fast check --backend cuda --dtype float32 ;;
    check)
      step check check.log python3 -m seqgen_fast check ;;
    bench)
      step bench bench.log python3 -m seqgen_fast bench --quick --json "$OUT_DIR/bench.json" \
        --csv "$OUT_DIR/bench.csv" --plot "$OUT_DIR/bench.png" ;;
    *) echo "unknown step $s"; exit 2 ;;
  esac
done

echo
echo "== summary ($(date -u +%FT%TZ), $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1))"
for k in "${!STATUS[@]}"; do echo "  $k: ${STATUS[$k]}"; done | sort
[ -f "$OUT_DIR/pytest.log" ] && echo "  pytest: $(grep -E '(passed|failed|error)' "$OUT_DIR/pytest.log" | tail -1)"
[ -f "$OUT_DIR/check.log" ] && echo "  check: $(grep -E 'passed, .* failed' "$OUT_DIR/check.log" | tail -1)"
[ -f "$OUT_DIR/sanitizer.log" ] && echo "  sanitizer: $(grep -cE 'ERROR SUMMARY: [1-9]|Invalid|Race' "$OUT_DIR/sanitizer.log") error lines"
[ -f "$OUT_DIR/bench.log" ] && sed -n '/^op /,$p' "$OUT_DIR/bench.log" | head -60
fail=0
for k in "${!STATUS[@]}"; do [[ ${STATUS[$k]} == rc=0* ]] || fail=1; done
exit $fail
