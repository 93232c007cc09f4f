#!/usr/bin/env bash
# One call on a GPU machine, within ten minutes: build the extension, run the GPU tests, every
# benchmarks/gpu/bench_*.py script present and the served transformer (bench_serving.py), and
# write everything under $OUT (default ./gpu-results):
#   build.log, tests-gpu.log, pytest-gpu.xml, bench_<name>.json + .log, env.json, summary.txt
# A step that fails is recorded and the next one still runs; the exit status is that of the
# first failure. Each step has its own time limit so the whole stays under ten minutes.
#   usage: OUT=/some/dir bash benchmarks/gpu/run_all.sh
set -uo pipefail

cd "$(dirname "$0")/../.."
OUT="${OUT:-$PWD/gpu-results}"
PY="${PY:-.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
mkdir -p "$OUT"
unset TRITON_INTERPRET   # real kernels on the GPU, not the CPU interpreter
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
START=$(date +%s)
STATUS=0
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

step() {  # step NAME LIMIT_S LOG COMMAND...
  local name=$1 limit=$2 log=$3; shift 3
  local t0=$(date +%s) rc
  echo "== $name (limit ${limit}s)" | tee -a "$SUMMARY"
  timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
  rc=$?
  echo "   rc=$rc in $(( $(date +%s) - t0 ))s, log $(basename "$log")" | tee -a "$SUMMARY"
  tail -n 3 "$log" | sed 's/^/   | /' | tee -a "$SUMMARY"
  if [ $rc -ne 0 ] && [ $STATUS -eq 0 ]; then STATUS=$rc; fi
  return $rc
}

"$PY" - > "$OUT/env.json" <<'PYEOF'
import json, platform, torch
print(json.dumps({"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                  "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
                  "host": platform.node()}))
PYEOF
cat "$OUT/env.json" | tee -a "$SUMMARY"

# 1. the extension (ninja, parallel): the CUDA kernels for sm_80 and sm_90
step build 240 "$OUT/build.log" "$PY" setup.py build_ext --inplace || { echo "build failed: stopping" | tee -a "$SUMMARY"; exit $STATUS; }

# 2. the GPU tests
step tests-gpu 150 "$OUT/tests-gpu.log" "$PY" -m pytest -q -m gpu tests --junitxml="$OUT/pytest-gpu.xml"

# 3. every GPU benchmark script, each with the time left shared out (at least 30 s each)
scripts=(benchmarks/gpu/bench_*.py)
n=${#scripts[@]}
for script in "${scripts[@]}"; do
  [ -e "$script" ] || continue
  name=$(basename "$script" .py)
  left=$(( 570 - ($(date +%s) - START) ))
  limit=$(( left / n )); [ $limit -lt 30 ] && limit=30
  n=$(( n - 1 ))
  if [ $left -le 0 ]; then echo "== $name skipped: out of time" | tee -a "$SUMMARY"; continue; fi
  step "$name" "$limit" "$OUT/$name.log" "$PY" "$script" --out "$OUT/$name.json"
done

echo "total $(( $(date +%s) - START ))s, status $STATUS" | tee -a "$SUMMARY"
exit $STATUS
