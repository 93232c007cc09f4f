#!/usr/bin/env bash
# Rehearse the GPU run's collection and import steps (benchmarks/gpu/run_all.sh --rehearse) on
# this CPU machine in an environment like the GPU machine's: a fresh venv (not ours, and no
# system site-packages) whose site-packages link every package of .venv except the server
# stack the GPU machine lacks (tests/conftest.py's SERVER_STACK: falcon, waitress, orjson,
# msgspec, greenlet) and our own editable install, so the package comes from PYTHONPATH as
# there. Those are then truly absent: import fails natively and find_spec says None, in
# subprocesses too. Fails if a CUDA test case does not collect, if a module holding CUDA cases
# is skipped there (it would silently run nothing on the GPU), or if a bench script cannot load.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

BASE=$(.venv/bin/python -c 'import sys; print(sys._base_executable)')
"$BASE" -m venv --without-pip "$WORK/devenv"
SRC=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
DST=$("$WORK/devenv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
STACK=$(cd tests && ../.venv/bin/python -c 'from conftest import SERVER_STACK; print(*SERVER_STACK)')
for entry in "$SRC"/*; do
  name=$(basename "$entry")
  skip=0
  case "$name" in msmartcompute*|__editable__*) skip=1 ;; esac
  for module in $STACK; do  # the module, its dist-info, and py<module> distributions
    case "$name" in "$module"|"$module"-*|"$module".*|py"$module"|py"$module"[-.]*) skip=1 ;; esac
  done
  [ $skip -eq 1 ] || ln -s "$entry" "$DST/"
done
PY="$WORK/devenv/bin/python"
# the environment really is device-like: no server stack, no .venv, the checkout's package
PYTHONPATH="$ROOT" STACK="$STACK" "$PY" - <<'PYEOF'
import importlib.util, os, sys
for name in os.environ["STACK"].split():
    assert importlib.util.find_spec(name) is None, f"{name} is importable"
assert not any(".venv" in p for p in sys.path), sys.path
import msmartcompute
assert msmartcompute.__file__.startswith(os.environ["PYTHONPATH"]), msmartcompute.__file__
PYEOF

OUT="$WORK/out" PY="$PY" PATH="$WORK/devenv/bin:$PATH" bash benchmarks/gpu/run_all.sh --rehearse

# The CUDA cases collected there are exactly those collected with the full environment.
cases() { grep '::' | sed 's/ .*//' | sort; }
cases < "$WORK/out/tests.log" > "$WORK/device-like"
PYTHONPATH="$ROOT" .venv/bin/python -m pytest -p no:cacheprovider -q --collect-only -m gpu tests 2>&1 | cases > "$WORK/full"
if ! diff -u "$WORK/full" "$WORK/device-like" > "$WORK/diff"; then
  echo "CUDA test cases that the GPU machine would not run (their module needs the server stack?):"
  grep '^-[^-]' "$WORK/diff" | head -20
  exit 1
fi
echo "rehearsal: $(wc -l < "$WORK/full") CUDA test cases collect without $STACK; bench scripts load"
