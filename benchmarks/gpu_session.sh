#!/usr/bin/env bash
# One call on a GPU machine (an H100 or H200): in about 9 minutes on 16 cores it answers, in
# this order, does it run, is it right, how fast against SDPA and torch's norms.
#
# The GPU machine runs this in a copy of the work tree that is not installed, with torch,
# Triton, ninja and pytest but no package registry; only the tail of the output comes back.
#
# Plan (budget = the step's timeout in seconds; no step runs past TOTAL = 540 s from the start,
# FL_SESSION_SECONDS overrides; every step runs even when one before it failed):
#   step          budget  answers
#   versions         30   the card, driver, nvcc, torch / CUDA / Triton (the code must work on all)
#   install          90   `pip install -e .` without the extension, dependencies or an index, so that
#                         fusedlayers.kernels / .transformer / .benchmarks import (they exist only
#                         through package_dir); links + PYTHONPATH when pip cannot
#   imports          60   the package imports from this copy, Triton backend loaded
#   build           420   in the background from here on: fusedlayers._C for this card only
#                         (TORCH_CUDA_ARCH_LIST=9.0a, MAX_JOBS=14, ptxas -v), `setup.py build_ext
#                         --inplace`, which writes _C into fusedlayers/, where the editable install finds it
#   smoke           150   Triton against the float64 reference (benchmarks/gpu_smoke.py): bf16 d128
#                         fwd+bwd, dropout, split-KV decode, fp32 bwd, d256 (the separate dQ pass),
#                         deterministic; outputs poisoned with NaN first
#   verify-triton   120   `fusedlayers verify --quick --backend triton`: the grid's quick cut
#   (build wait)          the rest of the build's 420 s
#   ptxas            30   registers / spills of every CUDA kernel as built for this card
#   info             60   what `auto` picks on this GPU, the extension's build string
#   verify-cuda     180   `fusedlayers verify --backend cuda` (default grid): the record (verify.json)
#                         that marks the cuda backend verified and lets `auto` choose it on this GPU
#   memcheck        150   compute-sanitizer memcheck on one small case per CUDA kernel
#                         (python tests/test_cuda_kernels.py), caching allocator off
#   bench           150   `fusedlayers bench --quick`: attention, decode and the norms against SDPA's
#                         flash / efficient / cuDNN / math backends and torch's norms
#   tune            150   benchmarks/gpu_tune.py: each op's call, kernel and host time beside torch's, then
#                         the attention backward against the float64 reference, MHA and GQA, deterministic
#                         and not, with the table's and forced dK/dV tiles (a wrong dK was seen there)
#   only if time remains (each gets what is left, up to its budget):
#   gpu-tests       150   pytest -m gpu, the grids left out (finite extreme bias, determinism,
#                         varlen, multi-GPU device guard)
#   racecheck       150   compute-sanitizer racecheck on the same small cases
#   suite           300   the whole suite on CUDA tensors
#   bench-full      300   the full benchmark (torch.compile, N up to 16k)
# A summary table prints last whatever happened; logs, verify records and benchmark results go
# under $OUT (default /tmp/fusedlayers-gpu-session): commit them as benchmarks/results/<device>/.
#
#   bash benchmarks/gpu_session.sh             on the GPU machine
#   bash benchmarks/gpu_session.sh --dry-run   anywhere, no GPU needed (CI runs it): copies the
#       tree as the GPU machine gets it (tracked files and untracked ones git does not ignore,
#       nothing built) into a temporary folder, makes a throwaway venv that sees this python's
#       packages but not its installs' .pth hooks (so not an editable install of this checkout),
#       and runs there every step that needs no GPU: install, imports, the smoke cases and
#       gpu_tune.py tiny through the Triton interpreter, the fusedlayers command lines parsed, the
#       GPU tests collected; it prints the GPU steps it would run.
set -uo pipefail

MODE=run
for arg in "$@"; do
  case "$arg" in
    --dry-run) MODE=dry ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_session.sh: unknown argument $arg (use --dry-run or --help)" >&2; exit 2 ;;
  esac
done
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1

# ------------------------------------------------------------------ dry run: copy, venv, re-run
if [ "$MODE" = dry ] && [ -z "${FL_SESSION_COPY:-}" ]; then
  PY=${PYTHON:-$(command -v python || command -v python3)}
  tmp=$(mktemp -d "${TMPDIR:-/tmp}/fusedlayers-dry-run.XXXXXX") || exit 1
  trap 'rm -rf "$tmp"' EXIT
  mkdir -p "$tmp/tree"
  # what the GPU machine gets: tracked files (as they are in the work tree) and untracked ones git
  # does not ignore; no _C, no build folder, no egg-info
  git ls-files -z --cached --others --exclude-standard \
    | tar --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -xf - -C "$tmp/tree" || exit 1
  "$PY" -m venv --without-pip "$tmp/venv" || exit 1
  site=$("$tmp/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') || exit 1
  # this python's package folders as plain path entries: importable, but their .pth hooks (such as
  # an editable install of this checkout) do not run; pip installs into the throwaway venv only
  "$PY" -c 'import sys; print("\n".join(p for p in sys.path if p.endswith(("site-packages", "dist-packages"))))' \
    >"$site/_outer_packages.pth" || exit 1
  out=${OUT:-/tmp/fusedlayers-gpu-dry-run}
  mkdir -p "$out" && out=$(cd "$out" && pwd) || exit 1  # absolute: the copy runs from another folder
  echo "dry run in a copy of the tree: $tmp/tree (throwaway venv $tmp/venv), results in $out"
  PATH="$tmp/venv/bin:$PATH" FL_SESSION_COPY=1 OUT="$out" bash "$tmp/tree/benchmarks/gpu_session.sh" --dry-run
  exit $?
fi

OUT=${OUT:-/tmp/fusedlayers-gpu-session}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 1
: >"$OUT/session.log"
export FUSEDLAYERS_CACHE="$OUT/cache"  # the verify records of this session
# _C comes from the build step below, never from a first-use build in the middle of another step
export FUSEDLAYERS_NO_BUILD=1
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
TOTAL=${FL_SESSION_SECONDS:-540}
RESERVE=10  # seconds kept for the summary
T0=$(date +%s)
ARCHS=${TORCH_CUDA_ARCH_LIST:-9.0a}
JOBS=${MAX_JOBS:-14}
PYTHON=${PYTHON:-$(command -v python || command -v python3)}

# The fusedlayers command lines of this session (the dry run parses each with the real CLI).
CLI_VERIFY_TRITON="verify --quick --backend triton"
CLI_VERIFY_CUDA="verify --backend cuda"
CLI_INFO="info"
CLI_BENCH="bench --quick --op attention --op decode --op layer_norm --op rms_norm --op add_layer_norm --out $OUT/bench"
CLI_BENCH_FULL="bench --out $OUT/bench-full"

declare -a NAMES=() RESULTS=() SECS=() LIMITS=()
record() { NAMES+=("$1"); RESULTS+=("$2"); SECS+=("$3"); LIMITS+=("$4"); }
elapsed() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( TOTAL - RESERVE - $(elapsed) )); }
say() { echo "$*" | tee -a "$OUT/session.log"; }

# step NAME BUDGET MIN LOG CMD...: runs CMD with a timeout of min(BUDGET, time left); skipped when
# less than MIN seconds are left. Output to $OUT/LOG, its tail printed.
step() {
  local name=$1 budget=$2 min=$3 log=$4
  shift 4
  local remaining limit t0 rc res
  remaining=$(left)
  limit=$(( budget < remaining ? budget : remaining ))
  if (( limit < min )); then
    say "=== $name: skipped, $remaining s left"
    record "$name" skipped 0 0
    return 0
  fi
  say "=== $name (at $(elapsed) s, timeout $limit s): $*"
  t0=$(date +%s)
  timeout -k 10 "$limit" "$@" >"$OUT/$log" 2>&1
  rc=$?
  tail -n 8 "$OUT/$log"
  if (( rc == 0 )); then res=ok; elif (( rc == 124 || rc == 137 )); then res=TIMEOUT; else res="FAIL($rc)"; fi
  record "$name" "$res" $(( $(date +%s) - t0 )) "$limit"
  return $rc
}

# gpu_step: a step that needs the GPU; the dry run only says it would run it.
gpu_step() {
  if [ "$MODE" = dry ]; then
    say "=== $1: would run (budget $2 s): ${*:5}"
    record "$1" "would run" 0 "$2"
    return 0
  fi
  step "$@"
}

# ------------------------------------------------------------------ versions and the card
{
  echo "mode: $MODE, started $(date -Is), $(nproc) cores, budget $TOTAL s"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1
  else
    echo "nvidia-smi: not available"
  fi
  "$PYTHON" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, 'CUDA', torch.version.cuda, '| GPU', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')"
  "$PYTHON" -c "import triton; print('triton', triton.__version__)" 2>&1 | tail -n 1
  "$PYTHON" -m pip --version 2>&1 | tail -n 1
  (nvcc --version 2>/dev/null | tail -n 2) || echo "nvcc: not on PATH"
  git rev-parse HEAD 2>/dev/null || echo "commit: unknown (not a git checkout)"
} >"$OUT/versions.txt" 2>&1
cat "$OUT/versions.txt"
record versions ok $(elapsed) 30

# ------------------------------------------------------------------ install, imports
step install 90 20 install.log env FUSEDLAYERS_NO_EXT=1 "$PYTHON" -m pip install --no-index --no-build-isolation \
  --no-deps -e .
IMPORTS=$(cat <<'EOF'
import os, sys
import fusedlayers, fusedlayers.benchmarks.suite, fusedlayers.transformer
from fusedlayers import _ext, dispatch
from fusedlayers.kernels import attention, layer_norm
root = os.getcwd()
for m in (fusedlayers, attention, fusedlayers.transformer, fusedlayers.benchmarks.suite):
    assert os.path.realpath(m.__file__).startswith(os.path.realpath(root)), f"{m.__name__} from {m.__file__}, not {root}"
assert dispatch._IMPLS[("attention", "triton")][0] is not None, dispatch._IMPLS[("attention", "triton")][1]
print(f"fusedlayers {fusedlayers.__version__} from {os.path.dirname(fusedlayers.__file__)}; kernels from "
      f"{os.path.dirname(attention.__file__)}; _C: {_ext.INFO if _ext.ERROR is None else _ext.ERROR}")
EOF
)
if ! step imports 60 10 imports.log "$PYTHON" -c "$IMPORTS"; then
  # pip could not install (no setuptools, read-only site-packages, ...): the packages that exist
  # only through package_dir become links inside fusedlayers/, and the tree goes on PYTHONPATH
  say "the package does not import from this copy: links + PYTHONPATH instead"
  for pkg in kernels transformer benchmarks; do [ -e "fusedlayers/$pkg" ] || ln -s "../$pkg" "fusedlayers/$pkg"; done
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  step imports-links 60 10 imports_links.log "$PYTHON" -c "$IMPORTS"
fi

# ------------------------------------------------------------------ the extension build, in the background
if [ -z "${CUDA_HOME:-}" ]; then  # the nvcc on the PATH may be a wrapper script: find the toolkit root
  nvcc_path=$(command -v nvcc || true)
  real=$( [ -n "$nvcc_path" ] && grep -Io '/[^" ]*/bin/nvcc' "$nvcc_path" 2>/dev/null | head -n 1 || true)
  if [ -n "$real" ]; then CUDA_HOME=$(dirname "$(dirname "$real")")
  elif [ -n "$nvcc_path" ]; then CUDA_HOME=$(dirname "$(dirname "$nvcc_path")")
  else CUDA_HOME=/usr/local/cuda; fi
  export CUDA_HOME
fi
BUILD=(env FUSEDLAYERS_FORCE_CUDA=1 FUSEDLAYERS_PTXAS_VERBOSE=1 TORCH_CUDA_ARCH_LIST="$ARCHS" MAX_JOBS="$JOBS"
       "$PYTHON" setup.py build_ext --inplace)
BUILD_BUDGET=420
BUILD_PID=
if [ "$MODE" = dry ]; then
  say "=== build: would run in the background (budget $BUILD_BUDGET s, CUDA_HOME=$CUDA_HOME): ${BUILD[*]}"
  record build "would run" 0 $BUILD_BUDGET
else
  say "=== build: started in the background (at $(elapsed) s, timeout $BUILD_BUDGET s): ${BUILD[*]}"
  BUILD_T0=$(date +%s)
  ( timeout -k 10 $BUILD_BUDGET "${BUILD[@]}" >"$OUT/build.log" 2>&1; echo $? >"$OUT/build.rc" ) &
  BUILD_PID=$!
fi

# ------------------------------------------------------------------ Triton: smoke test, verify --quick
if [ "$MODE" = dry ]; then
  step smoke-tiny 240 10 smoke.log "$PYTHON" benchmarks/gpu_smoke.py --device cpu --tiny
  step cli 60 10 cli.log "$PYTHON" benchmarks/gpu_smoke.py --check-cli "$CLI_VERIFY_TRITON" "$CLI_VERIFY_CUDA" \
    "$CLI_INFO" "$CLI_BENCH" "$CLI_BENCH_FULL"
  step tune-tiny 150 10 tune.log "$PYTHON" benchmarks/gpu_tune.py --device cpu --tiny --seconds 120 \
    --parts profile check attention
  step collect 120 10 collect.log "$PYTHON" -m pytest --collect-only -q -p no:cacheprovider -m gpu tests
fi
gpu_step smoke 150 30 smoke.log "$PYTHON" benchmarks/gpu_smoke.py
gpu_step verify-triton 120 30 verify_triton.log "$PYTHON" -m fusedlayers $CLI_VERIFY_TRITON
[ -f "$FUSEDLAYERS_CACHE/verify.json" ] && cp "$FUSEDLAYERS_CACHE/verify.json" "$OUT/verify_triton_quick.json"

# ------------------------------------------------------------------ CUDA kernels, once built
BUILT=0
if [ -n "$BUILD_PID" ]; then
  say "=== build: waiting (at $(elapsed) s)"
  wait "$BUILD_PID"
  rc=$(cat "$OUT/build.rc" 2>/dev/null || echo 1)
  tail -n 5 "$OUT/build.log"
  if (( rc == 0 )); then res=ok; BUILT=1; elif (( rc == 124 || rc == 137 )); then res=TIMEOUT; else res="FAIL($rc)"; fi
  record build "$res" $(( $(date +%s) - BUILD_T0 )) $BUILD_BUDGET
fi
if (( BUILT )) || [ "$MODE" = dry ]; then
  gpu_step ptxas 30 5 ptxas.txt "$PYTHON" benchmarks/ptxas_report.py "$OUT/build.log"
  gpu_step info 60 10 info.txt "$PYTHON" -m fusedlayers $CLI_INFO
  gpu_step verify-cuda 180 30 verify_cuda.log "$PYTHON" -m fusedlayers $CLI_VERIFY_CUDA
  [ -f "$FUSEDLAYERS_CACHE/verify.json" ] && [ "$MODE" = run ] && cp "$FUSEDLAYERS_CACHE/verify.json" "$OUT/verify.json"
  SANITIZER=$(command -v compute-sanitizer || ls "$CUDA_HOME"/bin/compute-sanitizer "$CUDA_HOME"/compute-sanitizer/compute-sanitizer 2>/dev/null | head -n 1)
  if [ -n "$SANITIZER" ] || [ "$MODE" = dry ]; then
    gpu_step memcheck 150 30 memcheck.log env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "${SANITIZER:-compute-sanitizer}" \
      --tool memcheck --error-exitcode 9 --print-limit 20 "$PYTHON" tests/test_cuda_kernels.py
  else
    say "=== memcheck: compute-sanitizer not found"
    record memcheck "FAIL(none)" 0 0
  fi
else
  say "=== the CUDA steps are skipped: the build did not succeed (see $OUT/build.log)"
  for s in ptxas info verify-cuda memcheck; do record "$s" "skipped" 0 0; done
  "$PYTHON" -m fusedlayers info >"$OUT/info.txt" 2>&1
fi

# ------------------------------------------------------------------ speed against SDPA and torch
gpu_step bench 150 45 bench.log "$PYTHON" -m fusedlayers $CLI_BENCH

# ------------------------------------------------------------------ where the time goes; known wrong answers
gpu_step tune 150 45 tune.log "$PYTHON" benchmarks/gpu_tune.py --out "$OUT/tune" --seconds 140 --parts profile check

# ------------------------------------------------------------------ only if time remains
gpu_step gpu-tests 150 60 pytest_gpu.log "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu -k "not grid" -rfE tests
if (( BUILT )) && [ -n "${SANITIZER:-}" ] || [ "$MODE" = dry ]; then
  gpu_step racecheck 150 60 racecheck.log env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "${SANITIZER:-compute-sanitizer}" \
    --tool racecheck --error-exitcode 9 --print-limit 20 "$PYTHON" tests/test_cuda_kernels.py
fi
gpu_step suite 300 120 pytest_suite.log "$PYTHON" -m pytest -q -p no:cacheprovider -rfE --maxfail=50 tests
gpu_step bench-full 300 240 bench_full.log "$PYTHON" -m fusedlayers $CLI_BENCH_FULL

# ------------------------------------------------------------------ summary, last
{
  echo
  if [ -f "$OUT/bench/results.md" ]; then
    echo "=== bench --quick ($OUT/bench/results.md)"
    grep -v '^$' "$OUT/bench/results.md" | cut -c 1-400 | head -c 5000
    echo
  fi
  echo "=== key lines"
  grep -hE '^(smoke|cli) ' "$OUT/smoke.log" "$OUT/cli.log" 2>/dev/null | cut -c 1-220
  grep -hE '^(profile|check FAIL)' "$OUT/tune.log" 2>/dev/null | cut -c 1-260
  for f in verify_triton.log verify_cuda.log; do
    [ -f "$OUT/$f" ] && { echo "-- $f"; grep -E '^(attention|norm) |^    |passed|FAILED' "$OUT/$f" | head -n 30 | cut -c 1-220; }
  done
  [ -f "$OUT/ptxas.txt" ] && tail -n 2 "$OUT/ptxas.txt"
  [ -f "$OUT/info.txt" ] && grep -E 'cuda kernels|auto ->|extension' "$OUT/info.txt" | cut -c 1-220
  for f in memcheck.log racecheck.log; do
    [ -f "$OUT/$f" ] && { echo "-- $f"; grep -E 'SUMMARY|: (ok|FAIL)' "$OUT/$f" | tail -n 8 | cut -c 1-220; }
  done
  for f in pytest_gpu.log pytest_suite.log; do
    [ -f "$OUT/$f" ] && { echo "-- $f"; grep -E '^(FAILED|ERROR) ' "$OUT/$f" | head -n 10 | cut -c 1-220; tail -n 1 "$OUT/$f"; }
  done
  [ "$MODE" = dry ] && [ -f "$OUT/collect.log" ] && tail -n 1 "$OUT/collect.log"
  echo
  echo "=== summary ($MODE; $(grep -m 1 '^python' "$OUT/versions.txt" | cut -c 1-120); $(elapsed) s of $TOTAL)"
  printf "%-16s %-10s %8s %8s\n" step result seconds limit
  failed=0
  for i in "${!NAMES[@]}"; do
    case "${RESULTS[$i]}" in ok|skipped|"would run") ;; *) failed=1 ;; esac
    printf "%-16s %-10s %8s %8s\n" "${NAMES[$i]}" "${RESULTS[$i]}" "${SECS[$i]}" "${LIMITS[$i]}"
  done
  echo "results: $OUT (verify.json: the cuda record to commit under benchmarks/results/<device>/)"
  echo "FAILED=$failed" >"$OUT/.failed"
} 2>&1 | tee "$OUT/summary.txt"
grep -q "FAILED=1" "$OUT/.failed"
exit $(( $? == 0 ))
