#!/usr/bin/env bash
# The GPU check in one prepared run of at most about 6 minutes on one H100/H200 (torch and triton installed there,
# no network); docs/gpu.md gives the exact command for a lent machine and how to read what comes back.
#   bash benchmarks/gpu.sh [--dry-run] [--out-dir DIR] [--out PATH] [--budget SECONDS]
# 1. installs the wheels of benchmarks/wheels/ (benchmarks/fetch_wheels.sh) whose package is missing, offline, and
#    builds the extensions (pip, offline); a failed build is recorded and the run goes on with triton alone;
# 2. runs the steps of benchmarks/gpu_check.py, each in its own process under its own time cap: the headline case
#    first (hard-label CE at B=8192 H=4096 V=128,256 against Cut Cross-Entropy and Liger-Kernel, with one profiled
#    call splitting kc's time into GEMMs, epilogue and torch passes), then correctness against the float64
#    reference, the rest of the table, host synchronisations per training step, determinism;
# 3. merges them into one JSON and prints a summary.
# --out-dir DIR: everything the run produces goes there, three files: gpu-check.json (the report), gpu-check.log
# (all output, the build's included) and gpu-check-work.tar.gz (every step's records and logs, refreshed after each
# step, so that a run stopped from outside still brings back what it did). Without it the report goes to --out or
# benchmarks/results/gpu-<device>-<date>.json and the steps' records stay in a temporary folder.
# A step that fails or hits its cap is recorded and the next one runs. --budget (default 330 s, the build included)
# is what the steps share; each step's cap leaves the later steps their reserve.
# --dry-run: the same steps on the CPU at tiny shapes (no build; tests/test_gpu_check_dry_run.py).
# The exit status is the report's: 0 once the results file is written, whatever the verdicts in it.
set -uo pipefail
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"

DRY=""
RESULTS_PATH=""
OUT_DIR=""
BUDGET=""
ARGS=("$@")
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY="--dry-run" ;;
    --out) RESULTS_PATH="$2"; shift ;;
    --out-dir) OUT_DIR="$2"; shift ;;
    --budget) BUDGET="$2"; shift ;;
    *) echo "usage: bash benchmarks/gpu.sh [--dry-run] [--out-dir DIR] [--out PATH] [--budget SECONDS]" >&2; exit 2 ;;
  esac
  shift
done
# paths given on the command line are the caller's; the run itself works from the repository root
if [ -n "$OUT_DIR" ]; then mkdir -p "$OUT_DIR" && OUT_DIR="$(cd "$OUT_DIR" && pwd)"; fi
if [ -n "$RESULTS_PATH" ]; then RESULTS_PATH="$(cd "$(dirname "$RESULTS_PATH")" && pwd)/$(basename "$RESULTS_PATH")"; fi

if [ -n "$OUT_DIR" ] && [ -z "${KC_GPU_LOGGING:-}" ]; then
  # the whole run's output into DIR/gpu-check.log as well as the terminal: the script again (from the caller's
  # folder, with the caller's arguments), under tee
  KC_GPU_LOGGING=1 bash "$SELF" "${ARGS[@]}" 2>&1 | tee "$OUT_DIR/gpu-check.log"
  exit "${PIPESTATUS[0]}"
fi
cd "$(dirname "$SELF")/.."

PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
# value checks read tensor data on the host (a synchronisation each): off, as in a training loop
export KC_CHECK_VALUES=0
WHEELS="${KC_WHEELS:-benchmarks/wheels}"
# the steps' records and logs (build.log among them); KC_GPU_WORK names the folder, e.g. to keep them
WORK="${KC_GPU_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/kc-gpu-check.XXXXXX")}"
mkdir -p "$WORK"
rm -f "$WORK"/steps.tsv "$WORK"/build.* "$WORK"/{headline,correctness,bench,syncs,determinism}.{json,log} \
  "$WORK"/correctness.*.json  # a reused folder
if [ -n "$OUT_DIR" ]; then
  RESULTS_PATH="$OUT_DIR/gpu-check.json"
  rm -f "$RESULTS_PATH" "$OUT_DIR/gpu-check-work.tar.gz"
fi
T0=$(date +%s)

# soft caps of the steps (seconds; the hard cap adds GRACE for a call or a compile that overruns), and RES_*: what
# the later steps keep of the run's BUDGET when an earlier one ran long
if [ -n "$DRY" ]; then
  # the same steps in well under a minute on an idle machine: each process spends a few seconds importing torch
  # before its soft cap bites, and a step's first case runs whatever its cap (a loaded machine still checks each)
  BUDGET="${BUDGET:-50}"; GRACE=20
  CAP_BUILD=0; CAP_HEADLINE=6; CAP_CORRECTNESS=16; CAP_BENCH=6; CAP_SYNCS=6; CAP_DETERMINISM=8
  RES_HEADLINE=36; RES_CORRECTNESS=20; RES_BENCH=12; RES_SYNCS=8
else
  BUDGET="${BUDGET:-330}"; GRACE=20
  CAP_BUILD=150; CAP_HEADLINE=60; CAP_CORRECTNESS=70; CAP_BENCH=90; CAP_SYNCS=20; CAP_DETERMINISM=20
  RES_HEADLINE=150; RES_CORRECTNESS=70; RES_BENCH=25; RES_SYNCS=12
fi

# cap DEFAULT RESERVE: the step's cap, cut so that RESERVE seconds of the run's budget stay for the later steps
cap() {
  local c=$1 left=$(( BUDGET - ($(date +%s) - T0) - $2 ))
  [ "$left" -lt "$c" ] && c=$left
  [ "$c" -lt 5 ] && c=5
  echo "$c"
}

# the steps' records so far into DIR's tarball (rewritten whole: the device keeps only what is under DIR)
snapshot() {
  [ -n "$OUT_DIR" ] || return 0
  tar -czf "$OUT_DIR/gpu-check-work.tar.gz.tmp" -C "$WORK" . 2>/dev/null \
    && mv "$OUT_DIR/gpu-check-work.tar.gz.tmp" "$OUT_DIR/gpu-check-work.tar.gz"
}

WHEELS_INSTALLED="[]"
install_wheels() {
  # offline, without dependencies, and only where the package is missing: the machine's own versions win. Where
  # pip may not write into the interpreter's environment, into a folder of the run put on PYTHONPATH instead.
  local whl mod how installed=""
  for whl in "$WHEELS"/*.whl; do
    [ -e "$whl" ] || continue
    mod="$(basename "$whl" | cut -d- -f1)"
    "$PY" -c "import $mod" >/dev/null 2>&1 && continue
    how=""
    if "$PY" -m pip install -q --no-index --no-deps "$whl" >>"$WORK/build.log" 2>&1; then
      how="installed"
    elif "$PY" -m pip install -q --no-index --no-deps --target "$WORK/site" "$whl" >>"$WORK/build.log" 2>&1; then
      how="on PYTHONPATH"
      case ":${PYTHONPATH:-}:" in *":$WORK/site:"*) ;; *) export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}" ;; esac
    else
      how="failed"
    fi
    installed="$installed\"$(basename "$whl") ($how)\","
  done
  WHEELS_INSTALLED="[${installed%,}]"
}

build() {
  local t=$(date +%s) rc status c
  c=$(cap $CAP_BUILD 150)
  echo "== build (cap ${c} s)"
  timeout -k 10 "$c" "$PY" -m pip install --no-index --no-build-isolation --no-deps -e . >>"$WORK/build.log" 2>&1
  rc=$?
  status=ok
  [ $rc -ne 0 ] && status=failed
  tail -n 3 "$WORK/build.log"
  printf '{"status": "%s", "rc": %d, "seconds": %d, "cap_s": %d, "wheels_installed": %s}\n' \
    "$status" "$rc" "$(( $(date +%s) - t ))" "$c" "$WHEELS_INSTALLED" >"$WORK/build.json"
  echo "build: $status (rc $rc, $(( $(date +%s) - t )) s)"
}

step() {
  local name=$1 c=$2 grace=${3:-$GRACE} t=$(date +%s) rc
  timeout -k 5 $(( c + grace )) "$PY" -m benchmarks.gpu_check "$name" --work "$WORK" --budget "$c" $DRY 2>&1 \
    | tee "$WORK/$name.log"
  rc=${PIPESTATUS[0]}
  printf '%s\t%d\t%d\t%d\n' "$name" "$rc" "$(( $(date +%s) - t ))" "$c" >>"$WORK/steps.tsv"
  [ $rc -ne 0 ] && echo "step $name ended with rc $rc (124/137: stopped at its hard cap)"
  snapshot
}

if [ -n "$DRY" ]; then
  printf '{"status": "skipped (dry run)"}\n' >"$WORK/build.json"
else
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null || true
  install_wheels
  build
fi
snapshot
# the headline's one case runs whatever its soft cap: Triton compiles kc's kernels and both peers' here, so it gets a
# longer grace before its hard cap
step headline "$(cap $CAP_HEADLINE $RES_HEADLINE)" $(( 3 * GRACE ))
if [ -z "$DRY" ] && [ -n "$RESULTS_PATH" ]; then
  # a first report with the headline in it, rewritten at the end: should the run be stopped from outside later,
  # the JSON still comes back with the case that matters most (a few seconds, most of them torch's import)
  timeout -k 5 30 "$PY" -m benchmarks.gpu_check report --work "$WORK" --out "$RESULTS_PATH" >"$WORK/report-early.log" 2>&1
fi
step correctness "$(cap $CAP_CORRECTNESS $RES_CORRECTNESS)"
step bench "$(cap $CAP_BENCH $RES_BENCH)" $(( 2 * GRACE ))
step syncs "$(cap $CAP_SYNCS $RES_SYNCS)"
step determinism "$(cap $CAP_DETERMINISM 0)"
"$PY" -m benchmarks.gpu_check report --work "$WORK" $DRY ${RESULTS_PATH:+--out "$RESULTS_PATH"}
rc=$?
echo "records of the steps: $WORK ($(( $(date +%s) - T0 )) s in all)"
snapshot
exit $rc
