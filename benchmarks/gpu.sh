#!/usr/bin/env bash
# The GPU check in one prepared run of about 5 minutes on one H100/H200 (torch and triton installed there, no network):
#   bash benchmarks/gpu.sh [--dry-run] [--out PATH] [--budget SECONDS]
# 1. builds the extensions (pip, offline); a failed build is recorded and the run goes on with triton alone;
# 2. runs the steps of benchmarks/gpu_check.py, each in its own process under its own time cap: correctness
#    against the float64 reference, the benchmark table against the cuBLAS GEMM floor (with Cut Cross-Entropy and
#    Liger-Kernel where importable), host synchronisations per training step, determinism;
# 3. writes benchmarks/results/gpu-<device>-<date>.json and prints a summary.
# A step that fails or hits its cap is recorded and the next one runs. Wheels in benchmarks/wheels/ (see
# benchmarks/fetch_wheels.sh) are installed first where their package is not importable.
# --dry-run: the same steps on the CPU at tiny shapes, under a minute (no build; tests/test_gpu_check_dry_run.py).
# The exit status is the report's: 0 once the results file is written, whatever the verdicts in it.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=""
RESULTS_PATH=""
BUDGET=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY="--dry-run" ;;
    --out) RESULTS_PATH="$2"; shift ;;
    --budget) BUDGET="$2"; shift ;;
    *) echo "usage: bash benchmarks/gpu.sh [--dry-run] [--out PATH] [--budget SECONDS]" >&2; exit 2 ;;
  esac
  shift
done

PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
# value checks read tensor data on the host (a synchronisation each): off, as in a training loop
export KC_CHECK_VALUES=0
# the steps' records and logs (build.log among them); KC_GPU_WORK names the folder, e.g. to keep the build log
WORK="${KC_GPU_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/kc-gpu-check.XXXXXX")}"
mkdir -p "$WORK"
rm -f "$WORK"/steps.tsv "$WORK"/build.* "$WORK"/{correctness,bench,syncs,determinism}.{json,log} \
  "$WORK"/correctness.*.json  # a reused folder
T0=$(date +%s)

# soft caps of the steps (seconds; the hard cap adds GRACE for a call or a compile that overruns), and RES_*: what
# the later steps keep of the run's BUDGET when an earlier one ran long
if [ -n "$DRY" ]; then
  BUDGET="${BUDGET:-60}"; GRACE=20
  CAP_BUILD=0; CAP_CORRECTNESS=20; CAP_BENCH=10; CAP_SYNCS=8; CAP_DETERMINISM=10
  RES_CORRECTNESS=25; RES_BENCH=15; RES_SYNCS=10
else
  BUDGET="${BUDGET:-290}"; GRACE=20
  CAP_BUILD=150; CAP_CORRECTNESS=70; CAP_BENCH=90; CAP_SYNCS=20; CAP_DETERMINISM=20
  RES_CORRECTNESS=70; RES_BENCH=25; RES_SYNCS=12
fi

# cap DEFAULT RESERVE: the step's cap, cut so that RESERVE seconds of the run's budget stay for the later steps
cap() {
  local c=$1 left=$(( BUDGET - ($(date +%s) - T0) - $2 ))
  [ "$left" -lt "$c" ] && c=$left
  [ "$c" -lt 5 ] && c=5
  echo "$c"
}

install_wheels() {
  # a wheel is installed only where its package is missing: the machine's own versions win
  local whl mod installed=""
  for whl in benchmarks/wheels/*.whl; do
    [ -e "$whl" ] || continue
    mod="$(basename "$whl" | cut -d- -f1)"
    if ! "$PY" -c "import $mod" >/dev/null 2>&1; then
      if "$PY" -m pip install -q --no-index --no-deps "$whl" >>"$WORK/build.log" 2>&1; then
        installed="$installed\"$mod\","
      else
        installed="$installed\"$mod (failed)\","
      fi
    fi
  done
  echo "[${installed%,}]"
}

build() {
  local t=$(date +%s) wheels rc status c
  wheels="$(install_wheels)"
  c=$(cap $CAP_BUILD 120)
  echo "== build (cap ${c} s)"
  timeout -k 10 "$c" "$PY" -m pip install --no-index --no-build-isolation --no-deps -e . >>"$WORK/build.log" 2>&1
  rc=$?
  status=ok
  [ $rc -ne 0 ] && status=failed
  tail -n 3 "$WORK/build.log"
  printf '{"status": "%s", "rc": %d, "seconds": %d, "cap_s": %d, "wheels_installed": %s}\n' \
    "$status" "$rc" "$(( $(date +%s) - t ))" "$c" "$wheels" >"$WORK/build.json"
  echo "build: $status (rc $rc)"
}

step() {
  local name=$1 c=$2 grace=${3:-$GRACE} t=$(date +%s) rc
  timeout -k 5 $(( c + grace )) "$PY" -m benchmarks.gpu_check "$name" --work "$WORK" --budget "$c" $DRY 2>&1 \
    | tee "$WORK/$name.log"
  rc=${PIPESTATUS[0]}
  printf '%s\t%d\t%d\t%d\n' "$name" "$rc" "$(( $(date +%s) - t ))" "$c" >>"$WORK/steps.tsv"
  [ $rc -ne 0 ] && echo "step $name ended with rc $rc (124/137: stopped at its hard cap)"
}

if [ -n "$DRY" ]; then
  printf '{"status": "skipped (dry run)"}\n' >"$WORK/build.json"
else
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
  build
fi
step correctness "$(cap $CAP_CORRECTNESS $RES_CORRECTNESS)"
step bench "$(cap $CAP_BENCH $RES_BENCH)" $(( 2 * GRACE ))  # one case at the LLM shape takes a while
step syncs "$(cap $CAP_SYNCS $RES_SYNCS)"
step determinism "$(cap $CAP_DETERMINISM 0)"
"$PY" -m benchmarks.gpu_check report --work "$WORK" $DRY ${RESULTS_PATH:+--out "$RESULTS_PATH"}
rc=$?
echo "records of the steps: $WORK ($(( $(date +%s) - T0 )) s in all)"
exit $rc
