#!/usr/bin/env bash
# The GPU run: one call on a lent GPU machine (plain python3 with torch and triton, no falcon,
# waitress or orjson, no .venv, no network) that validates and measures everything in under
# 8 minutes, writing each result under $OUT as soon as its step ends:
#   summary.txt   environment line, then each step's limit, exit status, time and last lines
#   steps.log     the build's and every benchmark script's output, one header per step
#   tests.log     pytest -v: one line per CUDA test case as it finishes
#   bench_<name>.json   every benchmarks/gpu/bench_*.py (5), each rewriting its JSON after every row
# The device tool brings back at most 8 files: keep it so.
# bench_fronts needs the server stack, which the machine lacks: `make gpu-wheels` here and carry
# `.whl`; it is installed into a folder of its own and put on that script's path only (with it on
# pytest's path, modules needing test-only packages the machine lacks would be collected).
#
#   usage: OUT=/dir bash benchmarks/gpu/run_all.sh [build] [tests] [bench]   (default: all three)
#          OUT=/dir bash benchmarks/gpu/run_all.sh --rehearse   (CI, no GPU: collect + import only)
# Steps have their own limits inside MSC_GPU_BUDGET_S (default 450 s); a failed or killed step is
# recorded and the next still runs; the exit status is the first failure's.
set -uo pipefail

cd "$(dirname "$0")/../.."
OUT="${OUT:-$PWD/gpu-results}"
PY="${PY:-python3}"
BUDGET_S="${MSC_GPU_BUDGET_S:-450}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # the package from this checkout, as is
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET                                # real kernels, not the CPU interpreter
START=$(date +%s)
STATUS=0
SUMMARY="$OUT/summary.txt"
STEPS_LOG="$OUT/steps.log"
: > "$SUMMARY"
: > "$STEPS_LOG"

REHEARSE=0
WANT=()
for arg in "$@"; do
  case "$arg" in
    --rehearse) REHEARSE=1 ;;
    build|tests|bench) WANT+=("$arg") ;;
    *) echo "unknown step $arg (build, tests, bench, --rehearse)" >&2; exit 2 ;;
  esac
done
[ ${#WANT[@]} -eq 0 ] && WANT=(build tests bench)
wanted() { [[ " ${WANT[*]} " == *" $1 "* ]]; }
note() { echo "$*" | tee -a "$SUMMARY"; }
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

step() {  # step NAME LIMIT_S LOG COMMAND...: INT at the limit (pytest then writes its XML), KILL 15 s later
  local name=$1 limit=$2 log=$3; shift 3
  local t0 rc
  t0=$(date +%s)
  note "== $name (limit ${limit}s)"
  echo "===== $name: $*" >> "$log"
  timeout -s INT --kill-after=15 "$limit" "$@" >> "$log" 2>&1
  rc=$?
  note "   rc=$rc in $(( $(date +%s) - t0 ))s$([ $rc -eq 124 ] && echo ' (stopped at its limit)'), log $(basename "$log")"
  tail -n 3 "$log" | sed 's/^/   | /' | tee -a "$SUMMARY"
  if [ $rc -ne 0 ] && [ $STATUS -eq 0 ]; then STATUS=$rc; fi
  return $rc
}

# ---- environment: the interpreter, versions, the card, ninja (without it the build is serial)
"$PY" - <<'PYEOF' | tee -a "$SUMMARY"
import json, platform, sys
import torch
try:
    import triton
    triton_version = triton.__version__
except ImportError as exc:
    triton_version = f"missing: {exc}"
gpu = torch.cuda.is_available()
print(json.dumps({"python": platform.python_version(), "executable": sys.executable,
                  "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version,
                  "gpu": torch.cuda.get_device_name(0) if gpu else None,
                  "capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if gpu else None}))
PYEOF
NINJA_DIR=$("$PY" -c 'import ninja; print(ninja.BIN_DIR)' 2>/dev/null) && export PATH="$NINJA_DIR:$PATH"
if command -v ninja >/dev/null; then note "ninja $(ninja --version)"; else note "WARNING: no ninja: the build runs serially"; fi
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then  # the card's own architecture (9.0 on Hopper), else 9.0
  TORCH_CUDA_ARCH_LIST=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null || echo 9.0)
fi
export TORCH_CUDA_ARCH_LIST MAX_JOBS="${MAX_JOBS:-$(nproc)}"
PYTEST=("$PY" -m pytest -p no:cacheprovider -m gpu tests)

if [ $REHEARSE -eq 1 ]; then
  # What the GPU machine would do before its first kernel runs: collect every CUDA case, and
  # load every benchmark script (imports and arguments).
  step collect 120 "$OUT/tests.log" "${PYTEST[@]}" --collect-only -q
  for script in benchmarks/gpu/bench_*.py; do
    step "import $(basename "$script" .py)" 60 "$STEPS_LOG" "$PY" "$script" --help
  done
  note "rehearsal total $(( $(date +%s) - START ))s, status $STATUS"
  exit $STATUS
fi

# ---- 1. the extension, for this card only, in parallel
if wanted build; then
  limit=$(( $(left) - 260 )); [ $limit -gt 170 ] && limit=170
  step build "$limit" "$STEPS_LOG" "$PY" setup.py -q build_ext --inplace \
    || note "   build failed: the Triton and torch cases still run; the cuda ones fail"
fi

# ---- 2. every CUDA case of every test module (the gpu mark covers device="cuda" cases too),
# several processes at once where pytest-xdist is there (Triton compiles are CPU-bound)
if wanted tests; then
  XDIST=()
  "$PY" -c 'import xdist' 2>/dev/null && XDIST=(-n "$(( $(nproc) > 8 ? 8 : $(nproc) ))")
  limit=$(( $(left) - 100 )); [ $limit -gt 180 ] && limit=180
  step tests "$limit" "$OUT/tests.log" "${PYTEST[@]}" -v -rfE "${XDIST[@]}"
fi

# ---- 3. every GPU benchmark script, the time left shared out (at least 30 s each); sizes cut
# to fit (each script rewrites its JSON after every row, so a stopped one keeps what it measured)
declare -A FIT=(
  [bench_attention]="--seqlens 1024 4096 16384 --reps 10 --warmup 3"
  [bench_gemm]="--m 1,16,256,4096 --reps 20 --warmup 5"
  [bench_paged_decode]="--contexts 1024 16384 --reps 10 --warmup 3"
  [bench_serving]="--batch 1,8 --reps 1 --new-tokens 32"
  [bench_fronts]="--seconds 3 --rounds 2 --warmup-seconds 5"
)
SITE=/tmp/msc-server-stack
if wanted bench && compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    && note "server stack installed from .whl: $(cd .whl && ls *.whl | cut -d- -f1-2 | tr '\n' ' ')" \
    || note "WARNING: installing .whl failed: bench_fronts cannot run"
fi
declare -A SCRIPT_PATH=([bench_fronts]="$SITE:$PYTHONPATH")
if wanted bench; then
  scripts=(benchmarks/gpu/bench_*.py)
  n=${#scripts[@]}
  for script in "${scripts[@]}"; do
    name=$(basename "$script" .py)
    limit=$(( $(left) / n )); [ $limit -lt 30 ] && limit=30
    n=$(( n - 1 ))
    if [ "$(left)" -le 0 ]; then note "== $name skipped: out of time"; continue; fi
    # shellcheck disable=SC2086  # FIT holds words
    step "$name" "$limit" "$STEPS_LOG" env PYTHONPATH="${SCRIPT_PATH[$name]:-$PYTHONPATH}" \
      "$PY" "$script" --out "$OUT/$name.json" ${FIT[$name]:-}
  done
fi

note "total $(( $(date +%s) - START ))s, status $STATUS"
exit $STATUS
