#!/usr/bin/env bash
# One call on a GPU machine that verifies the CUDA backend (../shared/GPU.md):
#   1. builds fusedlayers._C for this card only (TORCH_CUDA_ARCH_LIST, default 9.0a), in
#      place, with the ptxas report (benchmarks/ptxas_report.py: fails on spills);
#   2. runs the GPU tests (pytest -m gpu), then the whole suite on CUDA tensors;
#   3. runs one small case of every CUDA kernel under compute-sanitizer memcheck and racecheck
#      (python tests/test_cuda_kernels.py);
#   4. `fusedlayers verify` (its record, which flips `fusedlayers info` to "verified", is
#      copied to $OUT/verify.json: commit it as benchmarks/results/<device>/verify.json)
#      and `fusedlayers bench` against torch SDPA / layer_norm / compile (JSON, Markdown, PNG);
#   5. prints a summary table last (the device tool shows only the tail of the output).
# Every step runs even when an earlier one failed; exit status 1 when any failed.
#
#   run: bash benchmarks/gpu_session.sh          (OUT: the device tool sets it; default /tmp/fusedlayers-gpu-session)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fusedlayers-gpu-session}
mkdir -p "$OUT"
export FUSEDLAYERS_CACHE="$OUT/cache"
ARCHS=${TORCH_CUDA_ARCH_LIST:-9.0a}
declare -a NAMES STATUS SECS

step() {  # step NAME LOGFILE COMMAND...
  local name=$1 log=$2; shift 2
  local t0=$(date +%s)
  echo "=== $name" | tee -a "$OUT/session.log"
  "$@" >"$OUT/$log" 2>&1
  local rc=$?
  tail -n 15 "$OUT/$log"
  NAMES+=("$name"); STATUS+=("$rc"); SECS+=($(( $(date +%s) - t0 )))
  return $rc
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version | tail -n 2
  git rev-parse HEAD 2>/dev/null
  date -Is
} >"$OUT/versions.txt" 2>&1
cat "$OUT/versions.txt"

# 1. build for this card, ptxas report
if [ -z "${CUDA_HOME:-}" ]; then
  nvcc_path=$(command -v nvcc || true)
  real=$( [ -n "$nvcc_path" ] && grep -Io '/[^" ]*/bin/nvcc' "$nvcc_path" | head -n 1 || true)
  if [ -n "$real" ]; then export CUDA_HOME=$(dirname "$(dirname "$real")"); elif [ -n "$nvcc_path" ]; then
    export CUDA_HOME=$(dirname "$(dirname "$nvcc_path")"); else export CUDA_HOME=/usr/local/cuda; fi
fi
step build build.log env FUSEDLAYERS_FORCE_CUDA=1 FUSEDLAYERS_PTXAS_VERBOSE=1 TORCH_CUDA_ARCH_LIST="$ARCHS" \
  MAX_JOBS=16 python setup.py build_ext --inplace
step ptxas ptxas.txt python benchmarks/ptxas_report.py "$OUT/build.log"
python -m fusedlayers info >"$OUT/info_before.txt" 2>&1

# 2. GPU tests, then the whole suite on CUDA tensors
step "pytest -m gpu" pytest_gpu.log python -m pytest -m gpu -q -x -p no:cacheprovider tests/test_cuda_kernels.py
step "pytest -m gpu (all)" pytest_gpu_all.log python -m pytest -m gpu -q -p no:cacheprovider
step "pytest (suite)" pytest_all.log python -m pytest -q -p no:cacheprovider

# 3. compute-sanitizer on one small case per kernel
if command -v compute-sanitizer >/dev/null; then
  step memcheck memcheck.log compute-sanitizer --tool memcheck --error-exitcode 9 python tests/test_cuda_kernels.py
  step racecheck racecheck.log compute-sanitizer --tool racecheck --error-exitcode 9 python tests/test_cuda_kernels.py
else
  echo "compute-sanitizer not found" | tee "$OUT/memcheck.log"
  NAMES+=("sanitizer"); STATUS+=(127); SECS+=(0)
fi

# 4. verification record and benchmarks
step verify verify.log python -m fusedlayers verify
[ -f "$FUSEDLAYERS_CACHE/verify.json" ] && cp "$FUSEDLAYERS_CACHE/verify.json" "$OUT/verify.json"
python -m fusedlayers info >"$OUT/info_after.txt" 2>&1
step bench bench.log python -m fusedlayers bench --out "$OUT/bench"

# 5. summary, last
echo
echo "=== summary ($(head -n 1 "$OUT/versions.txt"))"
printf "%-22s %-6s %6s\n" step result seconds
failed=0
for i in "${!NAMES[@]}"; do
  r=${STATUS[$i]}; [ "$r" = 0 ] && res=ok || { res="FAIL($r)"; failed=1; }
  printf "%-22s %-6s %6s\n" "${NAMES[$i]}" "$res" "${SECS[$i]}"
done
grep -E "passed|failed" "$OUT/pytest_gpu.log" | tail -n 1
tail -n 1 "$OUT/ptxas.txt"
grep -E "^(attention|norm) +cuda" "$OUT/verify.log" || true
grep -iE "cuda" "$OUT/info_after.txt" | head -n 4
ls "$OUT/bench" 2>/dev/null | head -n 5
exit $failed
